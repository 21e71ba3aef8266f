"""Tests for kd_ref/classifiers.py: parameter counts, outputs, loss, reference weight layouts."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kd_ref import convert
from kd_ref.classifiers import CIFAR_RESNETS, CLASSIFIER_NAMES, WIDE_RESNETS, build_classifier, convert_wrn_state_dict
from kd_ref.runtime import load_checkpoint

# RepDistiller's table (CRD paper) rounds to 0.01M: res8x4 1.23M, res32x4 7.43M, wrn-40-2 2.26M, ...;
# torchvision documents ResNet-18/34/50 as 11,689,512 / 21,797,672 / 25,557,032 (1000 classes).
PARAMETER_COUNTS = {
    ("resnet8x4", 100): 1_233_540, ("resnet32x4", 100): 7_433_860, ("resnet20", 100): 278_324,
    ("resnet32", 100): 472_756, ("resnet56", 100): 861_620, ("resnet110", 100): 1_736_564,
    ("wrn_40_2", 100): 2_255_156, ("wrn_40_1", 100): 569_780, ("wrn_16_2", 100): 703_284,
    ("resnet8", 100): 83_892,
    ("resnet18", 1000): 11_689_512, ("resnet34", 1000): 21_797_672, ("resnet50", 1000): 25_557_032,
}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, num_classes", sorted(PARAMETER_COUNTS))
def test_parameter_counts(name, num_classes):
    with torch.device("meta"):
        model = build_classifier(name, num_classes)
    assert count(model) == PARAMETER_COUNTS[name, num_classes]


def test_resnet8x4_count_by_hand():
    conv_bn = lambda cin, cout, k: cin * cout * k * k + 2 * cout  # noqa: E731
    stem = conv_bn(3, 32, 3)
    stages = 0
    for cin, cout in ((32, 64), (64, 128), (128, 256)):   # one BasicBlock per stage, all with projection
        stages += conv_bn(cin, cout, 3) + conv_bn(cout, cout, 3) + conv_bn(cin, cout, 1)
    assert count(build_classifier("resnet8x4", 100)) == stem + stages + 256 * 100 + 100


@pytest.mark.parametrize("name, size, shapes", [
    ("resnet8x4", 32, {"c3": (64, 32, 32), "c4": (128, 16, 16), "c5": (256, 8, 8), "pool": (256,)}),
    ("wrn_16_1", 32, {"c3": (16, 32, 32), "c4": (32, 16, 16), "c5": (64, 8, 8), "pool": (64,)}),
    ("resnet18", 64, {"c2": (64, 16, 16), "c3": (128, 8, 8), "c4": (256, 4, 4), "c5": (512, 2, 2), "pool": (512,)}),
])
def test_outputs_follow_the_model_contract(name, size, shapes):
    model = build_classifier(name, 7).eval()
    out = model(torch.randn(2, 3, size, size), targets=torch.tensor([1, 2]))
    assert set(out) == {"logits", "feats"}, "eval mode: no losses even with targets"
    assert out["logits"].shape == (2, 7)
    assert {k: tuple(v.shape[1:]) for k, v in out["feats"].items()} == shapes
    assert {k: model.out_channels[k] for k in shapes} == {k: v[0] for k, v in shapes.items()}
    torch.testing.assert_close(out["logits"], model.fc(out["feats"]["pool"]))


def test_training_loss_is_cross_entropy_and_trains_every_parameter():
    torch.manual_seed(0)
    model = build_classifier("wrn_16_1", 5).train()
    images, targets = torch.randn(4, 3, 16, 16), torch.tensor([0, 4, 2, 2])
    out = model(images, targets)
    assert set(out["losses"]) == {"loss_cls"}
    torch.testing.assert_close(out["losses"]["loss_cls"], F.cross_entropy(out["logits"], targets))
    out["losses"]["loss_cls"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_pooling_is_the_global_mean_of_the_last_map():
    model = build_classifier("resnet20", 10).eval()
    out = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out["feats"]["pool"], F.avg_pool2d(out["feats"]["c5"], 8).flatten(1))
    wide = build_classifier("wrn_16_1", 10).eval()
    out = wide(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out["feats"]["pool"], F.relu(wide.bn(out["feats"]["c5"])).mean((2, 3)))


def test_torchvision_weights_give_torchvision_outputs(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10).eval()
    for module in reference.modules():   # non-trivial BN statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_classifier("resnet18", 10)
    convert.load_weights(model, str(path), "--pretrained resnet18.pth")
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(images)["logits"], reference(images))


def test_repdistiller_wrn_keys_are_mapped():
    model = build_classifier("wrn_16_1", 100)
    ours = model.state_dict()
    theirs = {}
    for key, value in ours.items():   # the RepDistiller / mdistiller names of the same tensors
        key = key.replace(".shortcut.", ".convShortcut.")
        for stage in "123":
            key = key.replace(f"block{stage}.", f"block{stage}.layer.")
        theirs["bn1." + key[3:] if key.startswith("bn.") else key] = value
    assert "block2.layer.0.convShortcut.weight" in theirs and "bn1.running_var" in theirs
    converted = convert_wrn_state_dict(theirs)
    assert set(converted) == set(ours) and all(converted[k] is ours[k] for k in ours)


def test_weights_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="classifier 'resnet9'.*resnet8x4"):
        build_classifier("resnet9", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier("resnet8", 0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert.load_weights(build_classifier("resnet8", 10), str(tmp_path / "missing.pth"), "--pretrained m")
    path = tmp_path / "wrong.pth"
    torch.save(build_classifier("resnet8", 10).state_dict(), path)
    with pytest.raises(ValueError, match="resnet8, 10 classes; the recipe expects resnet8, 100 classes"):
        convert.load_weights(build_classifier("resnet8", 100), str(path), "--teacher-ckpt wrong.pth")
    with pytest.raises(ValueError, match="targets must be int64"):
        build_classifier("resnet8", 10).train()(torch.randn(2, 3, 16, 16), torch.zeros(2, 10))


def test_convert_cli_writes_a_teacher_checkpoint(tmp_path):
    source = tmp_path / "repdistiller.pth"
    teacher = build_classifier("resnet8", 100)
    torch.save({"model": teacher.state_dict(), "epoch": 240}, source)   # RepDistiller's layout
    target = tmp_path / "teacher.pt"
    assert convert.main(["--task", "cls", "--arch", "resnet8", str(source), str(target)]) == 0
    loaded = build_classifier("resnet8", 100)
    loaded.load_state_dict(load_checkpoint(str(target))["model"])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))


def test_names_cover_the_kd_literature():
    assert {"resnet8x4", "resnet32x4", "resnet20", "resnet56", "resnet110", "wrn_40_2", "wrn_40_1",
            "resnet18", "resnet34", "resnet50"} <= set(CLASSIFIER_NAMES)
    assert all(CIFAR_RESNETS[name][0] % 6 == 2 for name in CIFAR_RESNETS)
    assert all(WIDE_RESNETS[name][0] % 6 == 4 for name in WIDE_RESNETS)
