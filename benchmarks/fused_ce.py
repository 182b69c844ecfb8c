"""Fused linear + cross-entropy: speed and memory of every LM-head loss we can run, side by side.

    python benchmarks/fused_ce.py            # GPU: N in {4k, 16k} x H in {2048, 4096} x V in {32000, 128256}, bf16
    python benchmarks/fused_ce.py --cpu      # CPU: N=1024, H=256, V=8192 fp32, torch paths only

Providers: eager torch (Linear + F.cross_entropy on fp32-upcast logits), the chunked torch reference
(`tokensel.kernels.reference`), Liger FLCE and Apple CCE when importable (reduction="none", CUDA only), and
ours (`tokensel.kernels.fused_linear_ce`, CUDA only: the Triton interpreter is far too slow to time).
Ours and the reference skip zero-weight rows in the backward, so they run at keep ratios 1.0 / 0.6 / 0.3
(upstream weights 1/k on k random rows, 0 elsewhere); the others cost the same at any ratio.

Columns: fwd ms and bwd ms (medians; bwd excludes its forward), the total as a multiple of one cuBLAS/CPU GEMM
`X[N,H] @ W[V,H]^T` of the same shape and dtype timed in the same run, the FLOPs floor in the same unit (ours
needs (2N + 6k)·H·V FLOPs = 1 + 3k/N GEMMs; eager and Liger's gradient-in-forward 3; recompute designs 4), and
peak extra MiB: peak memory during one fwd+bwd minus what was allocated before it and minus dX and dW, which
must exist anyway. On CPU the peak is the growth of the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) with glibc's mmap threshold pinned at 64 KiB so freed tensors leave RSS: approximate.
The table is printed and written to benchmarks/results/fused_ce.md with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokensel.kernels import reference
from tokensel.machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "fused_ce.md"
GPU_SHAPES = [(n, h, v) for n in (4096, 16384) for h in (2048, 4096) for v in (32000, 128256)]
CPU_SHAPES = [(1024, 256, 8192)]


# ------------------------------------------------------------------------------------------- providers


def eager(x, w, t):
    """The unfused baseline with the fp32 upcast (Liger's published baseline skips it)."""
    return F.cross_entropy((x @ w.t()).float(), t, reduction="none")


def torch_reference(x, w, t):
    return reference.linear_cross_entropy(x, w, t)[0]


OURS_OPTIONS: dict = {}  # --ours-options: tiles / tile keys / num_splits / group_m / chunk_size / vocab_chunk


def ours(x, w, t):
    from tokensel.kernels.fused_linear_ce import fused_linear_cross_entropy

    return fused_linear_cross_entropy(x, w, t, **OURS_OPTIONS)[0]


def liger(x, w, t):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    out = liger_fused_linear_cross_entropy(x, w, t, reduction="none")
    return getattr(out, "loss", out[0] if isinstance(out, tuple) else out)  # the return type changed over versions


def cce(x, w, t):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(x, w, t, reduction="none")


def available(name: str, on_cuda: bool) -> str | None:
    """None when the provider can run here, else why not (printed in the table)."""
    if name in ("eager", "reference"):
        return None
    if not on_cuda:
        return "needs CUDA" + (" (Triton interpreter too slow to time)" if name == "ours" else "")
    module = {"liger": "liger_kernel", "cce": "cut_cross_entropy", "ours": "triton"}[name]
    try:
        __import__(module)
    except ImportError:
        return f"{module} not importable"
    return None


PROVIDERS = {"eager": eager, "reference": torch_reference, "liger": liger, "cce": cce, "ours": ours}
ROW_SKIPPING = {"reference", "ours"}  # backward work follows the keep ratio
FLOOR = {"eager": lambda r: 3.0, "liger": lambda r: 4.0, "cce": lambda r: 4.0,  # in GEMMs of [N,H]x[H,V]
         "reference": lambda r: 1 + 3 * r, "ours": lambda r: 1 + 3 * r}


# ------------------------------------------------------------------------------------- timing / memory


class Clock:
    """Median wall time of a callable in ms, synchronising the GPU around it."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3


class Memory:
    """Peak bytes allocated during a callable beyond what existed before it (CUDA allocator or CPU RSS)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        if not cuda:  # large allocations go to mmap and leave RSS when freed, so RSS tracks live tensors
            try:
                ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            except OSError:
                pass

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    def peak_extra(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            return float("nan")
        base = self._status("VmRSS:")
        fn()
        return self._status("VmHWM:") - base


def keep_weights(n: int, ratio: float, gen: torch.Generator, device) -> tuple[torch.Tensor, int]:
    """Upstream weights 1/k on k random rows, 0 elsewhere (a selector's normalised mask)."""
    k = max(1, round(ratio * n))
    g = torch.zeros(n)
    g[torch.randperm(n, generator=gen)[:k]] = 1.0 / k
    return g.to(device), k


def bench_cell(fn, x, w, t, g, clock: Clock, memory: Memory, reps: int, warmup: int) -> dict:
    """fwd ms, bwd ms (forward excluded), peak extra MiB (dX and dW excluded) and rows the backward visited."""
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()

    def fwd():
        return fn(xl, wl, t)

    def fwd_bwd():
        xl.grad = wl.grad = None
        (fwd() * g).sum().backward()

    for _ in range(warmup):
        fwd_bwd()
    fwd_ms = statistics.median(clock.once(fwd) for _ in range(reps))
    bwd = []
    for _ in range(reps):
        xl.grad = wl.grad = None
        out = (fwd() * g).sum()
        bwd.append(clock.once(out.backward))
    xl.grad = wl.grad = None
    unavoidable = x.numel() * x.element_size() + w.numel() * w.element_size()
    peak = memory.peak_extra(fwd_bwd) - unavoidable
    return dict(fwd=fwd_ms, bwd=statistics.median(bwd), mib=max(peak, 0) / 2**20)


def backward_rows(name: str, n: int) -> int:
    """Rows the latest backward recomputed: the row-skipping ops count them, the others visit all N."""
    if name == "reference":
        return reference.LinearCrossEntropyFunction.last_backward_rows
    if name == "ours":
        from tokensel.kernels.fused_linear_ce import FusedLinearCrossEntropyFunction

        return FusedLinearCrossEntropyFunction.last_backward_rows
    return n


def gemm_ms(x, w, clock: Clock, reps: int) -> float:
    wt = w.t()
    clock.once(lambda: x @ wt)
    return statistics.median(clock.once(lambda: x @ wt) for _ in range(reps))


# ------------------------------------------------------------------------------------------------ main


def run(args) -> tuple[list[str], list[str]]:
    """Benchmark every (shape, provider, keep) cell; returns the markdown table lines and notes."""
    cuda = not args.cpu
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    clock, memory = Clock(cuda), Memory(cuda)
    gen = torch.Generator().manual_seed(0)
    cols = ["N", "H", "V", "provider", "keep", "bwd rows", "fwd ms", "bwd ms", "fwd+bwd ms", "x GEMM",
            "floor x GEMM", "peak extra MiB"]
    row = lambda *c: "| " + " | ".join(str(x) for x in c) + " |"
    lines, notes = [row(*cols), row(*["---"] * len(cols))], []
    for n, h, v in args.shapes:
        x = torch.randn(n, h, generator=gen).to(device, dtype)
        w = (torch.randn(v, h, generator=gen) * h ** -0.5).to(device, dtype)
        t = torch.randint(0, v, (n,), generator=gen).to(device)
        t_gemm = gemm_ms(x, w, clock, args.reps)
        gemm_name = "GEMM X@W^T (cuBLAS)" if cuda else "GEMM X@W^T (torch CPU)"
        lines.append(row(n, h, v, gemm_name, "", "", f"{t_gemm:.2f}", "", f"{t_gemm:.2f}", "1.00", "1.00", ""))
        for name in args.providers:
            why = available(name, cuda)
            for ratio in args.keep if name in ROW_SKIPPING else [1.0]:
                g, k = keep_weights(n, ratio, gen, device)
                floor = f"{FLOOR[name](k / n):.2f}"
                if why:
                    lines.append(row(n, h, v, name, f"{ratio:.1f}", why, "", "", "", "", floor, ""))
                    continue
                try:
                    r = bench_cell(PROVIDERS[name], x, w, t, g, clock, memory, args.reps, args.warmup)
                except Exception as e:  # one failing provider must not lose the others' numbers
                    msg = f"error: {type(e).__name__}: {str(e)[:60]}".replace("|", "/")
                    lines.append(row(n, h, v, name, f"{ratio:.1f}", msg, "", "", "", "", floor, ""))
                    continue
                total = r["fwd"] + r["bwd"]
                lines.append(row(n, h, v, name, f"{ratio:.1f}", backward_rows(name, n), f"{r['fwd']:.2f}",
                                 f"{r['bwd']:.2f}", f"{total:.2f}", f"{total / t_gemm:.2f}", floor,
                                 f"{r['mib']:.1f}"))
                print(lines[-1], flush=True)
        del x, w, t
        if cuda:
            torch.cuda.empty_cache()
    if not cuda:
        notes.append("CPU run: ours (Triton), Liger and CCE need CUDA. The GPU part of this benchmark (its default "
                     "shapes, bf16) is unmeasured in this file; run `python benchmarks/fused_ce.py` on a GPU.")
        notes.append("The CPU machines are shared with other jobs: across identical runs absolute ms moved by up to "
                     "~2x and the x GEMM column (normalised by a GEMM timed in the same run) by up to ~35%; read the "
                     "CPU numbers as rough. The bwd ms of the reference falling with the keep ratio is the signal.")
    if any(n <= reference.DEFAULT_CHUNK for n, _, _ in args.shapes):
        notes.append(f"The reference processes {reference.DEFAULT_CHUNK} rows per chunk, so at N <= "
                     f"{reference.DEFAULT_CHUNK} it holds the whole fp32 logit block, like eager; chunking bounds "
                     "its memory only at larger N. Its backward time still follows the keep ratio.")
    return lines, notes


def machine(cuda: bool) -> str:
    if cuda:
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"{cpu_model()}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}"


def versions() -> str:
    out = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("triton", "liger_kernel", "cut_cross_entropy"):
        try:
            m = __import__(mod)
            out.append(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            out.append(f"{mod} absent")
    return ", ".join(out)


def parse_option(s: str) -> tuple[str, int | str]:
    key, _, value = s.partition("=")
    return key, int(value) if value.lstrip("-").isdigit() else value


def parse_shape(s: str) -> tuple[int, int, int]:
    n, h, v = (int(p) for p in s.split(","))
    return n, h, v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU run: small shapes, fp32, torch providers only")
    p.add_argument("--shapes", type=parse_shape, nargs="+", help="N,H,V triples (default: per device)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.6, 0.3])
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per cell (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 with --cpu)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--ours-options", type=parse_option, nargs="+", default=[], metavar="KEY=VALUE",
                   help="options for ours, e.g. tiles=128x256x64_w8_s3 (fused_linear_ce.TILE_CANDIDATES) or "
                        "block_v=256 num_stages=4 vocab_chunk=16384: how the tile table is chosen")
    args = p.parse_args(argv)
    OURS_OPTIONS.update(dict(args.ours_options))
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu (torch paths only)")
    args.shapes = args.shapes or (CPU_SHAPES if args.cpu else GPU_SHAPES)
    args.dtype = args.dtype or ("fp32" if args.cpu else "bf16")
    args.reps = args.reps or (11 if args.cpu else 20)
    if args.cpu:
        torch.set_num_threads(args.threads or 1)  # the CPU machines are shared; one thread also times steadier
    elif args.threads:
        torch.set_num_threads(args.threads)

    lines, notes = run(args)
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None else str(argv)
    report = [
        "# Fused linear cross-entropy benchmark",
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine(not args.cpu)}",
        f"- versions: {versions()}",
        f"- command: `{command}`",
        f"- dtype {args.dtype}; {args.reps} timed reps per cell (median), {args.warmup} warm-up; upstream weights "
        "1/k on k random rows (keep = k/N)",
        "- columns: see the docstring of benchmarks/fused_ce.py (x GEMM = fwd+bwd / one X@W^T GEMM of the same "
        "shape timed in this run; floor = FLOPs the method needs, in the same unit; peak extra excludes dX, dW)",
        "",
        *lines,
        "",
        *[f"- {note}" for note in notes],
    ]
    text = "\n".join(report).rstrip() + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
