"""Helpers shared by the end-to-end training tests."""
import pytest

import train
from kd_ref import engine
from kd_ref.runtime import load_checkpoint


def train_crashing_in_step(monkeypatch, iteration: int, argv: list) -> None:
    """Run ``train.main(argv)`` until it crashes in the 0-based ``iteration``, after that step's forward and
    before its update, so the checkpoint on disk is the last one written before it (as a killed job leaves)."""
    real_check = engine._check_finite

    def crash(losses, at):
        if at == iteration:
            raise KeyboardInterrupt
        real_check(losses, at)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "_check_finite", crash)
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)


def straight_and_resumed(tmp_path, monkeypatch, flags: list, crash_at: int) -> tuple[dict, dict]:
    """The last checkpoints of ``train.main(flags)`` run straight through and of the same run crashed in
    iteration ``crash_at`` then resumed (``--out`` is ``tmp_path/straight`` and ``tmp_path/resumed``)."""
    train.main([*flags, "--out", str(tmp_path / "straight")])
    train_crashing_in_step(monkeypatch, crash_at, [*flags, "--out", str(tmp_path / "resumed")])
    train.main([*flags, "--out", str(tmp_path / "resumed"), "--resume"])
    return (load_checkpoint(str(tmp_path / "straight/last.pt")),
            load_checkpoint(str(tmp_path / "resumed/last.pt")))
