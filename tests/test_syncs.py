"""kd_ref.syncs: the CPU counter of host-device synchronisations counts the calls that wait on a GPU, and
only those, and GKD's own step adds none beyond its binding's per-image split."""
import torch

from kd_ref import gkd, syncs


def _counts(work):
    with syncs.SyncCounter() as counter:
        work()
    return dict(counter.counts)


def test_each_kind_of_host_read_is_counted_once():
    x = torch.arange(6.0)
    mask = x > 2
    assert _counts(lambda: x.sum().item()) == {"item": 1}
    assert _counts(lambda: bool(x.sum() > 0)) == {"item": 1}
    assert _counts(lambda: int(x.max()) + float(x.min())) == {"item": 2}
    assert _counts(lambda: x.tolist()) == {"tolist": 1}
    assert _counts(lambda: (x.cpu(), x.to("cpu"), x.numpy())) == {"cpu": 2, "numpy": 1}
    assert _counts(lambda: x[mask]) == {"mask_index": 1}
    assert _counts(lambda: x.clone().__setitem__(mask, 0.0)) == {"mask_assign": 1}
    assert _counts(lambda: (mask.nonzero(), x.masked_select(mask), x.unique())) == {
        "nonzero": 1, "masked_select": 1, "unique": 1}
    assert _counts(lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0]))) == {"repeat_interleave": 1}


def test_device_side_work_is_not_counted():
    x = torch.arange(6.0)
    index = torch.tensor([0, 2])

    def device_only():
        y = torch.where(x > 2, x, 0.0).clamp(min=1.0)
        y = y.masked_fill(x < 1, 0.0)[index] + x.to(x.device)[index]
        return y.sum() / (x > 0).sum().clamp(min=1), x.to(torch.float64)

    assert _counts(device_only) == {}


def test_gkd_pooling_masks_and_weights_read_nothing_on_the_host():
    generator = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 4, 8, 8, generator=generator)
    boxes = torch.tensor([[0.0, 0.0, 30.0, 20.0], [8.0, 8.0, 60.0, 60.0], [5.0, 5.0, 9.0, 40.0]])
    batch_idx = torch.tensor([0, 1, 1])
    weights = torch.rand(3, generator=generator)
    protos = torch.randn(4, 4, generator=generator)
    cls_start = torch.tensor([0, 2, 4])
    assert _counts(lambda: gkd.pool_box_features(feat, boxes, batch_idx, 8.0, keep=batch_idx == 1)) == {}
    assert _counts(lambda: gkd.instance_masks(boxes, weights, batch_idx, 2, (8, 8), 8.0)) == {}
    pooled_s, pooled_t = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    labels = torch.tensor([0, 1, 1])
    assert _counts(lambda: gkd._robust_weights(pooled_s, pooled_t, labels, protos, protos, cls_start)) == {}
    assert _counts(lambda: gkd.local_feature_loss(feat, feat.flip(0), torch.rand(2, 8, 8, generator=generator))) == {}
