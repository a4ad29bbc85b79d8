"""Forward+backward time of the scan backends, side by side in one run.

    python benchmarks/scan.py            # CPU table (and CUDA rows when a GPU is present)

CPU: batch 8 x T 64 (a PPO minibatch) and batch 16 x T in {64, 256, 1024}, N = 128
complex, one torch thread.
CUDA: T in {256, 1024, 4096}, batch 64, N = 128 complex, plus real inputs against the
``accelerated-scan`` package when it is installed (benchmark-only extra).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from export.bench import cpu_model
from policies.scan import linear_scan


def time_fwd_bwd(backend, a, b, reset, repeats, device) -> float:
    """Median seconds for one forward+backward of linear_scan."""

    def run():
        a_ = a.detach().requires_grad_(True)
        b_ = b.detach().requires_grad_(True)
        h = linear_scan(a_, b_, reset=reset, backend=backend)
        (h.real.sum() if h.is_complex() else h.sum()).backward()

    run()  # warm-up (compilation, allocator)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def make_inputs(batch, steps, width, device, dtype=torch.complex64):
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(batch, steps, width, generator=gen)
    if dtype.is_complex:
        lam = torch.polar(torch.rand(width, generator=gen) * 0.5 + 0.45, torch.rand(width) * 3)
        b = torch.complex(real, torch.randn(batch, steps, width, generator=gen))
    else:
        lam = torch.rand(width, generator=gen) * 0.5 + 0.45
        b = real
    reset = torch.rand(batch, steps, generator=gen) < 0.01
    return lam.to(device), b.to(device), reset.to(device)


def naive_loop(a, b, reset):
    """The loop most people write first: ``b[:, t]`` indexing, autograd through it all.
    Each step's slice backward zero-fills a full ``[B, T, N]`` buffer: O(T²) memory traffic."""
    h = torch.zeros_like(b[:, 0])
    out = []
    for t in range(b.shape[1]):
        keep = (~reset[:, t, None]).to(b.dtype)
        h = a * h * keep + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


def time_naive(a, b, reset, repeats) -> float:
    times = []
    for _ in range(repeats + 1):
        a_, b_ = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
        start = time.perf_counter()
        naive_loop(a_, b_, reset).real.sum().backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def bench_cpu(repeats: int) -> list[str]:
    rows = [
        "| batch | T | naive loop (ms) | sequential (ms) | parallel (ms) | numba (ms) "
        "| parallel vs sequential | numba vs sequential | numba vs parallel |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(rows), flush=True)
    # (8, 64) is one PPO minibatch of the Hopper preset: 8 sequences of 64 steps.
    for batch, steps in ((8, 64), (16, 64), (16, 256), (16, 1024)):
        lam, b, reset = make_inputs(batch, steps, 128, "cpu")
        naive = time_naive(lam, b, reset, min(repeats, 3))
        ms = {
            k: time_fwd_bwd(k, lam, b, reset, repeats, "cpu")
            for k in ("sequential", "parallel", "numba")
        }
        seq, par, fused = ms["sequential"], ms["parallel"], ms["numba"]
        rows.append(
            f"| {batch} | {steps} | {naive * 1e3:.1f} | {seq * 1e3:.2f} | {par * 1e3:.2f} | "
            f"{fused * 1e3:.2f} | {seq / par:.2f}x | {seq / fused:.1f}x | {par / fused:.1f}x |"
        )
        print(rows[-1], flush=True)
    return rows


def bench_cuda(repeats: int) -> list[str]:
    backends = ["sequential", "parallel", "triton"]
    rows = [
        "| input | T | " + " | ".join(f"{k} (ms)" for k in backends) + " | parallel/triton |",
        "|---|---:|" + "---:|" * (len(backends) + 1),
    ]
    print("\n".join(rows), flush=True)
    for steps in (256, 1024, 4096):
        lam, b, reset = make_inputs(64, steps, 128, "cuda")
        ms = {k: time_fwd_bwd(k, lam, b, reset, repeats, "cuda") * 1e3 for k in backends}
        cells = " | ".join(f"{ms[k]:.2f}" for k in backends)
        rows.append(f"| complex | {steps} | {cells} | {ms['parallel'] / ms['triton']:.1f}x |")
        print(rows[-1], flush=True)
    try:
        from accelerated_scan.warp import scan as accel_scan
    except ImportError:
        rows.append(
            "\naccelerated-scan not installed: `pip install accelerated-scan` for that row."
        )
        return rows
    rows += [
        "",
        "| real, no resets | T | triton (ms) | accelerated-scan (ms) |",
        "|---|---:|---:|---:|",
    ]
    for steps in (256, 1024, 4096):
        lam, b, _ = make_inputs(64, steps, 128, "cuda", torch.float32)
        triton_ms = time_fwd_bwd("triton", lam, b, None, repeats, "cuda") * 1e3
        gates = lam.expand(64, steps, 128).transpose(1, 2).contiguous()
        tokens = b.transpose(1, 2).contiguous()

        def run(g=gates, x=tokens):
            g_, x_ = g.detach().requires_grad_(True), x.detach().requires_grad_(True)
            accel_scan(g_, x_).sum().backward()

        run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
        accel_ms = (time.perf_counter() - start) / repeats * 1e3
        rows.append(f"| real | {steps} | {triton_ms:.2f} | {accel_ms:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {cpu_model()}, {torch.get_num_threads()} torch thread(s) of "
        f"{os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"\nCPU, N = 128 complex, forward+backward, median of {args.repeats}, resets p=0.01")
    bench_cpu(args.repeats)
    if torch.cuda.is_available():
        print(f"\nCUDA: {torch.cuda.get_device_name()}, batch 64, N = 128")
        bench_cuda(args.repeats)
    else:
        print("\nno GPU found: CUDA rows (sequential / parallel / triton) not measured")


if __name__ == "__main__":
    main()
