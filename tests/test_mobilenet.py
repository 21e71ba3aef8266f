"""kd_ref/mobilenet.py: the MobileNetV2 files of tonylins/pytorch-mobilenet-v2 and of VNL, laid out from
those codes' module names, load through the common --pretrained path; a VNL depth model is refused."""
import pytest
import torch
from torchvision.models import mobilenet_v2

import evaluate
from kd_ref import convert, depth, tasks
from model_helpers import ReferenceFile, put
from kd_ref.recipe import Recipe

# (expand ratio t, channels c, blocks n, stride s) of MobileNetV2, as both codes spell it out
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def tonylins_blocks(file, name_of_block):
    """The stem conv_bn and the 17 InvertedResiduals with their flat ``conv`` Sequential (conv, BN, ReLU6
    triplets; pw, dw, pw-linear, or dw, pw-linear when t = 1); ``name_of_block(k)`` is block k's prefix."""
    file.conv(name_of_block(0) + "0", 32, 3, 3, bias=False)
    file.batch_norm(name_of_block(0) + "1", 32, counter=True)
    block, in_channels = 1, 32
    for t, c, n, _ in SETTINGS:
        for _ in range(n):
            hidden, conv = in_channels * t, name_of_block(block) + "conv."
            positions = [] if t == 1 else [(hidden, in_channels, 1)]
            positions += [(hidden, 1, 3), (c, hidden, 1)]
            for index, (out_channels, per_group_in, kernel) in enumerate(positions):
                file.conv(f"{conv}{3 * index}", out_channels, per_group_in, kernel, bias=False)
                file.batch_norm(f"{conv}{3 * index + 1}", out_channels, counter=True)
            block, in_channels = block + 1, c


def tonylins_imagenet_file():
    """tonylins's ``mobilenet_v2.pth.tar``: a plain state dict with features.0-18 and classifier.1 (1000)."""
    file = ReferenceFile(2)
    tonylins_blocks(file, lambda k: f"features.{k}.")
    file.conv("features.18.0", 1280, 320, 1, bias=False)
    file.batch_norm("features.18.1", 1280, counter=True)
    file.linear("classifier.1", 1000, 1280)
    return file.weights


VNL_STAGES = [("res1", 1), ("res2", 3), ("res3", 3), ("res4", 7), ("res5", 4)]


def vnl_stage_prefix(block):
    """VNL's MobileNetV2 groups the stem and the 17 blocks into res1 (Sequential(conv_bn)) .. res5."""
    if block == 0:
        return "depth_model.encoder_modules.bottomup.res1.0."
    first = 1
    for stage, count in VNL_STAGES[1:]:
        if block < first + count:
            return f"depth_model.encoder_modules.bottomup.{stage}.{block - first}."
        first += count


def vnl_decoder(file):
    """The first modules of VNL's FTB laterals, global-pool top and top-down decoder (lateral_net.py)."""
    file.conv("depth_model.encoder_modules.topdown_lateral_modules.0.lateral.conv1", 128, 320, 1, bias=False)
    file.conv("depth_model.encoder_modules.bottomup_top.globalpool_conv1x1", 128, 320, 1, bias=False)
    file.conv("depth_model.decoder_modules.top.0", 128, 128, 1, bias=False)
    file.conv("depth_model.decoder_modules.topdown_predict.conv1", 60, 64, 3)


def vnl_checkpoint(weights):
    """VNL's save_ckpt: the model's state dict under ``model_state_dict`` next to the training state."""
    return {"step": 1000, "epoch": 10, "model_state_dict": weights, "optimizer": {}, "scheduler": {}}


def place_in_torchvision_by_hand(weights):
    """A torchvision mobilenet_v2 with the tonylins tensors copied module by module."""
    model = mobilenet_v2(weights=None).eval()
    bn = ("weight", "bias", "running_mean", "running_var")
    put(model.features[0][0], weights, "features.0.0", ("weight",))
    put(model.features[0][1], weights, "features.0.1", bn)
    for k in range(1, 18):
        layers = [module for module in model.features[k].conv.modules()
                  if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
        for index, layer in enumerate(layers):  # conv, BN, conv, BN, ... at flat positions 0, 1, 3, 4, 6, 7
            position = 3 * (index // 2) + index % 2
            put(layer, weights, f"features.{k}.conv.{position}", ("weight",) if index % 2 == 0 else bn)
    return model


def test_tonylins_imagenet_file_loads_with_pretrained_and_computes_as_placed_by_hand(tmp_path):
    weights = tonylins_imagenet_file()
    path = tmp_path / "mobilenet_v2.pth.tar"
    torch.save(weights, path)
    recipe = Recipe(task="depth", data="synthetic", num_classes=1)
    model = tasks.DepthTask().build_model(recipe, "depth_mv2", pretrained=str(path)).eval()
    reference = place_in_torchvision_by_hand(weights)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(images)["c5"], reference.features[:18](images), rtol=0, atol=0)


def test_vnl_mobilenet_encoder_loads_with_pretrained_and_the_model_is_refused_elsewhere(tmp_path, capsys):
    file = ReferenceFile(2)  # the same random tensors as the tonylins file, under VNL's names
    tonylins_blocks(file, vnl_stage_prefix)
    vnl_decoder(file)
    path = tmp_path / "vnl_mobilenetv2_nyu.pth"
    torch.save(vnl_checkpoint(file.weights), path)
    backbone = depth.build_depth_encoder("mobilenet_v2", str(path)).eval()
    reference = place_in_torchvision_by_hand(tonylins_imagenet_file())
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images)["c5"], reference.features[:18](images), rtol=0, atol=0)
    model = depth.build_depth_model("depth_mv2")
    with pytest.raises(ValueError, match=r"^--teacher-ckpt vnl_mobilenetv2_nyu.pth: a VNL depth model "
                                         r"\(YvanYin/VNL_Monocular_Depth_Prediction\), whose decoder \(FTB/AFA "
                                         r"blocks, ASPP or global-pool top\) kd_ref's DepthNet does not build; "
                                         r"its MobileNetV2 encoder loads with --pretrained$"):
        convert.load_weights(model, str(path), f"--teacher-ckpt {path.name}")
    assert evaluate.run(["--ckpt", str(path), "--preset", "synthetic_depth_none", "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --ckpt {path}: a VNL depth model") and err.count("\n") == 1


def test_vnl_resnext_model_is_refused_naming_its_encoder():
    file = ReferenceFile(3)  # the released nyu_rawdata.pth: ResNeXt-101 32x4d (ResNeXt.py), first modules
    prefix = "depth_model.encoder_modules.bottomup."
    file.conv(prefix + "res1.conv1", 64, 3, 7, bias=False)
    file.batch_norm(prefix + "res1.bn1", 64, counter=True)
    file.conv(prefix + "res2.0.conv1", 128, 64, 1, bias=False)
    file.conv(prefix + "res2.0.conv2", 128, 4, 3, bias=False)  # 32 groups of 4 channels
    file.conv(prefix + "res2.0.shortcut.conv", 256, 64, 1, bias=False)
    vnl_decoder(file)
    with pytest.raises(ValueError, match=r"^vnl: a VNL depth model .*; its ResNeXt encoder \(32x4d in the released "
                                         r"files\) does not match kd_ref's ResNeXt-101 32x8d either$"):
        convert.load_weights(depth.build_depth_model("depth_x101"), file.weights, "vnl")
