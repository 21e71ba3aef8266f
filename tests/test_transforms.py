import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_ref import transforms as T
from kd_ref.presets import PRESETS


def rng(seed=0):
    return np.random.default_rng(seed)


def finished(transform, image, label, generator=None):
    """A seg transform's sample after its device half (``seg_device_inputs`` on a batch of one)."""
    window, label_window, geometry = transform(image, label, generator)
    images, targets = T.seg_device_inputs(window[None], label_window[None], [geometry], transform.normalization)
    return images[0], targets[0]


def test_normalizations_hand_values():
    image = np.zeros((1, 2, 3), np.uint8)
    image[0, 0] = (124, 116, 104)
    image[0, 1] = (255, 0, 10)
    rgb = T.normalize(T.to_tensor(image), "imagenet_rgb")
    assert rgb[:, 0, 0].tolist() == pytest.approx([(124 - 123.675) / 58.395, (116 - 116.28) / 57.12,
                                                   (104 - 103.53) / 57.375], abs=1e-6)
    bgr = T.normalize(T.to_tensor(image), "bgr_mean")  # channel 0 is blue, no std
    assert bgr[:, 0, 1].tolist() == pytest.approx([10 - 104.00698793, 0 - 116.66876762, 255 - 122.67891434], abs=1e-4)
    cifar = T.normalize(T.to_tensor(image), "cifar100")
    assert cifar[0, 0, 1].item() == pytest.approx((255 - 0.5071 * 255) / (0.2675 * 255), abs=1e-5)
    with pytest.raises(ValueError, match="normalization 'rgb'.*bgr_mean"):
        T.normalize(T.to_tensor(image), "rgb")
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        T.to_tensor(np.zeros((4, 4), np.uint8))


def test_draw_scale_discrete_set_and_continuous_range():
    generator = rng()
    draws = {round(T.draw_scale(generator, (0.5, 2.0)), 6) for _ in range(600)}
    assert draws == {round(0.5 + k / 10, 6) for k in range(16)}  # CIRKD: 0.5 + k/10, k = 0..15
    values = [T.draw_scale(generator, (0.5, 1.6), step=None) for _ in range(200)]
    assert 0.5 <= min(values) and max(values) <= 1.6 and len(set(values)) == 200
    with pytest.raises(ValueError, match="scales"):
        T.draw_scale(generator, (2.0, 0.5))


def test_seg_crop_pads_image_with_zero_and_label_with_255():
    image = np.full((20, 24, 3), 200, np.uint8)
    label = np.full((20, 24), 3, np.uint8)
    transform = T.SegTrainTransform(crop=(32, 40), scales=(1.0, 1.0), normalization="imagenet_rgb", flip_prob=0)
    out_image, out_label = finished(transform, image, label, rng())
    assert out_image.shape == (3, 32, 40) and out_label.shape == (32, 40) and out_label.dtype == torch.int64
    assert (out_label[:20, :24] == 3).all() and (out_label[20:] == 255).all() and (out_label[:, 24:] == 255).all()
    assert (out_image[:, 20:] == 0).all() and (out_image[:, :, 24:] == 0).all()
    assert out_image[0, 0, 0].item() == pytest.approx((200 - 123.675) / 58.395)


def test_seg_padding_stays_bottom_right_after_flip():
    image, label = np.zeros((10, 12, 3), np.uint8), np.zeros((10, 12), np.uint8)
    label[:, 0] = 5
    transform = T.SegTrainTransform(crop=(16, 16), scales=(1.0, 1.0), flip_prob=1.0)
    _, out = finished(transform, image, label, rng())
    assert (out[:10, 11] == 5).all() and (out[:10, :11] == 0).all() and (out[:, 12:] == 255).all()


def test_hsv_round_trip_and_photometric_distortion():
    image = torch.rand(3, 6, 7) * 255
    image[:, 0, 0] = 0.0
    assert torch.allclose(T.hsv_to_rgb(*T.rgb_to_hsv(image)), image, atol=1e-3)
    red = torch.tensor([255.0, 0.0, 0.0]).view(3, 1, 1)
    hue, saturation, value = T.rgb_to_hsv(red)
    assert (hue.item(), saturation.item(), value.item()) == (0.0, 1.0, 255.0)
    assert T.hsv_to_rgb(hue + 120, saturation, value).flatten().tolist() == pytest.approx([0, 255, 0], abs=1e-4)
    distort = T.PhotoMetricDistortion()
    outputs = [distort(image, rng(seed)) for seed in range(20)]
    assert all(o.shape == image.shape and o.min() >= 0 and o.max() <= 255 for o in outputs)
    assert sum(not torch.allclose(o, image) for o in outputs) > 10
    assert torch.equal(distort(image, rng(3)), outputs[3])
    plain = T.SegTrainTransform((6, 7), (1.0, 1.0), flip_prob=0, photometric=True)
    assert finished(plain, np.zeros((6, 7, 3), np.uint8), np.zeros((6, 7), np.uint8), rng())[0].shape == (3, 6, 7)


