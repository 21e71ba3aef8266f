"""Tests for kd_ref/segmentors.py: counts (seg_models.md tables), outputs, losses, checkpoint keys."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_ref import convert
from kd_ref.segmentors import (FLAVOURS, SEGMENTOR_NAMES, build_segmentor, convert_reference_state_dict,
                               segmentation_ce)
from model_helpers import count_parameters, randomise_


# (flavour, name, total, without aux, decode head, aux head)
PARAMETER_COUNTS = [
    # seg_models.md §3 table (old CIRKD)
    ("cirkd", "deeplabv3_r101", 61_118_950, 58_754_259, 16_130_323, 2_364_691),
    ("cirkd", "deeplabv3_r18", 13_607_974, 13_459_155, 2_134_163, 148_819),
    ("cirkd", "pspnet_r18", 12_919_334, 12_770_515, 1_445_523, 148_819),
    ("torchvision", "deeplabv3_r18", 13_459_494, 13_310_675, 2_134_163, 148_819),
    # seg_models.md §4 (~13,068k / 12,771k and ~70,437k / 65,707k), exact values of our builder
    ("skd", "pspnet_r18", 13_068_262, 12_770_515, 1_445_523, 297_747),
    ("skd", "pspnet_r101", 70_437_350, 65_707_475, 23_083_539, 4_729_875),
    # mmseg flavour (recorded from our builder after checking the mmseg 0.20 head code)
    ("mmseg", "pspnet_r18", 12_790_086, 12_641_267, 1_445_523, 148_819),
    ("mmseg", "deeplabv3_r18", 13_986_374, 13_837_555, 2_641_811, 148_819),
    ("mmseg", "pspnet_r101", 67_967_622, 65_602_931, 23_083_539, 2_364_691),
]


@pytest.mark.parametrize("flavour, name, total, without_aux, head, aux", PARAMETER_COUNTS)
def test_parameter_counts(flavour, name, total, without_aux, head, aux):
    with torch.device("meta"):
        model = build_segmentor(name, flavour=flavour)
    assert count_parameters(model) == total
    assert count_parameters(model) - count_parameters(model.aux_head) == without_aux
    assert count_parameters(model.decode_head) == head
    assert count_parameters(model.aux_head) == aux


def test_mmseg_aspp_head_count_by_hand():
    d, c5, k = 128, 512, 19
    conv_bn = lambda cin, cout, ks: cin * cout * ks * ks + 2 * cout  # noqa: E731
    expected = (conv_bn(c5, d, 1) * 2          # image pool + 1x1 branch
                + conv_bn(c5, d, 3) * 3        # rates 12, 24, 36
                + conv_bn(5 * d, d, 3)         # bottleneck on the concat (no 1x1 projection)
                + d * k + k)                   # classifier
    with torch.device("meta"):
        assert count_parameters(build_segmentor("deeplabv3_r18", flavour="mmseg").decode_head) == expected


@pytest.mark.parametrize("flavour, name", [("cirkd", "deeplabv3_r18"), ("cirkd", "pspnet_r18"),
                                           ("torchvision", "deeplabv3_r18"), ("skd", "pspnet_r18"),
                                           ("mmseg", "deeplabv3_r18"), ("mmseg", "pspnet_r18")])
def test_eval_outputs(flavour, name):
    model = build_segmentor(name, flavour=flavour).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), targets=torch.zeros(1, 64, 64, dtype=torch.long))
    size = 9 if flavour == "skd" else 8       # skd: ceil-mode max-pool (512 -> 65 like 64 -> 9)
    assert out["logits"].shape == (1, 19, size, size)
    assert out["aux_logits"].shape == (1, 19, size, size)     # also in eval mode (DIST needs it)
    assert "losses" not in out                                 # targets only matter in training
    assert set(out["feats"]) == {"c2", "c3", "c4", "c5", "head"}
    for key, channels in model.out_channels.items():
        assert out["feats"][key].shape[1] == channels
    assert model.out_channels["head"] == 128
    # "head" is the classifier's input: logits = classifier(head)
    torch.testing.assert_close(model.decode_head.classifier(out["feats"]["head"]), out["logits"])


@pytest.fixture(scope="module")
def training_models():
    torch.manual_seed(0)
    return {flavour: build_segmentor("pspnet_r18", num_classes=5, flavour=flavour).train()
            for flavour in ("cirkd", "mmseg")}


@pytest.mark.parametrize("flavour", ["cirkd", "mmseg"])
def test_training_losses_match_hand_computation(training_models, flavour):
    targets = torch.randint(0, 5, (2, 40, 48))
    targets[:, :10] = 255
    out = training_models[flavour](torch.randn(2, 3, 40, 48), targets=targets)
    assert set(out["losses"]) == {"loss_seg", "loss_seg_aux"}
    align_corners = flavour != "mmseg"

    def ce(logits):
        upsampled = F.interpolate(logits, (40, 48), mode="bilinear", align_corners=align_corners)
        per_pixel = F.cross_entropy(upsampled, targets, ignore_index=255, reduction="none")
        # mmseg 0.20 averages over all pixels, ignored ones included as zeros.
        return per_pixel.sum() / (targets.numel() if flavour == "mmseg" else (targets != 255).sum())

    torch.testing.assert_close(out["losses"]["loss_seg"], ce(out["logits"]))
    torch.testing.assert_close(out["losses"]["loss_seg_aux"], 0.4 * ce(out["aux_logits"]))


def test_all_ignored_crop_gives_zero_loss(training_models):
    out = training_models["cirkd"](torch.randn(2, 3, 32, 32), targets=torch.full((2, 32, 32), 255))
    assert out["losses"]["loss_seg"].item() == 0.0 and out["losses"]["loss_seg_aux"].item() == 0.0


def test_loss_is_float32_under_bfloat16_autocast():
    logits = torch.randn(2, 5, 4, 4, dtype=torch.bfloat16)
    targets = torch.randint(0, 5, (2, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = segmentation_ce(logits, targets, align_corners=True, over_all_pixels=False)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, segmentation_ce(logits.float(), targets, True, False))


def test_bad_targets_shape(training_models):
    with pytest.raises(ValueError, match=r"targets must be \(B, H, W\) label maps with B = 2"):
        training_models["cirkd"](torch.randn(2, 3, 32, 32), targets=torch.zeros(2, 1, 32, 32, dtype=torch.long))


def test_gradients_reach_every_parameter():
    model = build_segmentor("deeplabv3_r18", flavour="cirkd").train()
    out = model(torch.randn(2, 3, 32, 32), targets=torch.randint(0, 19, (2, 32, 32)))
    sum(out["losses"].values()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_without_aux_head():
    model = build_segmentor("pspnet_r18", aux=False).train()
    assert model.aux_head is None
    out = model(torch.randn(2, 3, 16, 16), targets=torch.randint(0, 19, (2, 16, 16)))
    assert "aux_logits" not in out and set(out["losses"]) == {"loss_seg"}


def test_flavour_head_details():
    cirkd = build_segmentor("deeplabv3_r18", flavour="cirkd")
    assert [m.p for m in cirkd.decode_head.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.1]
    assert cirkd.aux_head.block[0].bias is None and cirkd.align_corners
    assert [m.dilation[0] for m in cirkd.decode_head.branches.modules() if isinstance(m, nn.Conv2d)] == [1, 12, 24, 36]
    mmseg = build_segmentor("deeplabv3_r18", flavour="mmseg")
    assert mmseg.decode_head.project is None and not mmseg.align_corners
    assert isinstance(mmseg.decode_head.dropout, nn.Dropout2d)
    skd = build_segmentor("pspnet_r18", flavour="skd")
    activations = [m for m in skd.decode_head.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert activations and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.01 for m in activations)
    assert skd.aux_head.block[0].bias is not None and skd.aux_head.block[0].out_channels == 128
    assert [b[1].out_channels for b in skd.decode_head.branches] == [128] * 4


def test_bad_names_and_flavours_list_the_choices():
    with pytest.raises(ValueError) as error:
        build_segmentor("pspnet_r152")
    assert all(name in str(error.value) for name in SEGMENTOR_NAMES)
    with pytest.raises(ValueError) as error:
        build_segmentor("pspnet_r18", flavour="gluon")
    assert all(flavour in str(error.value) for flavour in FLAVOURS)
    with pytest.raises(ValueError, match="flavour 'skd' defines PSPNet only"):
        build_segmentor("deeplabv3_r18", flavour="skd")
    assert len(SEGMENTOR_NAMES) == 8 and "deeplabv3_r34" in SEGMENTOR_NAMES


# ---------------------------------------------------------------------------------------------
# Reference checkpoint keys, written out as the reference codes name them.

T = torch.zeros(1)
REFERENCE_KEYS = {
    "cirkd": {  # CIRKD models/deeplabv3.py, pspnet.py, base_models/resnet.py (ResNetV1b, deep stem)
        "pretrained.conv1.weight": "backbone.stem.0.weight",
        "pretrained.bn1.running_mean": "backbone.stem.1.running_mean",
        "pretrained.conv2.weight": "backbone.stem.3.weight",
        "pretrained.bn3.bias": "backbone.stem.7.bias",
        "pretrained.layer1.0.downsample.1.weight": "backbone.layer1.0.downsample.1.weight",
        "pretrained.layer4.1.conv2.weight": "backbone.layer4.1.conv2.weight",
        "head.aspp.b0.0.weight": "decode_head.branches.0.0.weight",
        "head.aspp.b0.1.running_var": "decode_head.branches.0.1.running_var",
        "head.aspp.b2.block.0.weight": "decode_head.branches.2.0.weight",
        "head.aspp.b3.block.1.bias": "decode_head.branches.3.1.bias",
        "head.aspp.b4.gap.1.weight": "decode_head.image_pool.1.weight",
        "head.aspp.b4.gap.2.weight": "decode_head.image_pool.2.weight",
        "head.aspp.project.0.weight": "decode_head.project.0.weight",
        "head.aspp.project.1.num_batches_tracked": "decode_head.project.1.num_batches_tracked",
        "head.block.0.weight": "decode_head.bottleneck.0.weight",
        "head.block.1.weight": "decode_head.bottleneck.1.weight",
        "head.block.4.weight": "decode_head.classifier.weight",
        "head.block.4.bias": "decode_head.classifier.bias",
        "head.psp.conv1.0.weight": "decode_head.branches.0.1.weight",
        "head.psp.conv4.1.running_var": "decode_head.branches.3.2.running_var",
        "head.classifier.bias": "decode_head.classifier.bias",
        "auxlayer.block.0.weight": "aux_head.block.0.weight",
        "module.auxlayer.block.1.weight": "aux_head.block.1.weight",
        "auxlayer.block.4.bias": "aux_head.classifier.bias",
    },
    "skd": {  # SKD networks/pspnet_combine.py, and the toolbox teacher layout (head.0 / head.1)
        "conv1.weight": "backbone.stem.0.weight",
        "bn2.running_var": "backbone.stem.4.running_var",
        "layer3.22.bn3.weight": "backbone.layer3.22.bn3.weight",
        "pspmodule.stages.0.1.weight": "decode_head.branches.0.1.weight",
        "pspmodule.stages.3.2.running_mean": "decode_head.branches.3.2.running_mean",
        "pspmodule.bottleneck.0.weight": "decode_head.bottleneck.0.weight",
        "pspmodule.bottleneck.1.bias": "decode_head.bottleneck.1.bias",
        "head.weight": "decode_head.classifier.weight",
        "head.0.stages.2.1.weight": "decode_head.branches.2.1.weight",
        "head.0.bottleneck.1.running_var": "decode_head.bottleneck.1.running_var",
        "head.1.bias": "decode_head.classifier.bias",
        "dsn.0.bias": "aux_head.block.0.bias",
        "dsn.1.weight": "aux_head.block.1.weight",
        "dsn.3.weight": "aux_head.classifier.weight",
    },
    "mmseg": {  # mmseg ResNetV1c, PSPHead / ASPPHead / FCNHead (ConvModule = conv + bn)
        "backbone.stem.0.weight": "backbone.stem.0.weight",
        "backbone.stem.7.running_mean": "backbone.stem.7.running_mean",
        "backbone.layer3.0.bn1.weight": "backbone.layer3.0.bn1.weight",
        "decode_head.psp_modules.0.1.conv.weight": "decode_head.branches.0.1.weight",
        "decode_head.psp_modules.3.1.bn.running_var": "decode_head.branches.3.2.running_var",
        "decode_head.image_pool.1.conv.weight": "decode_head.image_pool.1.weight",
        "decode_head.image_pool.1.bn.bias": "decode_head.image_pool.2.bias",
        "decode_head.aspp_modules.0.conv.weight": "decode_head.branches.0.0.weight",
        "decode_head.aspp_modules.3.bn.weight": "decode_head.branches.3.1.weight",
        "decode_head.bottleneck.conv.weight": "decode_head.bottleneck.0.weight",
        "decode_head.bottleneck.bn.num_batches_tracked": "decode_head.bottleneck.1.num_batches_tracked",
        "decode_head.conv_seg.weight": "decode_head.classifier.weight",
        "auxiliary_head.convs.0.conv.weight": "aux_head.block.0.weight",
        "auxiliary_head.convs.0.bn.running_mean": "aux_head.block.1.running_mean",
        "auxiliary_head.conv_seg.bias": "aux_head.classifier.bias",
    },
}


@pytest.mark.parametrize("flavour", list(REFERENCE_KEYS))
def test_convert_reference_key_names(flavour):
    converted = convert_reference_state_dict({key: T for key in REFERENCE_KEYS[flavour]}, flavour)
    assert sorted(converted) == sorted(set(REFERENCE_KEYS[flavour].values()))
    # every target exists in one of the flavour's models
    with torch.device("meta"):
        models = ([build_segmentor("pspnet_r101", flavour="skd")] if flavour == "skd" else
                  [build_segmentor(n, flavour=flavour) for n in ("pspnet_r18", "deeplabv3_r18")])
    own_keys = set().union(*(m.state_dict() for m in models))
    assert set(converted) <= own_keys


def test_convert_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"cirkd reference checkpoint: cannot map 1 checkpoint key\(s\): "
                                         r"head\.conv5\.weight"):
        convert_reference_state_dict({"pretrained.conv1.weight": T, "head.conv5.weight": T}, "cirkd")
    with pytest.raises(ValueError, match="flavour must be one of"):
        convert_reference_state_dict({}, "gluon")


def to_cirkd_deeplabv3_layout(state_dict):
    """Inverse naming for a whole CIRKD DeepLabV3 checkpoint (independent of the module's rules)."""
    stem = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[:2] == ["backbone", "stem"]:
            key = ".".join(["pretrained", stem[parts[2]]] + parts[3:])
        elif parts[0] == "backbone":
            key = ".".join(["pretrained"] + parts[1:])
        elif parts[:2] == ["decode_head", "branches"]:
            inner = f"b{parts[2]}" if parts[2] == "0" else f"b{parts[2]}.block"
            key = ".".join(["head.aspp", inner] + parts[3:])
        elif parts[:2] == ["decode_head", "image_pool"]:
            key = ".".join(["head.aspp.b4.gap"] + parts[2:])
        elif parts[:2] == ["decode_head", "project"]:
            key = ".".join(["head.aspp.project"] + parts[2:])
        elif parts[:2] == ["decode_head", "bottleneck"]:
            key = ".".join(["head.block"] + parts[2:])
        elif parts[:2] == ["decode_head", "classifier"]:
            key = ".".join(["head.block.4"] + parts[2:])
        elif parts[:2] == ["aux_head", "block"]:
            key = ".".join(["auxlayer.block"] + parts[2:])
        elif parts[:2] == ["aux_head", "classifier"]:
            key = ".".join(["auxlayer.block.4"] + parts[2:])
        renamed[key] = value
    return renamed


def test_load_full_cirkd_checkpoint_reproduces_outputs(tmp_path):
    source = randomise_(build_segmentor("deeplabv3_r18", flavour="cirkd")).eval()
    reference = to_cirkd_deeplabv3_layout(source.state_dict())
    assert "head.aspp.b4.gap.1.weight" in reference and "auxlayer.block.4.bias" in reference
    path = tmp_path / "deeplabv3_resnet18_citys_best_model.pth"
    torch.save(reference, path)
    loaded = build_segmentor("deeplabv3_r18", flavour="cirkd").eval()
    assert convert.load_weights(loaded, path, "--teacher-ckpt cirkd.pth").name == "CIRKD"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, actual = source(x), loaded(x)
    for key in ("logits", "aux_logits"):
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_load_own_checkpoint_and_inplace_abn_style_checkpoint(tmp_path):
    source = randomise_(build_segmentor("pspnet_r18", flavour="skd"))
    own_path = tmp_path / "ours.pth"
    torch.save(source.state_dict(), own_path)
    loaded = build_segmentor("pspnet_r18", flavour="skd")
    assert convert.load_weights(loaded, own_path, "--teacher-ckpt ours.pth").name == "kd_ref segmentor"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())

    # InPlace-ABN checkpoints have no num_batches_tracked; DataParallel adds "module.".
    skd_layout = {"module." + k.replace("decode_head.classifier.", "head.")
                  .replace("decode_head.branches.", "pspmodule.stages.")
                  .replace("decode_head.bottleneck.", "pspmodule.bottleneck.")
                  .replace("aux_head.classifier.", "dsn.3.").replace("aux_head.block.", "dsn.")
                  .replace("backbone.stem.0.", "conv1.").replace("backbone.stem.1.", "bn1.")
                  .replace("backbone.stem.3.", "conv2.").replace("backbone.stem.4.", "bn2.")
                  .replace("backbone.stem.6.", "conv3.").replace("backbone.stem.7.", "bn3.")
                  .replace("backbone.", ""): v
                  for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    skd_path = tmp_path / "CS_scenes_40000.pth"
    torch.save(skd_layout, skd_path)
    loaded = build_segmentor("pspnet_r18", flavour="skd")
    assert convert.load_weights(loaded, skd_path, "--teacher-ckpt skd.pth").name == "SKD"
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[key], value), key


def test_load_checkpoint_of_another_model_is_one_line(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_segmentor("pspnet_r18", num_classes=21).state_dict(), path)
    with pytest.raises(ValueError, match=r"^r18.pth: a kd_ref segmentor file holding pspnet on a ResNet-18 "
                                         r"\(deep stem 64-64-128\), 21 classes; the recipe expects pspnet on a "
                                         r"ResNet-18 \(deep stem 64-64-128\), 19 classes \(cirkd flavour\)$"):
        convert.load_weights(build_segmentor("pspnet_r18"), path, "r18.pth")
    skd_file = tmp_path / "skd_r18.pth"
    torch.save(build_segmentor("pspnet_r18", flavour="skd").state_dict(), skd_file)
    with pytest.raises(ValueError, match=r"^skd_r18.pth \(kd_ref segmentor\) does not match the model: "
                                         r"\d+ unexpected keys \(e.g. aux_head.block.0.bias\); \d+ shape "
                                         r"mismatches \(e.g. .*\)$"):
        convert.load_weights(build_segmentor("pspnet_r18"), skd_file, "skd_r18.pth")
