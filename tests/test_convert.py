"""kd_ref.convert: released layouts built from the reference codes' module names land where they should,
through load_weights, train.py, evaluate.py and python -m kd_ref.convert; bad files get one line."""
import dataclasses
import hashlib
import json

import pytest
import torch

import evaluate
import train
from kd_ref import classifiers, convert, detectors, segmentors, tasks
from kd_ref.backbones import build_backbone, read_checkpoint
from model_helpers import randomise_
from kd_ref.presets import PRESETS
from kd_ref.recipe import Recipe
from kd_ref.runtime import load_checkpoint

TINY_SEG = ["--set", "synthetic_size=(64, 64)", "--crop", "64", "64", "--set", "synthetic_train=4",
            "--set", "synthetic_val=2", "--batch-size", "2", "--iters", "1", "--quiet", "--device", "cpu"]


def rename(state_dict, pairs):
    """Replace the first matching prefix of each key (pairs: (ours, theirs), most specific first)."""
    renamed = {}
    for key, value in state_dict.items():
        for ours, theirs in pairs:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        renamed[key] = value
    return renamed


def to_mmdet(state_dict, num_laterals):
    """Our detector keys in mmdet 2.x names: ResNet conv1/bn1; FPN and RetinaNet towers wrap each conv in a
    ConvModule (.conv); RetinaNet's P6/P7 convs follow the output convs in fpn_convs; Shared2FCBBoxHead."""
    pairs = [("backbone.stem.0.", "backbone.conv1."), ("backbone.stem.1.", "backbone.bn1."),
             ("head.cls_out.", "bbox_head.retina_cls."), ("head.reg_out.", "bbox_head.retina_reg."),
             ("rpn_head.conv.", "rpn_head.rpn_conv."), ("rpn_head.cls_out.", "rpn_head.rpn_cls."),
             ("rpn_head.reg_out.", "rpn_head.rpn_reg."),
             ("box_head.shared_fcs.1.", "roi_head.bbox_head.shared_fcs.0."),
             ("box_head.shared_fcs.3.", "roi_head.bbox_head.shared_fcs.1."),
             ("box_head.cls_out.", "roi_head.bbox_head.fc_cls."), ("box_head.reg_out.", "roi_head.bbox_head.fc_reg.")]
    for i in range(4):
        pairs += [(f"neck.lateral_convs.{i}.", f"neck.lateral_convs.{i}.conv."),
                  (f"neck.output_convs.{i}.", f"neck.fpn_convs.{i}.conv."),
                  (f"head.cls_convs.{2 * i}.", f"bbox_head.cls_convs.{i}.conv."),
                  (f"head.reg_convs.{2 * i}.", f"bbox_head.reg_convs.{i}.conv.")]
    pairs += [(f"neck.extra_convs.{j}.", f"neck.fpn_convs.{num_laterals + j}.conv.") for j in range(2)]
    return rename(state_dict, pairs)


def to_mmseg(state_dict):
    """Our mmseg-flavour PSPNet keys in mmseg names (PSPHead psp_modules, ConvModule conv/bn, FCNHead)."""
    pairs = [("decode_head.classifier.", "decode_head.conv_seg."),
             ("decode_head.bottleneck.0.", "decode_head.bottleneck.conv."),
             ("decode_head.bottleneck.1.", "decode_head.bottleneck.bn."),
             ("aux_head.block.0.", "auxiliary_head.convs.0.conv."), ("aux_head.block.1.", "auxiliary_head.convs.0.bn."),
             ("aux_head.classifier.", "auxiliary_head.conv_seg.")]
    for i in range(4):
        pairs += [(f"decode_head.branches.{i}.1.", f"decode_head.psp_modules.{i}.1.conv."),
                  (f"decode_head.branches.{i}.2.", f"decode_head.psp_modules.{i}.1.bn.")]
    return rename(state_dict, pairs)


def mmcv_file(path, state_dict):
    torch.save({"meta": {"mmdet_version": "2.25.0", "CLASSES": ("a", "b", "c")}, "state_dict": state_dict}, path)
    return path