def test_seg_scale_keeps_label_values_and_size():
    label = rng(1).choice(np.array([0, 3, 7, 255], np.uint8), size=(30, 40))
    image = rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    transform = T.SegTrainTransform(crop=(10, 10), scales=(2.0, 2.0), flip_prob=0)
    for seed in range(5):
        _, out = finished(transform, image, label, rng(seed))
        assert set(out.unique().tolist()) <= {0, 3, 7, 255}
    big = T.resize_label(torch.from_numpy(label.astype(np.int64)), (60, 80))
    assert torch.equal(big[::2, ::2], torch.from_numpy(label.astype(np.int64)))  # x2 nearest copies pixels


def test_seg_flip_moves_image_and_label_together_and_is_reproducible():
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, :4] = 255
    label = np.zeros((16, 16), np.uint8)
    label[:, :4] = 1
    transform = T.SegTrainTransform(crop=(16, 16), scales=(1.0, 1.0), normalization="bgr_mean", flip_prob=1.0)
    out_image, out_label = finished(transform, image, label, rng())
    assert (out_label[:, 12:] == 1).all() and (out_label[:, :12] == 0).all()
    assert (out_image[:, :, 12:] > 100).all() and (out_image[:, :, :12] < 0).all()
    random_transform = T.SegTrainTransform(crop=(12, 12), scales=(0.5, 2.0))
    first, second = random_transform(image, label, rng(5)), random_transform(image, label, rng(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2] == second[2]


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    label = np.zeros((10, 100), np.uint8)
    label[:, 90:] = 1  # only crops near the right edge hold two classes
    image = np.zeros((10, 100, 3), np.uint8)
    transform = T.SegTrainTransform(crop=(10, 20), scales=(1.0, 1.0), flip_prob=0, cat_max_ratio=0.75)
    mixed = sum(len(finished(transform, image, label, rng(seed))[1].unique()) == 2 for seed in range(40))
    plain = T.SegTrainTransform(crop=(10, 20), scales=(1.0, 1.0), flip_prob=0)
    assert mixed > sum(len(finished(plain, image, label, rng(seed))[1].unique()) == 2 for seed in range(40))


def resize_then_crop(transform, image, label, rng):
    """The seg training pipeline as the references write it: resize the whole image and label, then draw
    the crop (and its cat_max_ratio re-draws) on the resized label."""
    image, label = T.to_tensor(image), torch.from_numpy(label.astype(np.int64))
    scale = T.draw_scale(rng, transform.scales, transform.scale_step)
    size = (max(1, round(label.shape[0] * scale)), max(1, round(label.shape[1] * scale)))
    image, label = T.resize_image(image, size), T.resize_label(label, size)
    crop_h, crop_w = transform.crop
    for _ in range(10 if transform.cat_max_ratio else 1):
        top, left = int(rng.integers(max(size[0] - crop_h, 0) + 1)), int(rng.integers(max(size[1] - crop_w, 0) + 1))
        window = label[top:top + crop_h, left:left + crop_w]
        counts = torch.bincount(window[window != 255].flatten())
        counts = counts[counts > 0]
        if not transform.cat_max_ratio or (len(counts) > 1 and counts.max() / counts.sum() < transform.cat_max_ratio):
            break
    image, label = image[:, top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w]
    if rng.random() < transform.flip_prob:
        image, label = image.flip(-1), label.flip(-1)
    image = T.pad_bottom_right(T.normalize(image, transform.normalization), transform.crop, 0.0)
    return image, T.pad_bottom_right(label, transform.crop, 255)


def test_seg_crop_first_resampling_equals_resize_then_crop():
    generator = rng(7)
    for case in range(60):
        height, width = (int(v) for v in generator.integers(3, 90, 2))
        crop = tuple(int(v) for v in generator.integers(2, 70, 2))
        scales = tuple(sorted(generator.uniform(0.2, 3.0, 2)))
        transform = T.SegTrainTransform(crop, scales, "bgr_mean", scale_step=None if case % 2 else 0.1,
                                        cat_max_ratio=0.75 if case % 3 else None)
        image = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        label = generator.choice(np.array([0, 1, 2, 255], np.uint8), size=(height, width), p=[0.7, 0.1, 0.1, 0.1])
        ours = finished(transform, image, label, rng(case))
        reference = resize_then_crop(transform, image, label, rng(case))
        assert torch.equal(ours[1], reference[1]), case  # labels exactly, re-draws included
        assert (ours[0] - reference[0]).abs().max() < 1e-2, case  # bgr_mean has no std: 1/100 of a level


def former_seg_pipeline(transform, image, label, rng):
    """The all-in-worker seg training pipeline as it was before its flip and normalisation moved to the
    device: window resampling, flip, photometric distortion, normalisation, padding, int64 labels."""
    label = torch.from_numpy(label)
    scale = T.draw_scale(rng, transform.scales, transform.scale_step)
    size = (max(1, round(label.shape[0] * scale)), max(1, round(label.shape[1] * scale)))
    window = transform._crop_window(label, size, rng)
    image = T.resized_window(torch.from_numpy(image).permute(2, 0, 1), size, window)
    label = T.resized_label_window(label, size, window).long()
    if rng.random() < transform.flip_prob:
        image, label = image.flip(-1), label.flip(-1)
    if transform.photometric is not None:
        image = transform.photometric(image, rng)
    image = T.pad_bottom_right(T.normalize(image, transform.normalization), transform.crop, 0.0)
    return image, T.pad_bottom_right(label, transform.crop, 255)


def test_seg_device_half_is_bit_identical_to_the_former_worker_pipeline():
    generator = rng(11)
    flips = padded = 0
    for case in range(40):
        height, width = (int(v) for v in generator.integers(8, 40, 2))
        transform = T.SegTrainTransform(tuple(int(v) for v in generator.integers(4, 30, 2)), (0.3, 2.0),
                                        ("bgr_mean", "imagenet_rgb")[case % 2], scale_step=None if case % 3 else 0.1,
                                        cat_max_ratio=0.75 if case % 4 else None, photometric=case % 2 == 1)
        image = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        label = generator.choice(np.array([0, 1, 2, 255], np.uint8), size=(height, width))
        window, label_window, geometry = transform(image, label, rng(case))
        assert label_window.dtype == torch.uint8 and window.dtype == torch.float32
        assert (label_window[geometry["size"][0]:] == 255).all() and (label_window[:, geometry["size"][1]:] == 255).all()
        ours = finished(transform, image, label, rng(case))
        reference = former_seg_pipeline(transform, image, label, rng(case))
        assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1]), case
        flips += geometry["flipped"]
        padded += geometry["size"] != transform.crop
    assert 0 < flips < 40 and padded > 0  # both branches of the device half ran


