"""LLSA attention vs dense SDPA: time and peak extra memory against sequence length, one run.

    python benchmarks/llsa.py                                   # CPU: reference path, N = 1k ... 64k
    python benchmarks/llsa.py --device cuda --dtype bfloat16    # GPU: Triton kernels vs SDPA (flash)

Question: does LLSA's cost grow log-linearly (about 2x per doubling of N, plus a slowly growing
enrichment term) while dense attention grows 4x? Levels follow the paper's rule L = floor(log_B N) - 1
(clamped to 1..3), so the coarsest level keeps between B and B^2 pooled tokens. Both providers time the
whole op from q, k, v (LLSA includes pooling and the hierarchical top-K selection).

Second question: is LLSA's peak extra memory (beyond its inputs) at most linear in N, and below one
dense level-1 score matrix, (N/B)^2 fp32 values? On CUDA it is `torch.cuda.max_memory_allocated` minus
the allocation before the call. On CPU each point runs once in a fresh child process: the peak resident
set (VmHWM, reset through /proc/self/clear_refs just before the call) minus the resident set before it,
with glibc's mmap threshold pinned at 64 KiB so that freed buffers go back to the OS and a later buffer
cannot hide in memory an earlier one left resident; a call at a small N first initialises the libraries.
Writes Markdown tables with the machine, versions and the exact command to benchmarks/results/llsa.md
(or --out).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokensel.kernels.llsa import llsa_attention
from tokensel.kernels.llsa_reference import llsa_prepare, make_plan
from tokensel.machine import cpu_model


def auto_levels(n: int, block: int) -> int:
    """The paper's level count L = floor(log_B N) - 1, clamped to what we support (1..3)."""
    return max(1, min(3, int(math.floor(math.log(n, block) + 1e-9)) - 1))


def keys_per_query(n: int, levels: int, block: int, top_k: int) -> int:
    """Fine keys + enrichment keys + coarsest-level keys each query attends to (before padding)."""
    plan = make_plan(n, levels, block, top_k)
    ks = plan.top_k
    return ks[0] * block + sum(ks[lvl] * block for lvl in range(1, levels)) + plan.level_len(levels)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, min_total: float, max_reps: int) -> float:
    """Median seconds of `fn()` after one warm-up; repeats until `min_total` seconds or `max_reps` runs."""
    fn()
    _sync(device)
    times: list[float] = []
    while len(times) < max_reps and (sum(times) < min_total or len(times) < 1):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_inputs(n: int, args, grad: bool):
    g = torch.Generator(device="cpu").manual_seed(n)
    shape = (args.batch, args.heads, n, args.head_dim)
    dtype = getattr(torch, args.dtype)
    return [torch.randn(shape, generator=g).to(args.device, dtype).requires_grad_(grad) for _ in range(3)]


def bench_provider(name: str, n: int, args, backward: bool = True) -> tuple[float, float | None]:
    """(fwd seconds, fwd+bwd seconds or None) of one provider at length n."""
    levels = auto_levels(n, args.block)

    def attn(q, k, v):
        if name == "dense":
            return F.scaled_dot_product_attention(q, k, v)
        return llsa_attention(q, k, v, levels=levels, block_size=args.block, top_k=args.top_k, backend=args.backend)

    q, k, v = make_inputs(n, args, grad=False)

    def fwd():
        with torch.no_grad():
            attn(q, k, v)

    qg, kg, vg = make_inputs(n, args, grad=True)
    do = torch.randn_like(qg)

    def fwd_bwd():
        for t in (qg, kg, vg):
            t.grad = None
        attn(qg, kg, vg).backward(do)

    t_fwd = time_call(fwd, args.device, args.min_time, args.reps)
    return t_fwd, time_call(fwd_bwd, args.device, args.min_time, args.reps) if backward else None


MODES = ("fwd", "fwd_bwd", "select")  # select: LLSA's pooling + hierarchical top-K only


def make_op(name: str, n: int, args, mode: str):
    """A zero-argument callable running one provider at length n in `mode`, with its inputs built."""
    levels = auto_levels(n, args.block)
    grad = mode == "fwd_bwd"
    q, k, v = make_inputs(n, args, grad=grad)
    do = torch.randn_like(q) if grad else None

    def attn():
        if name == "dense":
            return F.scaled_dot_product_attention(q, k, v)
        if mode == "select":
            return llsa_prepare(q, k, v, make_plan(n, levels, args.block, args.top_k))
        return llsa_attention(q, k, v, levels=levels, block_size=args.block, top_k=args.top_k, backend=args.backend)

    def op():
        if grad:
            attn().backward(do)
        else:
            with torch.no_grad():
                attn()

    return op


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(spec: str) -> None:
    """Child-process side of `peak_extra_cpu`: print the peak extra bytes of one call as JSON."""
    cfg = json.loads(spec)
    args = argparse.Namespace(**cfg["args"])
    torch.set_num_threads(cfg["threads"])
    small = max(256, args.block ** auto_levels(cfg["n"], args.block))
    make_op(cfg["name"], small, args, cfg["mode"])()       # initialise libraries and thread pools
    op = make_op(cfg["name"], cfg["n"], args, cfg["mode"])
    gc.collect()
    before = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:           # reset the high-water mark (VmHWM) to now
        f.write("5")
    op()
    print(json.dumps({"peak_extra": _proc_status_bytes("VmHWM") - before}))


