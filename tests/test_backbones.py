"""Tests for kd_ref/backbones.py: structure, counts (seg_models.md), strides, loading, freezing."""

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from kd_ref.backbones import FLAVOURS, build_backbone, convert_backbone_state_dict
from model_helpers import count_parameters, randomise_


@pytest.mark.parametrize("flavour, depth, expected", [
    ("cirkd", 18, 11_324_992),        # seg_models.md §2, deep-stem R18
    ("cirkd", 101, 42_623_936),       # seg_models.md §2, deep-stem R101
    ("skd", 18, 11_324_992),          # same stem and blocks, only pooling / dilation differ
    ("torchvision", 18, 11_176_512),  # = torchvision resnet18 minus fc
    ("torchvision", 101, 42_500_160),
    ("mmseg", 18, 11_195_744),        # torchvision R18 - 7x7 stem (9,536) + V1c stem (28,768)
    ("mmseg", 101, 42_519_392),
])
def test_parameter_counts(flavour, depth, expected):
    with torch.device("meta"):
        assert count_parameters(build_backbone(depth, flavour)) == expected


def test_torchvision_flavour_matches_torchvision_minus_fc():
    with torch.device("meta"):
        for depth, builder in ((34, torchvision.models.resnet34), (50, torchvision.models.resnet50)):
            reference = builder()
            expected = count_parameters(reference) - count_parameters(reference.fc)
            assert count_parameters(build_backbone(depth, "torchvision")) == expected


def test_mmseg_v1c_stem_count_by_hand():
    stem = build_backbone(18, "mmseg").stem
    # convs 3->32 (s2), 32->32, 32->64, all 3x3 bias-free; each BN has weight + bias.
    assert count_parameters(stem) == 3 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9 + 2 * (32 + 32 + 64)


@pytest.mark.parametrize("flavour, output_stride, size", [(flavour, 8, 8) for flavour in FLAVOURS] + [
    # the stage geometry is shared by all flavours; skd differs only through its ceil-mode pool
    ("cirkd", 16, 4), ("cirkd", 32, 2), ("skd", 16, 4), ("skd", 32, 2)])
def test_output_strides_and_channels(flavour, output_stride, size):
    backbone = build_backbone(18, flavour, output_stride=output_stride).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    assert list(feats) == ["c2", "c3", "c4", "c5"]
    assert backbone.out_channels == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
    # skd's ceil-mode max-pool: 64 -> 32 -> 17 (not 16) -> 9 at OS 8.
    c2_size = 17 if flavour == "skd" else 16
    assert feats["c2"].shape == (1, 64, c2_size, c2_size)
    expected_c5 = {8: 9, 16: 5, 32: 3}[output_stride] if flavour == "skd" else size
    assert feats["c5"].shape == (1, 512, expected_c5, expected_c5)


def test_bottleneck_channels():
    backbone = build_backbone(50, "cirkd")
    assert backbone.out_channels == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}


def test_skd_512_crop_gives_65x65_maps():
    backbone = build_backbone(18, "skd").eval()
    with torch.no_grad():
        x = backbone.layer2(backbone.layer1(backbone.stem(torch.randn(1, 3, 512, 512))))
    assert x.shape[-2:] == (65, 65)
    assert backbone.stem[-1].ceil_mode and not build_backbone(18, "cirkd").stem[-1].ceil_mode


def dilations(backbone: nn.Module, layer: str, conv: str) -> list[int]:
    return [getattr(block, conv).dilation[0] for block in getattr(backbone, layer)]


def test_dilation_patterns_basic_block():
    cirkd, skd, mmseg = (build_backbone(18, f) for f in ("cirkd", "skd", "mmseg"))
    # gluoncv: the first block of a dilated stage uses d/2 in conv1 and d in conv2.
    assert dilations(cirkd, "layer3", "conv1") == [1, 2] and dilations(cirkd, "layer3", "conv2") == [2, 2]
    assert dilations(cirkd, "layer4", "conv1") == [2, 4] and dilations(cirkd, "layer4", "conv2") == [4, 4]
    # skd: uniform.
    assert dilations(skd, "layer3", "conv1") == [2, 2] and dilations(skd, "layer3", "conv2") == [2, 2]
    assert dilations(skd, "layer4", "conv1") == [4, 4] and dilations(skd, "layer4", "conv2") == [4, 4]
    # mmseg: contract_dilation on conv1, conv2 never dilated.
    assert dilations(mmseg, "layer3", "conv1") == [1, 2] and dilations(mmseg, "layer3", "conv2") == [1, 1]
    assert dilations(mmseg, "layer4", "conv1") == [2, 4] and dilations(mmseg, "layer4", "conv2") == [1, 1]
    # padding always equals dilation, strides only in layer2 at OS 8
    for block in list(cirkd.layer3) + list(cirkd.layer4):
        assert block.conv1.padding == block.conv1.dilation and block.conv1.stride == (1, 1)
    assert cirkd.layer2[0].conv1.stride == (2, 2)
    # OS16: layer3 strided, layer4 dilated 2 with the first block halved
    os16 = build_backbone(18, "cirkd", output_stride=16)
    assert os16.layer3[0].conv1.stride == (2, 2)
    assert dilations(os16, "layer4", "conv1") == [1, 2] and dilations(os16, "layer4", "conv2") == [2, 2]