def test_seg_label_map_on_the_windows_equals_mapping_the_whole_label_first():
    table = np.full(256, 255, np.uint8)
    table[[7, 8, 26]] = (0, 0, 1)  # 7 and 8 are one class: a window of both is dominated by it (cat_max_ratio)
    generator = rng(4)
    for case in range(30):
        transform = T.SegTrainTransform((12, 16), (0.5, 2.0), cat_max_ratio=0.75 if case % 2 else None,
                                        photometric=case % 3 == 0)
        image = generator.integers(0, 256, (20, 30, 3), dtype=np.uint8)
        ids = generator.choice(np.array([0, 7, 8, 26], np.uint8), size=(20, 30), p=[0.1, 0.4, 0.4, 0.1])
        mapped_first, mapped_windows = transform(image, table[ids], rng(case)), transform(image, ids, rng(case), table)
        assert all(torch.equal(a, b) for a, b in zip(mapped_first[:2], mapped_windows[:2])) and mapped_first[2] == mapped_windows[2]
    evaluation = T.SegEvalTransform()(image, ids, None, table)
    assert torch.equal(evaluation[1], torch.from_numpy(table[ids])) and T.map_labels(evaluation[1], None) is evaluation[1]


def test_seg_device_inputs_leave_the_collated_batch_untouched():
    images, labels = torch.rand(2, 3, 4, 5) * 255, torch.randint(0, 3, (2, 4, 5), dtype=torch.uint8)
    before = images.clone(), labels.clone()
    geometry = [{"size": (4, 5), "flipped": True}, {"size": (3, 2), "flipped": True}]
    inputs, targets = T.seg_device_inputs(images, labels, geometry, "bgr_mean")
    assert torch.equal(images, before[0]) and torch.equal(labels, before[1]) and targets.dtype == torch.int64
    assert torch.equal(targets[0], labels[0].flip(-1).long()) and torch.equal(targets[1, :3, :2], labels[1, :3, :2].flip(-1).long())
    assert torch.equal(targets[1, 3:], labels[1, 3:].long()) and (inputs[1, :, 3:] == 0).all() and (inputs[1, :, :, 2:] == 0).all()
    assert torch.equal(inputs[1, :, :3, :2], T.normalize(images[1, :, :3, :2].flip(-1), "bgr_mean"))
    distortion = T.PhotoMetricDistortion().draw(rng(5))
    geometry[0]["photometric"] = distortion  # distorted in place on a copy: the batch stays as it was
    inputs, _ = T.seg_device_inputs(images, labels, geometry, "bgr_mean")
    assert torch.equal(images, before[0])
    assert torch.equal(inputs[0], T.normalize(T.PhotoMetricDistortion.apply(images[0], distortion).flip(-1), "bgr_mean"))