def peak_extra_cpu(name: str, n: int, args, mode: str) -> int:
    """Peak resident bytes one call adds, measured in a fresh child process (see the module docstring)."""
    cfg = dict(name=name, n=n, mode=mode, threads=torch.get_num_threads(),
               args={k: getattr(args, k) for k in ("batch", "heads", "head_dim", "block", "top_k", "device",
                                                   "dtype", "backend")})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")
    res = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(cfg)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_extra"]


def peak_extra_cuda(name: str, n: int, args, mode: str) -> int:
    """`torch.cuda.max_memory_allocated` during one call minus what was allocated before it."""
    op = make_op(name, n, args, mode)
    op()  # warm-up (autotune, workspace)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    op()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def peak_extra(name: str, n: int, args, mode: str) -> int:
    return (peak_extra_cuda if args.device == "cuda" else peak_extra_cpu)(name, n, args, mode)


def fmt_mib(x: int | None) -> str:
    return f"{x / 2 ** 20:,.1f}" if x is not None else "–"


def growth(times: list[float | None]) -> list[str]:
    """Ratio of each time to the previous one (per doubling of N)."""
    out = ["–"]
    for prev, cur in zip(times, times[1:]):
        out.append(f"{cur / prev:.2f}x" if prev and cur else "–")
    return out


def geo_growth(times: list[float | None]) -> str:
    """Geometric-mean growth per doubling over the measured range."""
    pts = [t for t in times if t]
    return f"{(pts[-1] / pts[0]) ** (1 / (len(pts) - 1)):.2f}x" if len(pts) > 1 else "–"