def assert_same_weights(model, reference):
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("arch, num_laterals, marker_keys", [
    ("retinanet_r18", 3, ["neck.fpn_convs.4.conv.weight", "bbox_head.cls_convs.3.conv.bias",
                          "bbox_head.retina_cls.weight", "bbox_head.retina_reg.bias"]),
    ("faster_rcnn_r18", 4, ["neck.fpn_convs.3.conv.weight", "rpn_head.rpn_conv.weight", "rpn_head.rpn_reg.bias",
                            "roi_head.bbox_head.shared_fcs.1.weight", "roi_head.bbox_head.fc_reg.bias"]),
])
def test_mmdet_layout_lands_on_every_weight(tmp_path, arch, num_laterals, marker_keys):
    source = randomise_(detectors.build_detector(arch, 20)).eval()
    theirs = to_mmdet(source.state_dict(), num_laterals)
    assert set(marker_keys) <= set(theirs) and not any(k.startswith(("head.", "box_head.")) for k in theirs)
    path = mmcv_file(tmp_path / "mmdet.pth", theirs)
    loaded = detectors.build_detector(arch, 20).eval()
    layout = convert.load_weights(loaded, str(path), "--teacher-ckpt mmdet.pth")
    assert layout.name.startswith("mmdet 2.x")
    assert_same_weights(loaded, source)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, actual = source(images), loaded(images)
    for key in ("cls_logits", "rpn_cls_logits"):
        for want, got in zip(expected.get(key, []), actual.get(key, [])):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_read_checkpoint_takes_a_checkpoint_a_state_dict_or_an_mmcv_file(tmp_path):
    weights = {"module.w": torch.arange(3.0)}
    torch.save({"model": weights, "iteration": 7}, tmp_path / "last.pt")
    torch.save(weights, tmp_path / "plain.pt")
    torch.save({"meta": {"CLASSES": ["a"]}, "state_dict": weights, "optimizer": {}}, tmp_path / "mmcv.pth")
    for name in ("last.pt", "plain.pt", "mmcv.pth"):
        assert torch.equal(read_checkpoint(tmp_path / name)["w"], weights["module.w"])
    torch.save({"w": [1.0]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"^--student-init odd.pt: expected weights \(a state dict of tensors, "
                                         r"or a checkpoint holding one under 'state_dict' or 'model'\), found dict "
                                         r"with keys w$"):
        read_checkpoint(tmp_path / "odd.pt", "--student-init odd.pt")


def test_mismatches_are_one_line_naming_both_sides(tmp_path):
    frcnn = mmcv_file(tmp_path / "frcnn.pth", to_mmdet(detectors.build_detector("faster_rcnn_r18", 20).state_dict(), 4))
    retina_voc = mmcv_file(tmp_path / "retina.pth", to_mmdet(detectors.build_detector("retinanet_r18", 20).state_dict(), 3))
    mmseg = tmp_path / "mmseg.pth"
    torch.save({"state_dict": to_mmseg(segmentors.build_segmentor("pspnet_r18", 19, "mmseg").state_dict())}, mmseg)
    unknown = tmp_path / "unknown.pth"
    torch.save({"encoder.conv.weight": torch.zeros(1)}, unknown)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(frcnn.read_bytes()[:1000])
    cases = [
        (detectors.build_detector("retinanet_r18", 20), frcnn,
         "a mmdet 2.x Faster R-CNN file holding faster_rcnn on a ResNet-18 (7x7 stem), 20 classes; the recipe "
         "expects retinanet on a ResNet-18 (7x7 stem), 20 classes"),
        (detectors.build_detector("retinanet_r18", 80), retina_voc, "20 classes; the recipe expects retinanet on a "
                                                                    "ResNet-18 (7x7 stem), 80 classes"),
        (segmentors.build_segmentor("pspnet_r18", 19), frcnn, "(a det model); the recipe expects pspnet"),
        (segmentors.build_segmentor("pspnet_r18", 19, "cirkd"), mmseg, "for flavour mmseg; the recipe expects "
                                                                       "pspnet on a ResNet-18 (deep stem 64-64-128)"),
        (segmentors.build_segmentor("pspnet_r18", 19), unknown, "a key layout kd_ref does not know (keys encoder"),
        (segmentors.build_segmentor("pspnet_r18", 19), truncated, "cannot be read"),
    ]
    for model, path, message in cases:
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        with pytest.raises(ValueError) as error:
            convert.load_weights(model, str(path), f"--teacher-ckpt {path.name}")
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
        assert str(error.value).startswith(f"--teacher-ckpt {path.name}: ")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_pretrained_takes_the_trunk_of_a_detector_file_and_names_a_wrong_depth(tmp_path):
    source = randomise_(detectors.build_detector("faster_rcnn_r18", 20))
    path = mmcv_file(tmp_path / "frcnn.pth", to_mmdet(source.state_dict(), 4))
    loaded = detectors.build_detector("retinanet_r18", 3, pretrained_backbone=str(path))
    assert_same_weights(loaded.backbone, source.backbone)
    wrong = tmp_path / "resnet34.pth"
    torch.save(randomise_(build_backbone(34, "torchvision", 32)).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"resnet34.pth: holds a ResNet-34 \(7x7 stem\); the model's "
                                         r"torchvision-flavour backbone is a ResNet-18 \(7x7 stem\)$"):
        detectors.build_detector("retinanet_r18", 3, pretrained_backbone=str(wrong))


def to_wrn_layout(state_dict):
    """Our WRN keys in RepDistiller names (blockN.layer.i, convShortcut, final bn1)."""
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0].startswith("block"):
            parts = [parts[0], "layer", parts[1]] + ["convShortcut" if p == "shortcut" else p for p in parts[2:]]
        elif parts[0] == "bn":
            parts[0] = "bn1"
        renamed[".".join(parts)] = value
    return renamed