def test_photometric_draws_follow_mmseg_order_whatever_the_image():
    """brightness (flag, delta), contrast-first flag, [contrast (flag, alpha)], saturation (flag, factor),
    hue (flag, shift), [contrast last]: a replay of that stream gives the same parameters."""
    distortion = T.PhotoMetricDistortion()
    for seed in range(30):
        replay, params = rng(seed), distortion.draw(rng(seed))
        brightness = replay.uniform(-32, 32) if replay.integers(2) else None
        first = bool(replay.integers(2))
        contrast = (replay.uniform(0.5, 1.5) if replay.integers(2) else None) if first else None
        saturation = replay.uniform(0.5, 1.5) if replay.integers(2) else None
        hue = 2 * int(replay.integers(-18, 18)) if replay.integers(2) else None
        contrast = (replay.uniform(0.5, 1.5) if replay.integers(2) else None) if not first else contrast
        assert params == {"brightness": brightness, "contrast_first": first, "contrast": contrast,
                          "saturation": saturation, "hue": hue}, seed
    image = torch.rand(3, 5, 6) * 255
    assert torch.equal(distortion(image, rng(9)), T.PhotoMetricDistortion.apply(image, distortion.draw(rng(9))))


def test_resized_window_matches_interpolate_on_downscales_and_edges():
    generator = rng(3)
    for _ in range(40):
        source = torch.from_numpy(generator.integers(0, 256, (3, *generator.integers(1, 40, 2)), dtype=np.uint8))
        size = tuple(int(v) for v in generator.integers(1, 60, 2))
        full = T.resize_image(source.float(), size)
        full_label = T.resize_label(source[0], size)
        top, left = (int(generator.integers(side)) for side in size)
        window = (top, left, int(generator.integers(1, size[0] - top + 1)), int(generator.integers(1, size[1] - left + 1)))
        crop = (slice(window[0], window[0] + window[2]), slice(window[1], window[1] + window[3]))
        assert torch.allclose(T.resized_window(source, size, window), full[:, crop[0], crop[1]], atol=1e-2)
        assert torch.equal(T.resized_label_window(source[0], size, window), full_label[crop])


def test_seg_eval_transform_keeps_whole_image():
    image, label = np.zeros((7, 9, 3), np.uint8), np.full((7, 9), 255, np.uint8)
    out_image, out_label = finished(T.SegEvalTransform("imagenet_rgb"), image, label)
    assert out_image.shape == (3, 7, 9) and out_label.shape == (7, 9) and (out_label == 255).all()
    assert torch.equal(out_image, T.normalize(T.to_tensor(image), "imagenet_rgb")) and out_label.dtype == torch.int64