def test_dilation_patterns_bottleneck():
    with torch.device("meta"):
        cirkd, skd = build_backbone(101, "cirkd"), build_backbone(101, "skd")
    assert dilations(cirkd, "layer3", "conv2") == [1] + [2] * 22
    assert dilations(cirkd, "layer4", "conv2") == [2, 4, 4]
    assert dilations(skd, "layer3", "conv2") == [2] * 23
    assert dilations(skd, "layer4", "conv2") == [4, 4, 4]
    assert all(block.conv1.kernel_size == (1, 1) for block in cirkd.layer3)


@pytest.mark.parametrize("output_stride, replace", [(8, [False, True, True]), (16, [False, False, True])])
def test_torchvision_flavour_dilation_equals_replace_stride_with_dilation(output_stride, replace):
    with torch.device("meta"):
        ours = build_backbone(50, "torchvision", output_stride=output_stride)
        reference = torchvision.models.resnet50(replace_stride_with_dilation=replace)
    ours_convs = [(n, m) for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)]
    reference_convs = [(n, m) for n, m in reference.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(ours_convs) == len(reference_convs)
    for (_, a), (name, b) in zip(ours_convs, reference_convs):
        assert (a.stride, a.dilation, a.padding, a.weight.shape) == (b.stride, b.dilation, b.padding,
                                                                     b.weight.shape), name


def test_projection_shortcuts():
    assert build_backbone(18, "cirkd").layer1[0].downsample is not None   # 128 -> 64 channels
    assert build_backbone(18, "mmseg").layer1[0].downsample is None       # 64 -> 64
    assert build_backbone(18, "torchvision").layer1[0].downsample is None
    assert build_backbone(18, "cirkd").layer3[0].downsample[0].stride == (1, 1)


def test_init_kaiming_fan_out_and_unit_bn():
    torch.manual_seed(0)
    backbone = build_backbone(50, "cirkd")
    conv = backbone.layer3[1].conv2                      # 256 -> 256, 3x3: fan_out = 256 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_loads_torchvision_state_dict_and_matches_torchvision_outputs(tmp_path):
    reference = randomise_(torchvision.models.resnet18()).eval()
    path = tmp_path / "resnet18_torchvision.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone(18, "torchvision", output_stride=32, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for name, layer in zip(("c2", "c3", "c4", "c5"),
                               (reference.layer1, reference.layer2, reference.layer3, reference.layer4)):
            y = layer(y)
            torch.testing.assert_close(feats[name], y, rtol=0, atol=0)


def test_round_trip_own_keys(tmp_path):
    source = randomise_(build_backbone(18, "cirkd"))
    path = tmp_path / "ours.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone(18, "cirkd", pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_cirkd_deep_stem_imagenet_layout_is_mapped():
    # Key names of CIRKD's resnet*-imagenet.pth (ResNetV1b deep stem + an ImageNet fc).
    t = torch.zeros(1)
    reference = {"conv1.weight": t, "bn1.weight": t, "conv2.weight": t, "bn2.running_mean": t,
                 "conv3.weight": t, "bn3.num_batches_tracked": t, "layer1.0.downsample.0.weight": t,
                 "layer4.1.bn2.bias": t, "fc.weight": t, "fc.bias": t}
    assert set(convert_backbone_state_dict(reference)) == {
        "stem.0.weight", "stem.1.weight", "stem.3.weight", "stem.4.running_mean", "stem.6.weight",
        "stem.7.num_batches_tracked", "layer1.0.downsample.0.weight", "layer4.1.bn2.bias"}


@pytest.mark.parametrize("flavour, stem_names", [
    # CIRKD / pytorch-segmentation-toolbox deep stem, saved with DataParallel's "module." prefix
    ("cirkd", {"stem.0.": "module.conv1.", "stem.1.": "module.bn1.", "stem.3.": "module.conv2.",
               "stem.4.": "module.bn2.", "stem.6.": "module.conv3.", "stem.7.": "module.bn3."}),
    # mmcv V1c (stem.i) under mmcv's {"state_dict": ...} wrapper
    ("mmseg", {}),
])
def test_loads_reference_imagenet_layouts(tmp_path, flavour, stem_names):
    source = randomise_(build_backbone(18, flavour))
    reference = {}
    for key, value in source.state_dict().items():
        for ours, theirs in stem_names.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        reference[key] = value
    reference["fc.weight"] = torch.zeros(1000, 512)
    path = tmp_path / "imagenet.pth"
    torch.save({"meta": {}, "state_dict": reference} if flavour == "mmseg" else reference, path)
    loaded = build_backbone(18, flavour, pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_old_checkpoints_without_num_batches_tracked_load(tmp_path):
    state_dict = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
                  if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state_dict, path)
    build_backbone(18, "torchvision", pretrained=str(path))


