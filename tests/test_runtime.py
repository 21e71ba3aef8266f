import pytest
import torch
import torch.nn as nn

from kd_ref.runtime import BatchNormWatch, Runtime, atomic_save, close_runtime, load_checkpoint


def test_atomic_save_keeps_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    atomic_save({"model": {"w": torch.ones(1)}}, path)

    def broken_save(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"model": {"w": torch.zeros(1)}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["model"]["w"].item() == 1.0


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(str(bad))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="expected a kd_ref checkpoint"):
        load_checkpoint(str(foreign))


def test_batchnorm_over_fewer_than_four_values_per_channel_warns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.BatchNorm2d(4))
    for size, should_warn in ((4, True), (8, False)):   # batch 2 x 1 x 1 = 2 values; 2 x 2 x 2 = 8
        watch = BatchNormWatch([model, None], world_size=1)
        model(torch.randn(2, 3, size, size))
        if should_warn:
            with pytest.warns(UserWarning, match="BatchNorm 1 normalises over 2 values per channel"):
                watch.close()
        else:
            watch.close()
            assert watch.fewest == 8
    model.eval()
    watch = BatchNormWatch([model], world_size=1)
    model(torch.randn(2, 3, 4, 4))
    watch.close()
    assert watch.fewest is None, "eval-mode BatchNorm uses its running statistics"
    assert not model[1]._forward_pre_hooks


def test_close_runtime_destroys_the_group_of_a_distributed_run_only():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        close_runtime(Runtime(torch.device("cpu")))  # a single-process run leaves a group it did not start
        assert dist.is_initialized()
        close_runtime(Runtime(torch.device("cpu"), rank=0, world_size=2))
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
