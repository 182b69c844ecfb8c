"""AOT compile test: every Triton kernel variant the host code can launch compiles for sm_90 and sm_80, no GPU needed.

How: one subprocess runs `python -m tokensel.kernels.aot` (the harness, `src/tokensel/kernels/aot.py`) with every
TRITON_* variable of this process removed (conftest.py sets TRITON_INTERPRET=1 on CPU, and Triton reads it when a
kernel is *defined*, so the kernels must be imported in a clean process) and a fresh TRITON_CACHE_DIR under
tmp_path, so everything really compiles. It compiles in parallel, one worker per CPU (at most 8; on this
project's 2-core machines about 90 s for the 280 distinct compiles below), with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` and ptxas from the triton wheel, and reads from each build: registers and
spills (ptxas -v), shared memory (`metadata.shared`), the MMA instructions in the PTX.

Which variants: each kernel module's `launch_variants()`, next to its host code and built with the host's own
config helpers, so the list moves with the host. The full product of the axes below is ~2,450 builds per target
(fused CE 96: 12 tile/dtype pairs x bias x softcap x 2 kernels; LLSA 2,304: 576 plans of 3-6 kernels; pack 48), about
50 minutes on 2 cores, far over the CI budget, so the modules use a covering design (`aot.pairwise`): seeds, then
greedily chosen rows until every value pair of every two axes is in some row (so every value of every axis
appears, and every pair of code-path-changing flags):

* fused CE (`fused_linear_ce.launch_variants`): axes tile (all 5 `TILE_CANDIDATES`) x dtype (bf16, fp16, fp32
  "ieee", fp32 "tf32") x bias x softcap; seeds = the full bias x softcap product at the `TILE_TABLE` tile for
  bf16 and exact fp32. 19 rows, fwd + dlogits each. fp32 with the 16-bit BLOCK_K 64 tiles is not enumerated (the
  host never picks it; see that docstring: it would not fit shared memory / spills KBs).
* LLSA (`llsa.launch_variants`): dtype x shape (B 16 tl.dot at D 64, 128, 96; B 4 broadcast path at D 12) x
  levels 1-3 x causal x enrich x length (coarsest level 1 / 32 / 128 tokens: BT 16-64, top-K clamped to 1, an int
  specialized to the constant 1); seeds = the defaults at D 64 / 128 for bf16 and exact fp32 and one enriched
  3-level broadcast plan. 19 plans; each gives fwd, dq, dkv and, enriched, dpkv per level (split or not) and dtop.
* pack: every BLOCK_C the host's `_grid` can produce (1 ... 128), dtypes cycling.
Unbounded constexprs take representative values: top-K 8 (and 1 by clamping), D as above, group_m 8.

Staleness: the harness finds every `@triton.jit` function of `tokensel.kernels` after the modules' lazy set-up and
fails when a kernel has no variant (helpers count as covered through the kernels that call them), when a variant
misses or invents a parameter, when a bool constexpr only ever takes one value (unless the module states why in
`AOT_SINGLE_VALUED`), or when a module defines kernels without `launch_variants()`.

Limits (below): shared memory within the target's per-block limit; no spills except `SPILL_BOUNDS` (measured with
Triton 3.9.0; another Triton version can move them, the message says which); the fused CE matmuls use wgmma on
sm_90 at bf16/fp16 (and tf32), mma.sync on sm_80, no MMA for exact fp32; LLSA's tl.dot path uses an MMA of its
dtype unless the precision is exact fp32, where no TF32 MMA may appear. The list of compiled variants is printed
(`-s`) and written to tmp_path; `benchmarks/aot_compile.py` writes the summary table to benchmarks/results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# Spill bounds (bytes, max of ptxas spill stores / loads per thread), first match wins, none -> 0.
# (kernel name contains, target or None, tags that must match (a tuple = any of), bound, why / measured max)
SPILL_BOUNDS = [
    ("fused_linear_ce._fwd_kernel", None, {"tiles": "128x256x64_w8_s3"}, 16384,
     "tiles=128x256 candidate (never chosen by TILE_TABLE; TILE_CANDIDATES: not for softcap heads unmeasured): "
     "bias+softcap 2.5 KB on sm_90, 15.5 KB on sm_80; without 148 / 432 B"),
    ("fused_linear_ce._dlogits_kernel", None, {"tiles": "128x256x64_w8_s3"}, 2048,
     "tiles=128x256 candidate: bias+softcap 1.3 KB on sm_90, 528 B on sm_80"),
    ("fused_linear_ce._fwd_kernel", 80, {"tiles": "64x128x64_w4_s4"}, 512,
     "tiles=64x128 w4 candidate on sm_80: 416 B with bias+softcap (sm_90: 8 B)"),
    ("fused_linear_ce._fwd_kernel", None, {"dtype": "fp32-ieee"}, 256,
     "exact fp32 (FMA, operands in registers) at the default x32 tile: 76 B on sm_90, 192 B on sm_80"),
    ("fused_linear_ce._dlogits_kernel", None, {"dtype": "fp32-ieee"}, 32, "exact fp32: 16 B with bias+softcap"),
    ("fused_linear_ce._fwd_kernel", None, {}, 32,
     "255 registers at a 128x128 fp32 accumulator: bias or softcap add 4-16 B (default tile: 8 B)"),
    ("llsa.", None, {"dtype": "fp32-ieee", "shape": ("b16d96", "b16d128")}, 512,
     "exact fp32 at D >= 96 (FMA, BT 16, 8 warps): dkv / dtop / dq spill 200-436 B on both targets (found by this "
     "test; _tiles() removed the spills at D 64 only)"),
    ("llsa.", None, {"dtype": "fp32-tf32", "shape": ("b16d96", "b16d128")}, 128,
     "TF32 at D >= 96 with BT 64 (4 warps): dtop 64-112 B"),
    ("llsa.", 80, {}, 32, "sm_80 builds: up to 16 B (dq, dpkv; the engineers saw up to 20 B)"),
]


def _spill_bound(row) -> tuple[int, str]:
    for kernel, arch, tags, bound, why in SPILL_BOUNDS:
        if kernel in row["kernel"] and arch in (None, row["arch"]) and all(
                row["tags"].get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in tags.items()):
            return bound, why
    return 0, "no spills expected"


def _expected_mma(row) -> str | None:
    """The MMA the build must use: "wgmma.bf16" etc., "mma" (any instruction, suffix = `kind`), "fma", or None."""
    dt, arch, c = row["tags"].get("dtype"), row["arch"], row["constexprs"]
    kind = {"bf16": "bf16", "fp16": "f16", "fp32-tf32": "tf32"}.get(dt)
    if row["kernel"].startswith("fused_linear_ce."):
        return "fma" if dt == "fp32-ieee" else ("wgmma." if arch >= 90 else "mma.sync.") + kind
    if row["kernel"].startswith("llsa."):
        return "fma" if not c["USE_DOT"] or c["PRECISION"] == "ieee" else "mma:" + kind
    return None


def _toolchain_or_skip():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'tokensel[kernels]')")
    from tokensel.kernels.aot import toolchain_problem

    why = toolchain_problem()
    if why:
        pytest.skip(f"cannot compile for sm_90 / sm_80 here: {why}")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    _toolchain_or_skip()
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    out = tmp / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "tokensel.kernels.aot", "--json", str(out), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert out.exists(), f"the AOT harness crashed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    rep = json.loads(out.read_text())
    from tokensel.kernels.aot import format_rows, summary_table

    listing = format_rows(rep)
    (tmp / "aot_variants.txt").write_text(listing + "\n")
    print(f"\n{listing}\n\n{summary_table(rep)}\n{proc.stdout.strip().splitlines()[-1]}\n"
          f"(listing: {tmp / 'aot_variants.txt'})")
    return rep


def _fail(title: str, lines: list[str], detail: str = ""):
    pytest.fail(f"{title}\n" + "\n".join(f"  {x}" for x in lines) + (f"\n{detail}" if detail else ""), pytrace=False)


def test_every_kernel_and_constexpr_is_covered(report):
    assert report["inventory"]["kernels"], "no Triton kernel found"
    if report["coverage_problems"]:
        _fail("launch variants are stale (tokensel.kernels.aot.collect):", report["coverage_problems"])


def test_every_variant_compiles_for_sm90_and_sm80(report):
    assert {r["arch"] for r in report["rows"]} == {90, 80}
    bad = [r for r in report["rows"] if not r["ok"] and r["same_as"] is None]
    if bad:
        first = bad[0]
        _fail(f"{len(bad)} of {report['compiled']} builds failed (triton {report['triton']}):",
              [f"sm{r['arch']} {r['label']}: {r['error'].splitlines()[0]}" for r in bad],
              f"first failure, sm{first['arch']} {first['label']}:\n    " + first["error"].replace("\n", "\n    "))


def test_shared_memory_within_target_limit(report):
    limit = {int(a): b for a, b in report["smem_limit"].items()}
    over = [r for r in report["rows"] if r["ok"] and r["smem"] > limit[r["arch"]]]
    if over:
        _fail("shared memory over the per-block limit:",
              [f"sm{r['arch']} {r['label']}: {r['smem']} B > {limit[r['arch']]} B" for r in over])


def test_no_register_spills_beyond_stated_bounds(report):
    over = [r for r in report["rows"] if r["ok"] and max(r["spill_stores"], r["spill_loads"]) > _spill_bound(r)[0]]
    if over:
        _fail(f"register spills over SPILL_BOUNDS (measured with triton 3.9.0; this is {report['triton']}):",
              [f"sm{r['arch']} {r['label']}: spill stores/loads {r['spill_stores']}/{r['spill_loads']} B > "
               f"{_spill_bound(r)[0]} B ({_spill_bound(r)[1]}); regs {r['regs']}" for r in over])


def test_matmul_kernels_use_the_expected_mma(report):
    wrong, checked = [], 0
    for r in report["rows"]:
        want = _expected_mma(r)
        if not r["ok"] or want is None:
            continue
        checked += 1
        if want.startswith("mma:"):  # any MMA instruction, of this operand kind
            good = r["mma"] != "fma" and r["mma"].endswith("." + want[4:])
        else:
            good = r["mma"] == want
        if not good:
            wrong.append(f"sm{r['arch']} {r['label']}: {r['mma']}, want {want}")
    hopper = [r for r in report["rows"] if r["arch"] == 90 and r["kernel"].startswith("fused_linear_ce.")
              and r["tags"]["dtype"] in ("bf16", "fp16")]
    if not hopper or not all(r["ok"] for r in hopper):
        wrong.append(f"{sum(not r['ok'] for r in hopper)} of {len(hopper)} sm_90 bf16/fp16 fused CE builds failed: "
                     "no wgmma to check")
    if wrong:
        _fail(f"unexpected MMA instructions ({len(wrong)} of {checked} builds checked):", wrong)
