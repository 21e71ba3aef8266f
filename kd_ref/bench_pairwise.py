"""SKD's pair-wise loss in its dense and Gram forms, side by side: seconds, peak memory, agreement.

    python -m kd_ref.bench_pairwise [--nodes 1024 4096 16384 65536] [--channels C_S C_T] [--batch-size N]
                                    [--repeats N] [--memory-budget-gib G] [--device cuda]

Runs ``kd_ref.skd.pair_wise_kd`` forward + backward on ``--batch-size`` images of N nodes with
``impl="dense"`` (the B x N x N graphs) and ``impl="gram"`` (the exact float64 Gram evaluation,
docs/specs/skd.md §3), on student and teacher features that roughly agree, as after training
(:func:`correlated_features`), where the Gram terms nearly cancel.

Reading the output: one Markdown table, a row per N: dense and Gram seconds (median of ``--repeats``
after one warm-up run) and peak MB above the start of a run, then the relative difference of the Gram
loss and of its gradient w.r.t. the student feature from the dense ones (the agreement; float64 Gram
against float32 dense). Compare the two forms' columns within a row; dense sizes whose estimated memory
(:func:`dense_pairwise_bytes`) exceeds ``--memory-budget-gib`` (default half of the memory available now)
are skipped and the row says so.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from kd_ref.bench_common import mark_memory, peak_memory, print_table, proc_bytes, timed
from kd_ref.runtime import setup_runtime
from kd_ref.skd import pair_wise_kd


def dense_pairwise_bytes(batch: int, num_nodes: int) -> int:
    """Estimated peak of the dense form: about six float32 N x N matrices per image are alive at once
    (both graphs, their difference and its square, then their gradients in backward)."""
    return 6 * 4 * batch * num_nodes ** 2


def available_memory_bytes(device: torch.device) -> int:
    """Bytes free on ``device`` now: CUDA free memory, or the CPU's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return proc_bytes("/proc/meminfo", "MemAvailable")


def correlated_features(batch: int, channels: int, num_nodes: int, latent: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
    """(B, C, N, 1) non-negative features driven by a shared low-dimensional ``latent`` (B, L, N): student
    and teacher graphs then agree roughly, as after training, where the Gram terms nearly cancel."""
    mixing = torch.randn(channels, latent.shape[1], generator=generator, device=latent.device)
    noise = torch.randn(batch, channels, num_nodes, generator=generator, device=latent.device)
    return torch.relu(mixing @ latent + 0.5 * noise).unsqueeze(-1)


def _timed_pairwise(feat_s, feat_t, impl: str, repeats: int, device) -> tuple:
    """(median seconds of forward + backward after one warm-up run, peak bytes of one more run above
    its start, loss, gradient w.r.t. the student feature)."""
    def forward_backward():
        leaf = feat_s.detach().requires_grad_(True)
        loss = pair_wise_kd(leaf, feat_t, kernel=None, impl=impl)
        loss.backward()
        return loss.detach(), leaf.grad

    forward_backward()
    seconds = statistics.median(timed(forward_backward, device) for _ in range(repeats))
    before = mark_memory(device)
    loss, grad = forward_backward()
    return seconds, peak_memory(device) - before, loss, grad


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-300))


def pairwise(nodes: list, channels: tuple = (128, 512), batch: int = 1, repeats: int = 3,
             device: str | None = None, memory_budget_gib: float | None = None, seed: int = 0) -> list:
    """One row per N: dense and Gram seconds and peak MiB (or why dense was skipped) and the relative
    difference of loss and gradient; prints the table."""
    runtime = setup_runtime(device)
    budget = (memory_budget_gib * 2 ** 30 if memory_budget_gib is not None
              else available_memory_bytes(runtime.device) / 2)
    generator = torch.Generator(runtime.device).manual_seed(seed)
    rows = []
    for num_nodes in nodes:
        latent = torch.randn(batch, 16, num_nodes, generator=generator, device=runtime.device)
        feat_s, feat_t = (correlated_features(batch, c, num_nodes, latent, generator) for c in channels)
        gram_s, gram_peak, gram_loss, gram_grad = _timed_pairwise(feat_s, feat_t, "gram", repeats, runtime.device)
        row = {"nodes": num_nodes, "gram_seconds": gram_s, "gram_peak_mb": gram_peak / 2 ** 20}
        needed = dense_pairwise_bytes(batch, num_nodes)
        if needed > budget:
            row["dense_skipped"] = (f"skipped: needs ~{needed / 2 ** 30:.1f} GiB, "
                                    f"budget {budget / 2 ** 30:.1f} GiB")
        else:
            dense_s, dense_peak, dense_loss, dense_grad = _timed_pairwise(feat_s, feat_t, "dense", repeats,
                                                                          runtime.device)
            row.update(dense_seconds=dense_s, dense_peak_mb=dense_peak / 2 ** 20,
                       loss_rel_diff=relative_difference(gram_loss, dense_loss),
                       grad_rel_diff=relative_difference(gram_grad, dense_grad))
        rows.append(row)
    print_table(f"SKD pair-wise loss, dense vs Gram: batch {batch}, C_s {channels[0]}, C_t {channels[1]}, "
                f"{runtime.device.type}, forward + backward, median of {repeats}",
                ["N", "dense s", "dense peak MB", "gram s", "gram peak MB", "rel. diff loss", "rel. diff grad"],
                [_pairwise_cells(row) for row in rows])
    return rows


def _pairwise_cells(row: dict) -> list:
    gram = [f"{row['gram_seconds']:.3f}", f"{row['gram_peak_mb']:.0f}"]
    if "dense_skipped" in row:
        return [str(row["nodes"]), row["dense_skipped"], "-", *gram, "-", "-"]
    return [str(row["nodes"]), f"{row['dense_seconds']:.3f}", f"{row['dense_peak_mb']:.0f}", *gram,
            f"{row['loss_rel_diff']:.1e}", f"{row['grad_rel_diff']:.1e}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_ref.bench_pairwise", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--channels", type=int, nargs=2, metavar=("C_S", "C_T"), default=[128, 512],
                        help="student and teacher channels (default: DeepLabV3-R18 / -R101 heads)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="skip dense sizes estimated above this (default: half the available memory)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args(argv)
    pairwise(args.nodes, tuple(args.channels), args.batch_size, args.repeats, args.device, args.memory_budget_gib)


if __name__ == "__main__":
    main()