@pytest.mark.parametrize("task, arch, flavour, make_file", [
    ("seg", "pspnet_r18", "mmseg", lambda m: {"meta": {}, "state_dict": to_mmseg(m.state_dict())}),
    ("det", "retinanet_r18", None, lambda m: {"meta": {}, "state_dict": to_mmdet(m.state_dict(), 3)}),
    ("cls", "wrn_16_1", None, lambda m: {"model": to_wrn_layout(m.state_dict()), "epoch": 240}),
    ("cls", "resnet18", None, lambda m: rename(m.state_dict(), [("backbone.stem.0.", "conv1."),
                                                                ("backbone.stem.1.", "bn1."), ("backbone.", "")])),
])
def test_convert_command_writes_a_checkpoint_in_our_keys(tmp_path, capsys, task, arch, flavour, make_file):
    classes = 5
    source = randomise_(convert.build_model(task, arch, classes, flavour))
    src, dst = tmp_path / "released.pth", tmp_path / "ours.pt"
    torch.save(make_file(source), src)
    assert convert.main(["--task", task, "--arch", arch, str(src), str(dst)]) == 0
    layout = convert.recognise(load_checkpoint(str(dst))["model"], "dst")
    assert layout.name.startswith("kd_ref")
    assert "recognised a" in capsys.readouterr().out
    loaded = convert.build_model(task, arch, classes, flavour)
    convert.load_weights(loaded, str(dst), "--teacher-ckpt ours.pt")
    assert_same_weights(loaded, source)
    assert convert.main(["--task", task, "--arch", arch, str(src), str(dst)]) == 2  # never overwrites
    assert "exists already" in capsys.readouterr().err


def test_evaluate_scores_a_released_file_as_its_kd_ref_twin(tmp_path, monkeypatch):
    name = "synthetic_det_retinanet_teacher"
    monkeypatch.setitem(PRESETS, name, dataclasses.replace(
        PRESETS[name], synthetic_val=2, synthetic_size=(64, 64), image_scale=(64, 64)))
    model = randomise_(detectors.build_detector("retinanet_r18", 3))
    ours = tmp_path / "ours.pt"
    torch.save(model.state_dict(), ours)
    released = mmcv_file(tmp_path / "retinanet_mmdet.pth", to_mmdet(model.state_dict(), 3))
    detections = []
    for path in (ours, released):
        evaluate.main(["--ckpt", str(path), "--preset", name, "--save-pred", str(tmp_path / path.stem),
                       "--out", str(tmp_path / f"{path.stem}.json"), "--quiet", "--device", "cpu"])
        detections.append(json.loads((tmp_path / path.stem / "detections.json").read_text()))
    assert detections[0] and detections[0] == detections[1]
    assert evaluate.run(["--ckpt", str(released), "--quiet"]) == 2  # no recipe and no --preset


def test_train_takes_a_released_teacher_and_a_plain_student_state_dict(tmp_path):
    teacher = randomise_(segmentors.build_segmentor("pspnet_r18", 4, "mmseg"))
    released = tmp_path / "pspnet_mmseg.pth"
    torch.save({"meta": {"CLASSES": list("abcd")}, "state_dict": to_mmseg(teacher.state_dict())}, released)
    as_checkpoint = tmp_path / "teacher_last.pt"
    torch.save({"model": teacher.state_dict()}, as_checkpoint)
    student = tmp_path / "student.pt"
    torch.save(randomise_(segmentors.build_segmentor("pspnet_r18", 4, "mmseg")).state_dict(), student)
    weights = []
    for name, path in (("released", released), ("checkpoint", as_checkpoint)):
        assert train.run(["--method", "kd", "--teacher", "pspnet_r18", "--teacher-ckpt", str(path),
                          "--student-init", str(student), "--set", "flavour=mmseg",
                          "--out", str(tmp_path / name), *TINY_SEG]) == 0
        weights.append(load_checkpoint(str(tmp_path / name / "last.pt"))["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_classifier_pretrained_loads_torchvision_weights_through_the_same_path(tmp_path):
    source = randomise_(classifiers.build_classifier("resnet18", 7))
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(rename(source.state_dict(), [("backbone.stem.0.", "conv1."), ("backbone.stem.1.", "bn1."),
                                            ("backbone.", "")]), path)
    recipe = Recipe(task="cls", num_classes=7)
    assert_same_weights(tasks.ClsTask().build_model(recipe, "resnet18", pretrained=str(path)), source)
    with pytest.raises(ValueError, match=r"^--pretrained .*: a ImageNet ResNet \(torchvision keys\) file holding "
                                         r"ImageNet classifier on a ResNet-18 \(7x7 stem\), 7 classes; the recipe "
                                         r"expects resnet8, 7 classes$"):
        tasks.ClsTask().build_model(recipe, "resnet8", pretrained=str(path))
