"""Peak memory and wall time of the chunked per-token linear-CE op vs naive full-logits CE.

    python benchmarks/per_token_ce.py                 # V=49152 (SmolLM2), H=576, N in {2048, 8192}
    python benchmarks/per_token_ce.py --n 2048 --h 576 --v 49152 --repeats 3

Each (provider, N) is measured in a fresh subprocess, so the peak resident memory it reports belongs to
that one configuration: "peak extra MiB" = peak RSS during forward+backward minus RSS after the inputs
were allocated. Both providers compute per-token loss and entropy, then backward with the upstream
gradient of `sum(w * loss) / sum(w)` (keep ratio 1.0, and 0.6 for the chunked op, which skips
unselected rows). Writes the table to benchmarks/results/per_token_ce.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from tokensel.machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "per_token_ce.md"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(provider: str, n: int, h: int, v: int, keep: float, repeats: int) -> dict:
    """Run one configuration in this process; return fwd/bwd ms and peak extra MiB."""
    import torch

    from tokensel.kernels.reference import linear_cross_entropy, naive_linear_cross_entropy

    torch.manual_seed(0)
    x = (torch.randn(n, h) * 0.5).requires_grad_()
    w = (torch.randn(v, h) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,))
    weights = (torch.rand(n) < keep).float()
    base = _current_rss_mib()
    fwd_ms, bwd_ms = [], []
    for _ in range(repeats):
        x.grad = w.grad = None
        t0 = time.perf_counter()
        if provider == "naive":
            loss, ent, _ = naive_linear_cross_entropy(x, w, t)
        else:
            loss, ent, _ = linear_cross_entropy(x, w, t, chunk_size=2048)
        t1 = time.perf_counter()
        ((loss * weights).sum() / weights.sum()).backward()
        t2 = time.perf_counter()
        fwd_ms.append((t1 - t0) * 1e3)
        bwd_ms.append((t2 - t1) * 1e3)
        del loss, ent
    return {"provider": provider, "n": n, "h": h, "v": v, "keep": keep, "fwd_ms": min(fwd_ms),
            "bwd_ms": min(bwd_ms), "peak_extra_mib": _rss_mib() - base}


def run_isolated(provider, n, h, v, keep, repeats) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", provider, "--n", str(n), "--h", str(h), "--v", str(v),
                          "--keep", str(keep), "--repeats", str(repeats)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--h", type=int, default=576)
    ap.add_argument("--v", type=int, default=49152)
    ap.add_argument("--keep", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.n[0], args.h, args.v, args.keep, args.repeats)))
        return
    import torch

    rows = []
    for n in args.n:
        naive = run_isolated("naive", n, args.h, args.v, 1.0, args.repeats)
        rows.append(naive)
        for keep in (1.0, 0.6):
            r = run_isolated("chunked", n, args.h, args.v, keep, args.repeats)
            r["mem_vs_naive"] = r["peak_extra_mib"] / max(naive["peak_extra_mib"], 1e-9)
            r["time_vs_naive"] = (r["fwd_ms"] + r["bwd_ms"]) / (naive["fwd_ms"] + naive["bwd_ms"])
            rows.append(r)
    head = ("| provider | N | H | V | keep | fwd ms | bwd ms | fwd+bwd ms | peak extra MiB | mem ÷ naive | "
            "time ÷ naive |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['provider']} | {r['n']} | {r['h']} | {r['v']} | {r['keep']} | {r['fwd_ms']:.0f} | "
                     f"{r['bwd_ms']:.0f} | {r['fwd_ms'] + r['bwd_ms']:.0f} | {r['peak_extra_mib']:.0f} | "
                     f"{r.get('mem_vs_naive', 1.0):.3f} | {r.get('time_vs_naive', 1.0):.2f} |")
    table = "\n".join(lines)
    print(table)
    cmd = "python benchmarks/per_token_ce.py " + " ".join(sys.argv[1:])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        f"# Per-token linear CE: chunked op vs naive full logits\n\n"
        f"- date: {date.today()}\n- machine: {cpu_model()}, {torch.get_num_threads()} torch threads, no GPU\n"
        f"- versions: torch {torch.__version__}, python {platform.python_version()}\n"
        f"- command: `{cmd.strip()}`\n- fp32; each row measured in its own subprocess; times are the best of "
        f"{args.repeats}; peak extra = peak RSS minus RSS after inputs (includes dX/dW buffers)\n\n{table}\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