def test_det_multiscale_value_range_and_single_scale_draws_nothing():
    image, boxes = np.zeros((100, 150, 3), np.uint8), np.array([[10, 10, 50, 40]], np.float32)
    value = T.DetTransform((1333, 800), flip_prob=0.0, scales=((300, 200), (300, 100)))
    assert {value(image, boxes, rng(seed))[3]["size"] for seed in range(30)} == {(200, 300), (100, 150)}
    ranged = T.DetTransform(flip_prob=0.0, scales=((400, 60), (400, 90)), multiscale_mode="range")
    short_sides = {ranged(image, boxes, rng(seed))[3]["size"][0] for seed in range(60)}
    assert min(short_sides) >= 60 and max(short_sides) <= 90 and len(short_sides) > 10
    generator = rng(4)  # mmdet 'range': long side, then short side, each over the integers of the bounds
    long_side, short_side = int(generator.integers(400, 401)), int(generator.integers(60, 91))
    assert ranged(image, boxes, rng(4))[3]["size"] == T.rescale_size(100, 150, (long_side, short_side))[0]
    single, plain = T.DetTransform((300, 200), scales=((300, 200),)), T.DetTransform((300, 200))
    first, second = single(image, boxes, rng(9)), plain(image, boxes, rng(9))
    assert torch.equal(first[0], second[0]) and first[3] == second[3]
    with pytest.raises(ValueError, match="multiscale_mode 'range' takes two"):
        T.DetTransform(scales=((300, 200),), multiscale_mode="range")
    with pytest.raises(ValueError, match="multiscale_mode 'random'"):
        T.DetTransform(multiscale_mode="random")


def test_resize_uint8_is_within_one_level_of_the_float_resize():
    generator = rng(11)
    for antialias in (False, True):
        for _ in range(10):
            image = generator.integers(0, 256, (*generator.integers(5, 60, 2), 3), dtype=np.uint8)
            size = tuple(int(v) for v in generator.integers(3, 90, 2))
            reference = T.resize_image(T.to_tensor(image), size, antialias=antialias)
            resized = T.resize_uint8(image, size, antialias)
            assert resized.dtype == torch.uint8 and resized.shape == (3, *size)
            assert (resized - reference).abs().max() < 1.001  # rounding + fixed-point weights
            # the resize of devices without a uint8 kernel: the float one, rounded
            rounded = T.rounded_float_resize(T.pixels(image)[None], size, antialias)[0]
            assert rounded.dtype == torch.uint8 and (rounded.float() - resized.float()).abs().max() <= 1
    assert torch.equal(T.resize_uint8(image, image.shape[:2]), T.pixels(image))  # same size: untouched
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        T.resize_uint8(image.astype(np.float32), (4, 4))


def test_rescale_size_follows_mmcv_imrescale():
    assert T.rescale_size(480, 640, (1333, 800)) == ((800, 1067), pytest.approx(800 / 480))
    assert T.rescale_size(500, 2000, (1333, 800)) == ((333, 1333), pytest.approx(1333 / 2000))


def test_flip_boxes_by_hand_and_involution():
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    assert T.flip_boxes(boxes, 100).tolist() == [[70.0, 5.0, 90.0, 25.0]]
    assert torch.equal(T.flip_boxes(T.flip_boxes(boxes, 100), 100), boxes)


def det_inputs(transform_output, normalization="imagenet_rgb"):
    """One transformed sample through the device half, as a batch of one."""
    pixels, _, _, meta = transform_output
    return T.device_inputs(pixels[None], [meta], normalization, size_divisor=32)[0]


def test_det_transform_scales_flips_and_maps_back():
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:20, 5:25] = 255
    boxes = np.array([[5, 10, 25, 20]], np.float32)
    masks = np.zeros((1, 40, 60), bool)
    masks[0, 10:20, 5:25] = True
    plain = T.DetTransform(scale=(120, 80), flip_prob=0.0)
    out, out_boxes, out_masks, meta = plain(image, boxes, None, masks)
    assert out.dtype == torch.uint8 and torch.equal(out, T.pixels(image))  # the CPU half does not resize
    assert meta["size"] == (80, 120) and meta["scale_factor"] == 2.0
    assert det_inputs((out, out_boxes, out_masks, meta)).shape == (3, 96, 128)  # padded to 32
    assert out_boxes.tolist() == [[10.0, 20.0, 50.0, 40.0]]
    assert out_masks.shape == (1, 80, 120) and out_masks[0, 20:40, 10:50].all() and out_masks.sum() == 800
    assert torch.allclose(T.boxes_to_original(out_boxes, meta), torch.from_numpy(boxes))
    flipping = T.DetTransform((120, 80), flip_prob=1.0)(image, boxes, rng(), masks)
    _, flipped_boxes, flipped_masks, meta = flipping
    assert meta["flipped"] and flipped_boxes.tolist() == [[70.0, 20.0, 110.0, 40.0]]
    assert flipped_masks[0, 20:40, 70:110].all() and flipped_masks.sum() == 800
    flipped = det_inputs(flipping)
    bright = flipped[0] > 1.0  # the white patch, normalised: where the flipped box and mask are
    cols, rows = torch.nonzero(bright.any(0)).flatten(), torch.nonzero(bright.any(1)).flatten()
    assert (cols.min().item(), cols.max().item(), rows.min().item(), rows.max().item()) == (70, 109, 20, 39)
    assert (flipped[:, 80:] == 0).all() and (flipped[:, :, 120:] == 0).all()


