"""What the benchmarks share: interleaved timing, peak memory, one-thread runs and the printed table.

No command of its own; the benchmarks are ``kd_ref.bench_<name>`` (bench_cost, bench_pairwise,
bench_evaluation, bench_data, bench_flops, bench_effect, bench_constant_depth). Every figure a benchmark
prints comes from cases measured side by side in one run (:func:`measure` interleaves them round by
round), so that what is read is a ratio between cases of one run, never a time compared with a threshold.
"""
from __future__ import annotations

import contextlib
import ctypes
import time
from dataclasses import dataclass
from typing import Callable

import torch


# ------------------------------------------------------------------------------------------- memory
def _libc_malloc_trim() -> Callable[[], None]:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: freed heap pages simply stay resident
        return lambda: None
    return lambda: trim(0)


_malloc_trim = _libc_malloc_trim()


def proc_bytes(path: str, field: str) -> int:
    """A ``field: N kB`` line of a Linux /proc file, in bytes."""
    with open(path) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"{path} has no {field} line")


def mark_memory(device: torch.device) -> int:
    """Bytes in use now, and start a new peak from here. CUDA: allocated tensor bytes. CPU (Linux):
    resident set size, after handing freed heap pages back to the system (malloc_trim) and resetting the
    kernel's high-water mark (clear_refs 5), so that pages an earlier case left resident neither hide
    this case's peak nor count in it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return proc_bytes("/proc/self/status", "VmRSS")


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last :func:`mark_memory` (CUDA max allocated; CPU peak RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return proc_bytes("/proc/self/status", "VmHWM")


# ------------------------------------------------------------------------------------------- timing
@dataclass
class TimedCase:
    """One timed unit of work. ``resident_bytes()`` is what the case keeps between two runs (weights,
    optimizer state), read after warm-up when the optimizer state exists; 0 where no memory is reported."""
    name: str
    run: Callable[[], None]
    resident_bytes: Callable[[], int] = lambda: 0


@dataclass
class Measurement:
    seconds: list
    transient_bytes: int = 0


def measure(cases: list, warmup: int, rounds: int, device: torch.device) -> dict:
    """``{case name: Measurement}``. Every round runs every case once, starting one case later than the
    previous round, so that drifting machine load falls on all cases alike; the first ``warmup`` rounds
    are discarded. Memory is taken in one more, untimed round (``transient_bytes``: the peak a run
    reaches above the memory in use before it), because on CPU resetting the peak hands pages back to
    the system and the run after it pays for faulting them in again."""
    results = {case.name: Measurement([]) for case in cases}
    for round_index in range(warmup + rounds):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            seconds = timed(case.run, device)
            if round_index >= warmup:
                results[case.name].seconds.append(seconds)
    for case in cases:
        before = mark_memory(device)
        case.run()
        results[case.name].transient_bytes = peak_memory(device) - before
    return results


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Seconds ``work()`` takes, including the GPU work it queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tick = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - tick


@contextlib.contextmanager
def one_thread():
    """torch on one thread for the duration: the rates of a DataLoader worker, or of an evaluator next to
    the single-threaded official ones (several threads also slow down badly on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- output
def print_table(title: str, header: list, rows: list) -> None:
    """A Markdown table (pastes into the README as it is) under a title line."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(flush=True)