def test_mismatched_checkpoint_error_names_both_trunks(tmp_path):
    path = tmp_path / "resnet18_torchvision.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError) as error:
        build_backbone(18, "cirkd", pretrained=str(path))     # 7x7 stem into the deep stem
    message = str(error.value)
    assert message == (f"pretrained weights {path}: holds a ResNet-18 (7x7 stem); the model's cirkd-flavour "
                       "backbone is a ResNet-18 (deep stem 64-64-128)")


def test_unknown_keys_raise(tmp_path):
    state_dict = build_backbone(18, "torchvision").state_dict()
    state_dict["head.classifier.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"cannot map 1 checkpoint key\(s\): head.classifier.weight"):
        build_backbone(18, "torchvision", pretrained=str(path))


def test_checkpoint_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone(18, "cirkd", pretrained=str(tmp_path / "missing.pth"))
    path = tmp_path / "not_a_state_dict.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match=r"not_a_state_dict.pth: expected weights \(a state dict of tensors"):
        build_backbone(18, "cirkd", pretrained=str(path))
    pickled = tmp_path / "arbitrary_objects.pth"
    torch.save({"state_dict": {}, "meta": ArbitraryObject()}, pickled)
    with pytest.raises(ValueError, match=r"arbitrary_objects.pth: not loadable with torch.load\(weights_only=True\)"):
        build_backbone(18, "cirkd", pretrained=str(pickled))


class ArbitraryObject:
    """Something torch.load(weights_only=True) refuses to unpickle."""


def test_frozen_stages_and_norm_eval():
    backbone = build_backbone(18, "torchvision", output_stride=32, frozen_stages=1, norm_eval=True).train()
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    assert not any(m.training for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert backbone.layer2.training                      # only the norms are switched to eval
    before = backbone.layer3[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(backbone.layer3[0].bn1.running_mean, before)

    partly = build_backbone(18, "torchvision", frozen_stages=1).train()
    assert not partly.stem[1].training and not partly.layer1[0].bn1.training
    assert partly.layer2[0].bn1.training


@pytest.mark.parametrize("kwargs, message", [
    ({"depth": 20, "flavour": "cirkd"}, r"depth must be one of \(18, 34, 50, 101\), got 20"),
    ({"depth": 18, "flavour": "gluon"},
     r"flavour must be one of \('cirkd', 'skd', 'mmseg', 'torchvision'\), got 'gluon'"),
    ({"depth": 18, "flavour": "cirkd", "output_stride": 4}, r"output_stride must be one of \(8, 16, 32\)"),
    ({"depth": 18, "flavour": "cirkd", "frozen_stages": 5}, r"frozen_stages must be in -1..4"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(**kwargs)


def test_stride_in_1x1_moves_the_stride_onto_the_first_conv_with_the_same_shapes():
    torch.manual_seed(0)
    msra = randomise_(build_backbone(50, "torchvision", 32, stride_in_1x1=True)).eval()
    default = build_backbone(50, "torchvision", 32).eval()
    assert {k: v.shape for k, v in msra.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    default.load_state_dict(msra.state_dict())
    block = msra.layer2[0]
    x = torch.randn(1, 256, 16, 16)

    def bn(name, t):  # the FCOS code's FrozenBatchNorm2d: x * w / sqrt(var) + (b - mean * w / sqrt(var))
        module = getattr(block, name) if name != "downsample" else block.downsample[1]
        scale = module.weight / (module.running_var + module.eps).sqrt()
        return t * scale[:, None, None] + (module.bias - module.running_mean * scale)[:, None, None]

    with torch.no_grad():
        out = F.relu(bn("bn1", F.conv2d(x, block.conv1.weight, stride=2)))
        out = F.relu(bn("bn2", F.conv2d(out, block.conv2.weight, padding=1)))
        expected = F.relu(bn("bn3", F.conv2d(out, block.conv3.weight))
                          + bn("downsample", F.conv2d(x, block.downsample[0].weight, stride=2)))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(default.layer2[0](x), expected, atol=1e-3)
        assert [f.shape[-1] for f in msra(torch.randn(1, 3, 64, 64)).values()] == [16, 8, 4, 2]
    with pytest.raises(ValueError, match="stride_in_1x1 applies to Bottleneck ResNets"):
        build_backbone(18, "torchvision", 32, stride_in_1x1=True)