def former_det_input(image, meta, normalization):
    """The all-in-worker pipeline this repository ran before the device half: uint8 resize, float,
    normalise, flip."""
    tensor = T.normalize(T.resize_uint8(image, meta["size"]).float(), normalization)
    return tensor.flip(-1) if meta["flipped"] else tensor


@pytest.mark.parametrize("normalization", ["imagenet_rgb", "caffe2_bgr"])
def test_detection_device_inputs_equal_the_former_float_pipeline_with_exact_zero_padding(normalization):
    from kd_ref import datasets

    generator = rng(5)
    images = [generator.integers(0, 256, shape, dtype=np.uint8) for shape in ((30, 50, 3), (44, 26, 3), (21, 21, 3))]
    transform = T.DetTransform((90, 60), flip_prob=0.5, normalization=normalization)
    samples = []
    for seed, image in enumerate(images):
        pixels, boxes, _, meta = transform(image, np.zeros((0, 4), np.float32), rng(seed))
        samples.append({"image": pixels, "target": meta})
    assert {sample["target"]["flipped"] for sample in samples} == {False, True}
    batch = datasets.collate_det(samples)
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (3, 3, 44, 50)
    inputs = T.device_inputs(batch["images"], batch["targets"], normalization, size_divisor=32)
    assert inputs.shape == (3, 3, 96, 96) and inputs.is_contiguous()
    for index, (image, sample) in enumerate(zip(images, samples)):
        height, width = sample["target"]["size"]
        assert batch["image_sizes"][index] == (height, width)
        assert torch.equal(inputs[index, :, :height, :width], former_det_input(image, sample["target"], normalization))
        padding = torch.ones_like(inputs[index], dtype=torch.bool)
        padding[:, :height, :width] = False
        assert (inputs[index][padding] == 0).all() and not torch.signbit(inputs[index][padding]).any()
    with pytest.raises(ValueError, match=r"images: expected a collated uint8 \(B, 3, H, W\) batch, got torch.float32"):
        T.device_inputs(inputs, batch["targets"], normalization)


def former_cls_input(transform, image, seed):
    """The all-in-worker classification pipelines this repository ran before the device half."""
    generator = rng(seed)
    if isinstance(transform, T.RandomResizedCropFlip):
        top, left, h, w = transform._window(image.shape[0], image.shape[1], generator)
        tensor = T.resize_uint8(image[top:top + h, left:left + w], (transform.size,) * 2, antialias=True).float()
    else:
        tensor = F.pad(T.to_tensor(image), (transform.padding,) * 4, value=0.0)
        tensor = T.pad_bottom_right(tensor, transform.size, 0.0)
        top = int(generator.integers(tensor.shape[1] - transform.size[0] + 1))
        left = int(generator.integers(tensor.shape[2] - transform.size[1] + 1))
        tensor = tensor[:, top:top + transform.size[0], left:left + transform.size[1]]
    tensor = tensor.flip(-1) if generator.random() < 0.5 else tensor
    return T.normalize(tensor, transform.normalization)


@pytest.mark.parametrize("transform", [T.RandomResizedCropFlip(64), T.RandomResizedCropFlip(8),
                                       T.PadCropFlip(32, 4, "cifar100")], ids=["device-resize", "worker-resize", "pad"])
def test_classification_device_inputs_equal_the_former_float_pipeline(transform):
    photo = rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)  # windows of 34..160 px a side
    samples = [transform(photo, rng(seed)) for seed in range(8)]
    assert {geometry["flipped"] for _, geometry in samples} == {False, True}
    assert all(pixels.dtype == torch.uint8 for pixels, _ in samples)
    if isinstance(transform, T.RandomResizedCropFlip):  # windows over 2.5x the output are resized in the worker
        resized_here = {tuple(pixels.shape[1:]) == (transform.size,) * 2 for pixels, _ in samples}
        assert resized_here == {transform.size == 8}
    from kd_ref import datasets

    batch = datasets.collate_cls([{"image": pixels, "geometry": geometry, "target": 0} for pixels, geometry in samples])
    inputs = T.device_inputs(batch["images"], batch["geometry"], transform.normalization, antialias=True)
    assert inputs.is_contiguous() and inputs.dtype == torch.float32
    for index in range(len(samples)):
        assert torch.equal(inputs[index], former_cls_input(transform, photo, index))