def fmt_ms(t: float | None) -> str:
    return f"{t * 1e3:,.1f}" if t else "–"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", type=int, nargs="+", default=[1024 * 2 ** i for i in range(7)], help="sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=16, help="LLSA block size (paper: 16)")
    p.add_argument("--top-k", type=int, default=8, help="LLSA top-K per level (paper: 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default=None, help="LLSA backend: auto (default) | triton | torch")
    p.add_argument("--max-dense-n", type=int, default=65536, help="skip dense forward above this N")
    p.add_argument("--max-dense-bwd-n", type=int, default=16384,
                   help="skip dense fwd+bwd above this N (time: about 4x per doubling)")
    p.add_argument("--reps", type=int, default=5, help="max timed repetitions per point")
    p.add_argument("--min-time", type=float, default=1.0, help="stop repeating once this many seconds are timed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "llsa.md"))
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child)
        return

    rows = []
    for n in args.ns:
        levels = auto_levels(n, args.block)
        llsa = bench_provider("llsa", n, args)
        dense = (bench_provider("dense", n, args, backward=n <= args.max_dense_bwd_n)
                 if n <= args.max_dense_n else (None, None))
        row = dict(n=n, levels=levels, keys=keys_per_query(n, levels, args.block, args.top_k),
                   llsa_f=llsa[0], llsa_fb=llsa[1], dense_f=dense[0], dense_fb=dense[1])
        print(f"N={n:6d} L={levels} keys/q={row['keys']:4d}  llsa fwd {fmt_ms(llsa[0])} ms, fwd+bwd "
              f"{fmt_ms(llsa[1])} ms | dense fwd {fmt_ms(dense[0])} ms, fwd+bwd {fmt_ms(dense[1])} ms", flush=True)
        if not args.no_memory:
            for mode in MODES:
                row[f"mem_llsa_{mode}"] = peak_extra("llsa", n, args, mode)
            row["mem_dense_fwd"] = peak_extra("dense", n, args, "fwd") if n <= args.max_dense_n else None
            row["mem_dense_fwd_bwd"] = peak_extra("dense", n, args, "fwd_bwd") if n <= args.max_dense_bwd_n else None
            print(f"         peak extra MiB: llsa fwd {fmt_mib(row['mem_llsa_fwd'])}, fwd+bwd "
                  f"{fmt_mib(row['mem_llsa_fwd_bwd'])}, selection {fmt_mib(row['mem_llsa_select'])} | dense fwd "
                  f"{fmt_mib(row['mem_dense_fwd'])}, fwd+bwd {fmt_mib(row['mem_dense_fwd_bwd'])}", flush=True)
        rows.append(row)
    write_report(rows, args, argv)


def memory_table(rows: list[dict], args) -> list[str]:
    """Peak extra memory per point, beside one dense level-1 score matrix ((N/B)^2 fp32) and per token."""
    how = ("torch.cuda.max_memory_allocated minus the allocation before the call" if args.device == "cuda" else
           "peak RSS (VmHWM, reset just before the call) minus RSS before it, one fresh child process per point, "
           "glibc mmap threshold 64 KiB")
    per = args.batch * args.heads
    lines = [
        "",
        f"Peak extra memory, MiB ({how}). Inputs are not counted; fwd+bwd includes the gradients of q, k, v. "
        f"'(N/B)^2 fp32' is one dense level-1 score matrix per (batch, head), times {per} (batch x heads); "
        "the '/(N/B)^2' columns divide by it; 'B/token' is LLSA fwd+bwd bytes per token.",
        "",
        "| N | dense fwd | dense fwd+bwd | LLSA selection | LLSA fwd | LLSA fwd+bwd | (N/B)^2 fp32 | "
        "LLSA selection /(N/B)^2 | LLSA fwd+bwd /(N/B)^2 | LLSA fwd+bwd B/token |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        dense_l1 = (r["n"] / args.block) ** 2 * 4 * per
        lines.append(f"| {r['n']:,} | {fmt_mib(r['mem_dense_fwd'])} | {fmt_mib(r['mem_dense_fwd_bwd'])} | "
                     f"{fmt_mib(r['mem_llsa_select'])} | {fmt_mib(r['mem_llsa_fwd'])} | "
                     f"{fmt_mib(r['mem_llsa_fwd_bwd'])} | {fmt_mib(int(dense_l1))} | "
                     f"{r['mem_llsa_select'] / dense_l1:.2f} | {r['mem_llsa_fwd_bwd'] / dense_l1:.2f} | "
                     f"{r['mem_llsa_fwd_bwd'] / r['n']:,.0f} |")
    return lines


def write_report(rows: list[dict], args, argv: list[str] | None) -> None:
    """Markdown table + provenance (date, CPU, versions, exact command)."""
    col = {k: [r[k] for r in rows] for k in rows[0]}
    g = {k: growth(col[k]) for k in ("llsa_f", "llsa_fb", "dense_f", "dense_fb")}
    lines = [
        "| N | levels | keys/query | dense fwd ms | LLSA fwd ms | dense fwd+bwd ms | LLSA fwd+bwd ms | "
        "growth/doubling dense fwd · fwd+bwd | growth/doubling LLSA fwd · fwd+bwd | speed-up fwd+bwd |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        speed = f"{r['dense_fb'] / r['llsa_fb']:.2f}x" if r["dense_fb"] else "–"
        lines.append(f"| {r['n']:,} | {r['levels']} | {r['keys']} | {fmt_ms(r['dense_f'])} | {fmt_ms(r['llsa_f'])} | "
                     f"{fmt_ms(r['dense_fb'])} | {fmt_ms(r['llsa_fb'])} | {g['dense_f'][i]} · {g['dense_fb'][i]} | "
                     f"{g['llsa_f'][i]} · {g['llsa_fb'][i]} | {speed} |")
    lines.append(f"| geometric mean | | | | | | | {geo_growth(col['dense_f'])} · {geo_growth(col['dense_fb'])} | "
                 f"{geo_growth(col['llsa_f'])} · {geo_growth(col['llsa_fb'])} | |")
    if "mem_llsa_fwd" in rows[0]:
        lines += memory_table(rows, args)
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU: {cpu_model()}"
    cmd = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    backend = "triton" if (args.backend or "auto") != "torch" and args.device == "cuda" else "torch reference"
    head = [
        "# LLSA vs dense attention: time and peak memory against sequence length",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- device: {device}; {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, triton {triton_v}",
        f"- command: `{cmd}`",
        f"- shapes: batch {args.batch}, heads {args.heads}, head dim {args.head_dim}, {args.dtype}; LLSA block "
        f"{args.block}, top-K {args.top_k} per level, levels = floor(log_B N) - 1 (clamped 1..3), enrichment "
        f"and reweighting on, non-causal; LLSA path: {backend}; dense: torch SDPA",
        f"- times: median of up to {args.reps} runs after a warm-up (whole op from q, k, v: LLSA includes pooling "
        "and selection)",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(head + lines) + "\n"
    if out.exists():  # keep hand-written notes below the generated part
        old = out.read_text()
        marker = "\n## Notes"
        if marker in old:
            text += old[old.index(marker):]
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
