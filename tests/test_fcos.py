"""FCOS: golden cases (depth_fcos 1-2), points, decoding, head sizes, losses, inference, synthetic demo presets."""
import datetime
import math
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd_ref import detectors, methods
from kd_ref.detectors import (build_detector, fcos_centerness_target, fcos_iou_loss, fcos_points, fcos_targets)
from model_helpers import ReferenceFile, count_parameters, place_resnet_by_hand, put
from kd_ref.presets import PRESETS

DATA = os.path.join(os.path.dirname(__file__), "data", "depth_fcos")
GOLDEN_SIZES = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
SMALL_RANGES = ((-1, 16), (16, 32), (32, 64), (64, 128), (128, 1e8))


def load(name):
    return torch.load(os.path.join(DATA, f"{name}.pt"))


@pytest.mark.parametrize("loss_type", ["iou", "linear_iou", "giou"])
def test_iou_losses_match_golden(loss_type):
    case = load("case1_fcos_iou_centerness")
    weighted = fcos_iou_loss(case["pred"], case["target"], weight=case["weight"], loss_type=loss_type)
    plain = fcos_iou_loss(case["pred"], case["target"], loss_type=loss_type)
    torch.testing.assert_close(weighted, case[f"expected_{loss_type}_w"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(plain, case[f"expected_{loss_type}_now"], rtol=1e-6, atol=1e-9)


def test_centerness_target_matches_golden():
    case = load("case1_fcos_iou_centerness")
    torch.testing.assert_close(fcos_centerness_target(case["target"]), case["expected_centerness"],
                               rtol=1e-6, atol=1e-9)


def test_targets_match_golden():
    case = load("case2_fcos_targets")
    points = fcos_points(GOLDEN_SIZES, (8, 16, 32, 64, 128), dtype=torch.float64)
    assert torch.equal(torch.cat(points), case["points"])
    labels, reg = fcos_targets(points, case["gt_boxes"], case["gt_labels"], num_classes=6)
    assert torch.equal(labels, case["expected_labels"])
    assert (labels == 6).any() and (labels < 6).any()
    positive = labels < 6
    torch.testing.assert_close(reg[positive], case["expected_reg_targets"][positive], rtol=1e-9, atol=1e-9)


def test_points_are_cell_centres_row_major():
    level = fcos_points([(2, 3)], (16,))[0]
    assert level.tolist() == [[8, 8], [24, 8], [40, 8], [8, 24], [24, 24], [40, 24]]


def test_center_sampling_keeps_only_points_near_the_centre():
    points = fcos_points([(8, 8)], (8,))
    box = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    labels, _ = fcos_targets(points, box, torch.tensor([0]), 1, ((-1, 1e8),), 0.0, (8,))
    sampled, _ = fcos_targets(points, box, torch.tensor([0]), 1, ((-1, 1e8),), 1.5, (8,))
    assert (labels == 0).sum() == 64
    # centre (32, 32), radius 12: points 24 and 36 on each axis
    assert (sampled == 0).sum() == 4


def test_no_boxes_gives_background_everywhere():
    points = fcos_points([(2, 2)], (8,))
    labels, reg = fcos_targets(points, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 5, ((-1, 1e8),))
    assert labels.tolist() == [5] * 4 and reg.shape == (4, 4)


def test_giou_differs_from_iou_only_when_boxes_do_not_enclose_each_other():
    target = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    inner = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    shifted = torch.tensor([[1.0, 3.0, 3.0, 1.0]])
    assert torch.isclose(fcos_iou_loss(inner, target, loss_type="giou"), fcos_iou_loss(inner, target, loss_type="linear_iou"))
    assert fcos_iou_loss(shifted, target, loss_type="giou") > fcos_iou_loss(shifted, target, loss_type="linear_iou")
    with pytest.raises(ValueError, match="loss_type"):
        fcos_iou_loss(inner, target, loss_type="l1")


@pytest.mark.parametrize("name,channels,expected", [("fcos_r50", 256, 4_920_666), ("fcos_mv2_c128", 128, 1_280_730)])
def test_head_parameter_counts(name, channels, expected):
    model = build_detector(name, 80)
    assert count_parameters(model.head) == expected
    assert model.out_channels["p7"] == channels


def test_mobilenet_student_taps_and_strides():
    model = build_detector("fcos_mv2_c64", 3).eval()
    out = model(torch.zeros(1, 3, 128, 160))
    assert [out["feats"][f"c{i}"].shape[1] for i in (3, 4, 5)] == [32, 96, 320]
    assert [tuple(x.shape[-2:]) for x in out["cls_logits"]] == [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    assert all(p.requires_grad for p in model.backbone.parameters())


def _decoding_model():
    torch.manual_seed(0)
    model = build_detector("fcos_mv2_c64", 2, fcos_options={"sizes_of_interest": SMALL_RANGES}).eval()
    return model


def test_inference_decodes_known_distances():
    model = _decoding_model()
    points = fcos_points([(2, 2)], (8,))
    cls = torch.full((1, 2, 2, 2), -10.0)
    cls[0, 1, 1, 0] = 5.0                                  # location (4, 12), class 1
    reg = torch.ones(1, 4, 2, 2)
    reg[0, :, 1, 0] = torch.tensor([3.0, 2.0, 5.0, 4.0])   # l, t, r, b
    found = model.predict([cls], [reg], [torch.zeros(1, 1, 2, 2)], points, [(16, 16)])[0]
    assert found["labels"].tolist() == [1]
    torch.testing.assert_close(found["boxes"], torch.tensor([[1.0, 10.0, 9.0, 16.0]]))   # y2 clipped to 16
    torch.testing.assert_close(found["scores"], torch.sigmoid(torch.tensor([5.0])) * 0.5)


def test_inference_keeps_at_most_100_sorted():
    model = _decoding_model()
    torch.manual_seed(1)
    model.head.cls_logits.bias.data.fill_(2.0)           # every location above the threshold
    found = model(torch.randn(1, 3, 128, 128))["detections"][0]
    assert 0 < len(found["scores"]) <= 100
    assert torch.all(found["scores"][:-1] >= found["scores"][1:])


@pytest.mark.parametrize("options", [{}, {"center_sampling": 1.5, "iou_loss": "giou", "norm_reg_targets": True,
                                          "centerness_on_reg": True}])
def test_losses_are_finite_and_reach_every_parameter(options):
    torch.manual_seed(0)
    model = build_detector("fcos_mv2_c64", 3, fcos_options={"sizes_of_interest": SMALL_RANGES, **options}).train()
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 70.0, 60.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    out = model(torch.randn(2, 3, 96, 96), targets)
    assert set(out["losses"]) == {"loss_cls", "loss_reg", "loss_centerness"}
    assert all(torch.isfinite(v) for v in out["losses"].values())
    sum(out["losses"].values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# FCOS's normalisers are all-reduced over the ranks; a rank whose images have no positive location must run the
# same collectives as the others. Rank 0 gets an image with a box, rank 1 an empty one.
LOSS_TARGETS = [{"boxes": torch.tensor([[10.0, 12.0, 70.0, 60.0]]), "labels": torch.tensor([2])},
                {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]


def _fcos_losses(ranks: slice) -> dict:
    """FCOS's losses on the images ``ranks`` of a fixed two-image batch (the head's outputs computed in eval
    mode on the whole batch, so that they do not depend on the split)."""
    torch.manual_seed(0)
    model = build_detector("fcos_mv2_c64", 3, fcos_options={"sizes_of_interest": SMALL_RANGES}).eval()
    with torch.no_grad():
        cls_logits, bbox_raw, centerness = model.head(model.pyramid(model.extract_feats(torch.randn(2, 3, 96, 96))))
    cls_logits, bbox_raw, centerness = ([level[ranks] for level in maps] for maps in (cls_logits, bbox_raw, centerness))
    points = fcos_points([tuple(x.shape[-2:]) for x in cls_logits], model.strides, cls_logits[0].dtype, "cpu")
    losses = model.loss(cls_logits, bbox_raw, model.distances(bbox_raw), centerness, points, LOSS_TARGETS[ranks])
    return {name: value.item() for name, value in losses.items()}


def _fcos_loss_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank left waiting on a collective its peer never joins fails after this instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    try:
        torch.save(_fcos_losses(slice(rank, rank + 1)), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_rank_without_positives_keeps_the_normaliser_all_reduces_in_step(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workers = mp.start_processes(_fcos_loss_worker, args=(port, str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 120
    while not workers.join(timeout=1):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two ranks' collectives fell out of step: still waiting after 120 s")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert ranks[0]["loss_reg"] > 0 and ranks[1]["loss_reg"] == 0, "only rank 0 has positives"
    single = _fcos_losses(slice(0, 2))
    for name, value in single.items():  # DDP averages the ranks' gradients, so their losses' mean is the loss
        assert (ranks[0][name] + ranks[1][name]) / 2 == pytest.approx(value, rel=1e-5), name


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="unknown FCOS options"):
        detectors.build_fcos("fcos_mv2_c64", 3, anchors=9)


# ---------------------------------------------------------------------------- SKD on FCOS (skd.py additions)
def test_binary_pixel_wise_kd_zero_nonnegative_detached_and_matches_a_loop():
    from kd_ref.skd import binary_pixel_wise_kd
    generator = torch.Generator().manual_seed(0)
    levels_s = [torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 3, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)]
    levels_t = [torch.randn(s.shape, generator=generator, dtype=torch.float64, requires_grad=True) for s in levels_s]
    assert binary_pixel_wise_kd(levels_s, [s.detach() for s in levels_s]) == 0
    tau = 2.0
    loss = binary_pixel_wise_kd(levels_s, levels_t, tau=tau)
    total, positions = 0.0, 0
    for z_s, z_t in zip(levels_s, levels_t):
        for n in range(z_s.shape[0]):
            for i in range(z_s.shape[2]):
                for j in range(z_s.shape[3]):
                    positions += 1
                    for k in range(z_s.shape[1]):
                        p, q = torch.sigmoid(z_t[n, k, i, j] / tau).item(), torch.sigmoid(z_s[n, k, i, j] / tau).item()
                        total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert loss.item() == pytest.approx(tau ** 2 * total / positions, rel=1e-9) and loss > 0
    loss.backward()
    assert all(t.grad is None for t in levels_t) and all(s.grad is not None for s in levels_s)
    with pytest.raises(ValueError, match="equal shapes"):
        binary_pixel_wise_kd(levels_s, levels_t[:1])


def test_fcos_pair_kernel_bounds_the_graph():
    from kd_ref.skd import fcos_pair_kernel
    assert fcos_pair_kernel(16, 16) == 1
    assert fcos_pair_kernel(100, 136) == 4                 # 25 x 34 = 850 nodes
    assert fcos_pair_kernel(13, 17) == 1


def _to_fcos_code_keys(state_dict):
    """Our FCOS-MNV2 keys renamed as the tianzhi0549/FCOS code names them (the inverse of the loader)."""
    expanding = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"}
    first = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("backbone.features."):
            parts = key.split(".")
            block = parts[2]
            if len(parts) > 4 and parts[3] == "conv":
                tail = parts[-1]
                position = ".".join(parts[4:-1])
                table = first if block == "1" else expanding
                key = f"backbone.body.features.{block}.conv.{table[position]}.{tail}"
            else:
                key = "backbone.body." + key[len("backbone."):]
        elif key.startswith("neck.lateral_convs."):
            index, rest = key[len("neck.lateral_convs."):].split(".", 1)
            key = f"backbone.fpn.fpn_inner{int(index) + 2}.{rest}"
        elif key.startswith("neck.output_convs."):
            index, rest = key[len("neck.output_convs."):].split(".", 1)
            key = f"backbone.fpn.fpn_layer{int(index) + 2}.{rest}"
        elif key.startswith("neck.p"):
            key = "backbone.fpn.top_blocks." + key[len("neck."):]
        else:
            key = "rpn." + key
        renamed[key] = value
    return renamed


def test_fcos_code_checkpoint_loads_through_the_common_path():
    from kd_ref import convert
    source = build_detector("fcos_mv2_c64", 3)
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.dtype.is_floating_point:
                tensor.copy_(torch.randn(tensor.shape))
    released = {key: value for key, value in _to_fcos_code_keys(source.state_dict()).items()
                if not key.endswith("num_batches_tracked")}
    assert "rpn.head.cls_tower.3.weight" in released and "backbone.body.features.2.conv.7.weight" in released
    target = build_detector("fcos_mv2_c64", 3)
    layout = convert.load_weights(target, released, "fcos checkpoint")
    assert layout.name == "FCOS (tianzhi0549/FCOS)"
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(target.state_dict()[key], value), key


def fcos_code_resnet_file(depth, num_classes=80, channels=256):
    """A checkpoint laid out as tianzhi0549/FCOS saves FCOS_imprv_R_{50,101}_FPN_1x (maskrcnn-benchmark
    Checkpointer ``{"model": ...}`` under DDP's ``module.``), written from that code's module names: stem
    conv1/bn1, bottlenecks conv1-3/bn1-3/downsample, FrozenBatchNorm buffers (weight, bias, running_mean,
    running_var), FPN fpn_inner2-4/fpn_layer2-4 on C3-C5, top_blocks p6/p7 on P5, GN towers of
    conv/GN/ReLU, 80 sigmoid classes, one Scale per level. Random values."""
    file = ReferenceFile(depth)
    file.resnet("module.backbone.body.", "module.backbone.body.stem.", depth, counter=False)
    for level, c in ((2, 512), (3, 1024), (4, 2048)):
        file.conv(f"module.backbone.fpn.fpn_inner{level}", channels, c, 1)
        file.conv(f"module.backbone.fpn.fpn_layer{level}", channels, channels, 3)
    for extra in ("p6", "p7"):
        file.conv(f"module.backbone.fpn.top_blocks.{extra}", channels, channels, 3)
    for tower in ("cls_tower", "bbox_tower"):
        for j in range(4):
            file.conv(f"module.rpn.head.{tower}.{3 * j}", channels, channels, 3)
            file.affine(f"module.rpn.head.{tower}.{3 * j + 1}", channels)
    file.conv("module.rpn.head.cls_logits", num_classes, channels, 3)
    file.conv("module.rpn.head.bbox_pred", 4, channels, 3)
    file.conv("module.rpn.head.centerness", 1, channels, 3)
    for level in range(5):
        file.weights[f"module.rpn.head.scales.{level}.scale"] = torch.rand(1, generator=file.generator) + 0.5
    return {"model": file.weights, "iteration": 90000}


IMPRV = {"stride_in_1x1": True, "center_sampling": 1.5, "iou_loss": "giou", "centerness_on_reg": True,
         "norm_reg_targets": True}


def place_by_hand(model, weights):
    """The file's tensors copied into ``model`` module by module (no key map involved)."""
    place_resnet_by_hand(model.backbone, weights, "module.backbone.body.", "module.backbone.body.stem.")
    for index, level in enumerate((2, 3, 4)):
        put(model.neck.lateral_convs[index], weights, f"module.backbone.fpn.fpn_inner{level}")
        put(model.neck.output_convs[index], weights, f"module.backbone.fpn.fpn_layer{level}")
    put(model.neck.p6, weights, "module.backbone.fpn.top_blocks.p6")
    put(model.neck.p7, weights, "module.backbone.fpn.top_blocks.p7")
    for tower in ("cls_tower", "bbox_tower"):
        for j in range(4):
            put(getattr(model.head, tower)[3 * j], weights, f"module.rpn.head.{tower}.{3 * j}")
            put(getattr(model.head, tower)[3 * j + 1], weights, f"module.rpn.head.{tower}.{3 * j + 1}")
    for name in ("cls_logits", "bbox_pred", "centerness"):
        put(getattr(model.head, name), weights, f"module.rpn.head.{name}")
    for level, scale in enumerate(model.head.scales):
        put(scale, weights, f"module.rpn.head.scales.{level}", ("scale",))


@pytest.mark.parametrize("depth", [50, 101])
def test_fcos_code_resnet_checkpoint_loads_strictly_and_predicts_as_placed_by_hand(tmp_path, depth):
    from kd_ref import convert
    path = tmp_path / f"FCOS_imprv_R_{depth}_FPN_1x.pth"
    torch.save(fcos_code_resnet_file(depth), path)
    weights = torch.load(path)["model"]
    loaded = build_detector(f"fcos_r{depth}", 80, fcos_options=IMPRV).eval()
    layout = convert.load_weights(loaded, str(path), f"--teacher-ckpt {path.name}")
    assert layout.name == "FCOS (tianzhi0549/FCOS)"
    if depth == 101:  # one forward (the 50 case) shows where each tensor lands; here: every key, strictly
        return
    by_hand = build_detector("fcos_r50", 80, fcos_options=IMPRV).eval()
    place_by_hand(by_hand, weights)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected, actual = by_hand(images), loaded(images)
    for key in ("cls_logits", "bbox_preds", "centerness"):
        for want, got in zip(expected[key], actual[key]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    stride_in_3x3 = build_detector("fcos_r50", 80).eval()
    with pytest.raises(ValueError) as error:
        convert.load_weights(stride_in_3x3, str(path), f"--teacher-ckpt {path.name}")
    assert str(error.value) == (
        f"--teacher-ckpt {path.name}: an FCOS-code ResNet file, whose bottlenecks stride in their 1x1 conv; the "
        "recipe's fcos on a ResNet-50 (7x7 stem) with a 256-channel head, 80 classes strides in the 3x3 conv "
        "(--set \"model_options={'stride_in_1x1': True}\")")


def test_fcos_code_files_are_evaluated_on_the_codes_input_statistics_and_refused_on_others(tmp_path, monkeypatch,
                                                                                           capsys):
    import dataclasses
    import evaluate
    from kd_ref import convert
    name = "synthetic_det_fcos_teacher"
    preset = dataclasses.replace(PRESETS[name], student="fcos_r50", synthetic_val=2,
                                 synthetic_size=(64, 64), image_scale=(64, 64))
    monkeypatch.setitem(PRESETS, name, preset)
    monkeypatch.setitem(PRESETS, "caffe2", dataclasses.replace(preset, normalization="caffe2_bgr"))
    resnet_file = {key.removeprefix("module."): value
                   for key, value in fcos_code_resnet_file(50, num_classes=preset.num_classes)["model"].items()}
    recipe = convert.recipe_for_file(preset, resnet_file, "--ckpt r50.pth")
    assert recipe.normalization == "caffe2_bgr" and preset.normalization == "imagenet_rgb"
    assert recipe.model_options == {**preset.model_options, "stride_in_1x1": True}
    mobilenet_file = _to_fcos_code_keys(build_detector("fcos_mv2_c64", 3).state_dict())
    assert convert.recipe_for_file(preset, mobilenet_file, "mv2").normalization == "caffe2_bgr"
    assert convert.recipe_for_file(preset, build_detector("fcos_r50", 3).state_dict(), "ours") == preset
    path = tmp_path / "FCOS_imprv_R_50_FPN_1x.pth"
    torch.save({"model": resnet_file}, path)
    flags = ["--ckpt", str(path), "--quiet", "--device", "cpu", "--out", str(tmp_path / "scores.json")]
    assert evaluate.run([*flags, "--preset", name]) == 2
    assert capsys.readouterr().err == (f"error: --ckpt {path}: its code trains on caffe2_bgr inputs, --preset {name} "
                                       "feeds normalization=imagenet_rgb; pass a preset on caffe2_bgr\n")
    scores = evaluate.main([*flags, "--preset", "caffe2"])
    assert "AP" in " ".join(scores)
    assert f"--ckpt {path}: run with the model options {{" in capsys.readouterr().out


def test_fcos_paper_rows_train_on_the_fcos_codes_caffe2_statistics():
    # maskrcnn_benchmark/config/defaults.py INPUT.PIXEL_MEAN / PIXEL_STD / TO_BGR255, which every FCOS config keeps
    rows = [name for name, recipe in PRESETS.items() if recipe.data == "coco" and "fcos" in recipe.student]
    assert len(rows) == 4 and all(PRESETS[name].normalization == "caffe2_bgr" for name in rows)
    from kd_ref import transforms
    assert transforms.NORMALIZATIONS["caffe2_bgr"] == {"bgr": True, "mean": (102.9801, 115.9465, 122.7717),
                                                       "std": (1.0, 1.0, 1.0)}


def test_train_refuses_a_teacher_trained_on_other_input_statistics_before_any_work(tmp_path, capsys):
    import dataclasses
    import train
    code_file, ours = tmp_path / "fcos_mv2.pth", tmp_path / "last.pt"
    torch.save({"model": _to_fcos_code_keys(build_detector("fcos_mv2_c64", 3).state_dict())}, code_file)
    recipe = PRESETS["synthetic_det_fcos_skd"]  # ImageNet RGB inputs
    torch.save({"format_version": 1, "recipe": {**dataclasses.asdict(recipe), "normalization": "caffe2_bgr"},
                "model": build_detector("fcos_mv2_c64", 3).state_dict()}, ours)
    for path, trained_on in ((code_file, "caffe2_bgr"), (ours, "caffe2_bgr")):
        argv = ["--preset", "synthetic_det_fcos_skd", "--teacher-ckpt", str(path), "--out", str(tmp_path / "run")]
        assert train.run(argv) == 2
        assert capsys.readouterr().err == (
            f"error: --teacher-ckpt {path}: the teacher was trained on {trained_on} inputs, the recipe feeds "
            f"normalization=imagenet_rgb; the teacher sees the student's inputs, so train on its statistics "
            f"(--set normalization={trained_on}) or pass a teacher trained on imagenet_rgb\n")
        assert not (tmp_path / "run").exists()  # refused before the run folder, models or data
    # the synthetic teacher it would train first runs on its own preset's statistics
    assert train.run(["--preset", "synthetic_det_fcos_skd", "--set", "normalization=caffe2_bgr",
                      "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("error: normalization=caffe2_bgr: the synthetic teacher "
                                       "(synthetic_det_fcos_teacher) trains on imagenet_rgb inputs and sees the "
                                       "student's; pass --teacher-ckpt\n")


def test_convert_command_writes_an_fcos_code_resnet_file_with_its_stride_in_1x1(tmp_path, capsys):
    import dataclasses
    from kd_ref import convert
    from kd_ref.runtime import load_checkpoint
    src, dst = tmp_path / "FCOS_imprv_R_50_FPN_1x.pth", tmp_path / "fcos_r50.pt"
    torch.save(fcos_code_resnet_file(50), src)
    assert convert.main(["--task", "det", "--arch", "fcos_r50", str(src), str(dst)]) == 0
    assert "recognised a FCOS (tianzhi0549/FCOS) file" in capsys.readouterr().out
    loaded = build_detector("fcos_r50", 80, fcos_options={"stride_in_1x1": True})
    convert.load_weights(loaded, load_checkpoint(str(dst))["model"], "ours")
    weights = torch.load(src)["model"]
    assert torch.equal(loaded.backbone.layer3[0].conv1.weight, weights["module.backbone.body.layer3.0.conv1.weight"])
    written = load_checkpoint(str(dst))  # its keys are ours; its layout entry keeps the code's options
    r50_preset = dataclasses.replace(PRESETS["synthetic_det_fcos_teacher"], student="fcos_r50")
    recipe = convert.recipe_for_file(r50_preset, written["model"], "dst", written["layout"])
    assert recipe.normalization == "caffe2_bgr" and recipe.model_options["stride_in_1x1"]


# ------------------------------------------------------------------------------------ synthetic demo
@pytest.mark.parametrize("method", ["none", "skd", "dist", "gdd"])
def test_synthetic_fcos_demo_presets_check_and_train_their_teacher_first(method):
    recipe = PRESETS[f"synthetic_det_fcos_{method}"]
    methods.check_recipe(recipe)
    teacher = PRESETS[recipe.teacher_preset]
    methods.check_recipe(teacher)
    assert teacher.student == recipe.teacher and teacher.teacher is None and teacher.iters > recipe.iters