def test_classification_transforms_shapes_and_padding():
    image = np.full((32, 32, 3), 255, np.uint8)
    crops = [T.PadCropFlip(32, 4)(image, rng(seed))[0] for seed in range(20)]
    assert all(c.shape == (3, 32, 32) and c.dtype == torch.uint8 for c in crops)
    assert any((c[:, 0, 0] == 0).all() for c in crops)  # some crops start inside the (black) padding
    photo = rng().integers(0, 256, (300, 400, 3), dtype=np.uint8)
    window, geometry = T.RandomResizedCropFlip(224)(photo, rng())
    assert geometry["size"] == (224, 224) and geometry["orig_size"] == tuple(window.shape[1:])
    evaluation, geometry = T.ResizeCenterCrop(224, 256)(photo)
    assert evaluation.shape == (3, 224, 224) and geometry == {"orig_size": (224, 224), "size": (224, 224),
                                                              "flipped": False}
    assert T.ResizeCenterCrop(None, None)(photo)[0].shape == (3, 300, 400)
    assert T.PadCropFlip((24, 40), 3, "imagenet_rgb")(photo[:24, :40], rng())[0].shape == (3, 24, 40)
    with pytest.raises(ValueError, match=r"images: expected a collated uint8 \(B, 3, H, W\) batch, got torch.uint8 \(3, 32, 32\)"):
        T.device_inputs(crops[0], [geometry], "cifar100")


def test_skd_original_preset_draws_scales_from_0_7_to_2_1():
    recipe = PRESETS["skd_pspnet_r18_cityscapes_original"]
    rng = np.random.default_rng(0)
    drawn = {round(T.draw_scale(rng, recipe.scales, recipe.scale_step), 6) for _ in range(2000)}
    assert drawn == {round(0.7 + k / 10, 6) for k in range(15)}


