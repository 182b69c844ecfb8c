"""AOT-compile every Triton kernel variant the host code can launch for sm_90 and sm_80 (no GPU needed) and
write a summary to benchmarks/results/aot_compile.md: per kernel and target the variants, distinct compiles,
registers, worst spill, shared memory, MMA instructions, then every build that spills.

    python benchmarks/aot_compile.py [--workers N] [--out benchmarks/results/aot_compile.md]

The same harness (`tokensel.kernels.aot`) drives `tests/kernels/test_aot_compile.py`, which checks the limits.
It runs in a subprocess with no TRITON_* variables and a fresh Triton cache (Triton reads TRITON_INTERPRET when a
kernel is defined; a cache hit would skip ptxas and its register / spill report).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from tokensel.kernels.aot import default_workers, summary_table
from tokensel.machine import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} logical cores visible (no GPU needed)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "aot_compile.md"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        out = os.path.join(tmp, "aot.json")
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "tokensel.kernels.aot", "--json", out, "--quiet",
                               "--workers", str(a.workers)], env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if not os.path.exists(out):
            print(proc.stderr, file=sys.stderr)
            return proc.returncode or 1
        with open(out) as f:
            rep = json.load(f)
    spills = sorted((r for r in rep["rows"] if r["ok"] and r["same_as"] is None
                     and max(r["spill_stores"], r["spill_loads"]) > 0),
                    key=lambda r: (r["kernel"], -r["arch"], -max(r["spill_stores"], r["spill_loads"])))
    failed = [r for r in rep["rows"] if not r["ok"] and r["same_as"] is None]
    lines = [
        "# AOT compile of the Triton kernels for sm_90 and sm_80",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- versions: python {platform.python_version()}, triton {rep['triton']} (its bundled ptxas)",
        f"- command: `python benchmarks/aot_compile.py --workers {a.workers}` "
        f"(the harness `python -m tokensel.kernels.aot`; the test `tests/kernels/test_aot_compile.py`)",
        f"- {rep['variants']} launch variants from the kernel modules' `launch_variants()`, {len(rep['rows'])} "
        f"(variant, target) rows, {rep['compiled']} distinct compiles, {len(failed)} failed; "
        f"{wall:.0f} s wall with {rep['workers']} workers",
        f"- coverage problems: {'; '.join(rep['coverage_problems']) or 'none'}",
        "- columns: variants = launches enumerated (a row per target); compiled = distinct builds (launches that "
        "differ only in parameters the kernel body never reads share one); regs = registers per thread; spill = "
        "max(ptxas spill stores, spill loads) per thread; smem = `metadata.shared`; MMA = instruction in the PTX "
        "(fma: none)",
        "",
        summary_table(rep),
        "",
        f"## Builds that spill ({len(spills)} of {rep['compiled']})",
        "",
        "| target | variant | regs | spill stores / loads B | smem KiB | MMA |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| sm_{r['arch']} | {r['label']} | {r['regs']} | {r['spill_stores']} / {r['spill_loads']} | "
              f"{r['smem'] / 1024:.0f} | {r['mma']} |" for r in spills]
    lines += ["", "## Notes", "",
              "- Limits the test holds these builds to: shared memory <= 227 KiB (sm_90) / 163 KiB (sm_80) per block; "
              "spills <= `SPILL_BOUNDS` in tests/kernels/test_aot_compile.py (0 unless a row there states a bound); "
              "fused CE bf16/fp16 on sm_90 use wgmma.",
              "- Not enumerated (see `fused_linear_ce.launch_variants`): fp32 inputs with a BLOCK_K 64 candidate, "
              "which "
              "only an explicit `tiles=` reaches; those builds need 192-288 KiB of shared memory and, in exact fp32, "
              "spill 10-40 KB per thread.",
              "- LLSA's 16-row tiles (B = 16) lower to mma.sync on sm_90 too (wgmma needs 64-row tiles per warp "
              "group); only dtop with a 64-key tile uses wgmma."]
    if failed:
        lines += ["", "## Failed builds", ""] + [f"- sm_{r['arch']} {r['label']}: {r['error'].splitlines()[0]}"
                                                 for r in failed]
    text = "\n".join(lines) + "\n"
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