def test_gdd_pipeline_applies_photometric_distortion_after_the_flip_before_normalising():
    """The GDD preset's transform = scale -> crop -> flip -> PhotoMetricDistortion -> normalise (mmseg order):
    replayed step by step with the same generator it gives the same tensor."""
    from kd_ref import tasks
    recipe = PRESETS["gdd_pspnet_r18_cityscapes"]
    transform, _ = tasks.SegTask().build_data(
        dataclasses.replace(recipe, data="synthetic", num_classes=4, crop=(16, 16), synthetic_size=(32, 32), synthetic_train=1,
                            synthetic_val=1), "train", None)
    transform = transform.transform
    assert transform.photometric is not None and transform.scale_step is None and transform.cat_max_ratio == 0.75
    image = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    label = np.zeros((24, 24), dtype=np.uint8)
    out, _ = finished(transform, image, label, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    x = T.to_tensor(image)
    scale = T.draw_scale(rng, recipe.scales, None)
    size = (max(1, round(24 * scale)), max(1, round(24 * scale)))
    x = T.resize_image(x, size)
    top, left, height, width = transform._crop_window(torch.from_numpy(label), size, rng)
    x = x[:, top:top + height, left:left + width]
    if rng.random() < 0.5:
        x = x.flip(-1)
    x = T.pad_bottom_right(T.normalize(T.PhotoMetricDistortion()(x, rng), "imagenet_rgb"), (16, 16), 0.0)
    assert torch.allclose(out, x, atol=1e-3)  # the crop-first resampling rounds differently (1e-3 of a level)
    assert not PRESETS["dist_pspnet_r18_cityscapes"].photometric_distortion  # CIRKD has none


# ------------------------------------------------------------------------- VNL's NYUDv2 protocol
class ScriptedDraws:
    """A generator stand-in that returns the given integer draws in order (each checked against its bound)
    and a fixed ``random()``: the flip is drawn when it is below 0.5."""

    def __init__(self, integers, random=0.9):
        self.integers_left, self.random_value = list(integers), random

    def integers(self, *bounds):
        value = self.integers_left.pop(0)
        assert 0 <= value < bounds[-1] and (len(bounds) == 1 or value >= bounds[0])
        return value

    def random(self):
        return self.random_value


def nyu_like_sample():
    """A 480x640 image whose red channel is the row and green the column (mod 256), and a depth map that
    grows by 1 mm per row and 0.1 mm per column from 2 m."""
    rows, cols = np.meshgrid(np.arange(480), np.arange(640), indexing="ij")
    image = np.stack([rows % 256, cols % 256, np.zeros_like(rows)], -1).astype(np.uint8)
    return image, (2.0 + rows / 1000 + cols / 10000).astype(np.float32)


def test_vnl_training_windows_are_squares_of_385_to_640_resized_to_385_with_depth_scaled():
    assert T.vnl_crop_sides(385, 640) == (385, 416, 448, 480, 512, 544, 576, 608, 640)  # VNL's raw_size
    image, depth = nyu_like_sample()
    transform = T.VNLDepthTransform(385, train=True, normalization="imagenet_rgb")
    # side 385 (draw 0) at row 50, column 100: the window itself, depth unscaled, no flip
    pixels, target, restore = transform(image, depth, ScriptedDraws([0, 50, 100]))
    assert restore is None and pixels.shape == (3, 385, 385)
    assert torch.equal(target, torch.from_numpy(depth[50:435, 100:485]))
    assert torch.equal(pixels, T.normalize(T.to_tensor(image[50:435, 100:485]), "imagenet_rgb"))
    # side 640 (draw 8): taller than the image, so padded by 160 rows at the top and taken from row 0 (no row
    # draw); resized x385/640 and the depth multiplied by 640/385; flipped (random 0.1)
    pixels, target, _ = transform(image, depth, ScriptedDraws([8, 0], random=0.1))
    assert pixels.shape == (3, 385, 385) and target.shape == (385, 385)
    # output row i samples padded row (i + 0.5) * 640/385 - 0.5: rows 0-96 touch the padding (row 96: 159.9)
    assert target[:97].max() == 0 and target[97:].min() > 0
    last = 384.5 * 640 / 385 - 0.5  # where the last row and column sample: padded row 638.7 is image row 478.7
    assert target[384, 0].item() == pytest.approx((2.0 + (last - 160) / 1000 + last / 10000) * 640 / 385, rel=1e-6)
    assert target[200, 0].item() > target[200, -1].item()  # flipped: the far columns on the left
    gray = (128 - 123.675) / 58.395  # the padding is 128 on the 0-255 scale
    assert pixels[0, :96].sub(gray).abs().max() < 1e-5
    # side 480 (draw 3): as tall as the image, so the row draw has a single value, 0; column 160
    _, target, _ = transform(image, depth, ScriptedDraws([3, 0, 160]))
    first = 0.5 * 480 / 385 - 0.5
    assert target[0, 0].item() == pytest.approx((2.0 + first / 1000 + (160 + first) / 10000) * 480 / 385, rel=1e-6)


def test_vnl_test_geometry_pads_to_640_runs_at_385_and_maps_the_prediction_back():
    image, depth = nyu_like_sample()
    pixels, target, restore = T.VNLDepthTransform(385, train=False)(image, depth, ScriptedDraws([]))
    assert pixels.shape == (3, 385, 385) and torch.equal(target, torch.from_numpy(depth))
    assert restore == {"pad_top": 160, "side": 640, "size": (480, 640)}
    # a prediction of its row index: VNL drops int(160 * 385/640) = 96 rows, multiplies by r = 385/640 and
    # resizes the 289 rows left to 480; the first and last rows read rows 96 and 384 of the prediction
    prediction = torch.arange(385.0)[:, None].expand(385, 385)
    restored = T.vnl_restore(prediction, restore)
    assert restored.shape == (480, 640)
    assert restored[0, 0].item() == pytest.approx(96 * 385 / 640)
    assert restored[-1, 0].item() == pytest.approx(384 * 385 / 640)
    # the round trip of a constant map: the training-style target of the test window maps back to it
    window = torch.nn.functional.pad(torch.full((1, 1, 480, 640), 2.0), (0, 0, 160, 0))
    predicted = torch.nn.functional.interpolate(window, size=(385, 385), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(T.vnl_restore(predicted * 640 / 385, restore)[2:], torch.full((478, 640), 2.0))
    with pytest.raises(ValueError, match=r"^--crop 385 385: VNL's protocol crops squares of 385 px up to the image "
                                         r"width, which is 320 px here$"):
        T.VNLDepthTransform(385, train=True)(image[:240, :320], depth[:240, :320], ScriptedDraws([]))
