"""Ahead-of-time compile of every Triton kernel variant the host code can launch, for GPU targets, without a GPU.

Triton compiles for a target it is not running on: `triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", 90, 32))` runs the whole path to a cubin with the ptxas bundled in the triton wheel.
This module is the harness behind `tests/kernels/test_aot_compile.py` and `benchmarks/aot_compile.py`:

* Each `tokensel.kernels.*` module that defines Triton kernels has a `launch_variants()` beside its host code,
  returning `Variant`s: one kernel, the value of every parameter as the host would pass it (constexprs as
  values, pointers as `"*bf16"`-style strings, scalars as representative Python numbers that Triton
  specializes exactly as at launch: an int equal to 1 becomes a constexpr, a multiple of 16 gets the
  divisibility attribute) and the launch options (num_warps, num_stages).
* `collect()` imports those modules (TRITON_INTERPRET must be unset: Triton reads it when a kernel is defined),
  gathers the variants and checks them against every `JITFunction` the modules define (found with `gc` after the
  modules' lazy set-up ran): a kernel without variants, a variant missing or inventing a parameter, or a bool
  constexpr that only ever takes one value (unless the module lists it in `AOT_SINGLE_VALUED` with a reason)
  is a coverage problem. JIT helpers (`@triton.jit` functions called by a covered kernel) are covered through
  the kernels that call them.
* `run()` compiles each distinct variant for each target in worker processes and reads from the result:
  registers, spill stores / loads and stack frame (ptxas -v log), shared memory (`metadata.shared`), the MMA
  instructions in the PTX (`wgmma.mma_async`, `mma.sync`, or none: FMA). Variants that differ only in
  constexprs the kernel body never reads compile to the same code and are compiled once.

CLI: `python -m tokensel.kernels.aot --json out.json [--arch 90,80] [--workers 2] [--filter SUBSTR]`; exit status
0 when everything compiled and is covered, 2 on a coverage problem or a failed compile (the JSON has them all),
3 when the toolchain (triton's nvidia backend / ptxas) is missing. The limits (spills, shared memory, MMA) are
checked by the test, which states them.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import importlib
import inspect
import io
import itertools
import json
import os
import pkgutil
import re
import sys
import textwrap
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# usable shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): H100/H200 227 KiB, A100 163 KiB
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}
TARGETS = (90, 80)
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
                 "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def ptr(dtype) -> str:
    """Triton signature type of a tensor argument of torch dtype `dtype` (e.g. torch.bfloat16 -> "*bf16")."""
    return "*" + TRITON_DTYPES[str(dtype).removeprefix("torch.")]


@contextlib.contextmanager
def allow_tf32(value: bool):
    """Temporarily set `torch.backends.cuda.matmul.allow_tf32` (the host's precision switch)."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = value
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def pairwise(axes: dict[str, Sequence], seeds: Sequence[dict] = (), valid=None) -> list[dict]:
    """A covering design: `seeds`, then rows of the full product of `axes` (those `valid(row)` accepts) picked
    greedily (most not yet covered value pairs first, ties in product order) until every pair of values of every
    two axes that some valid row has is in some row. Deterministic; every value of every axis appears."""
    names = list(axes)
    rows = [dict(s) for s in seeds]

    def pairs(row):
        return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}

    product = [dict(zip(names, vals)) for vals in itertools.product(*(axes[n] for n in names))]
    product = [r for r in product if valid is None or valid(r)]
    todo = set().union(*map(pairs, product))
    for r in rows:
        todo -= pairs(r)
    while todo:
        best = max(product, key=lambda r: len(pairs(r) & todo))
        rows.append(best)
        todo -= pairs(best)
    return rows


@dataclass
class Variant:
    """One launch the host code can make: `kernel` (a JITFunction) with `args` (every parameter by name)."""

    kernel: Any
    args: dict
    num_warps: int = 4
    num_stages: int = 3
    tags: dict = field(default_factory=dict)  # what the host chose it from (dtype, tile, level, ...), for the list

    @property
    def kernel_name(self) -> str:
        return f"{self.kernel.fn.__module__.rsplit('.', 1)[-1]}.{self.kernel.fn.__name__}"

    @property
    def label(self) -> str:
        tags = " ".join(f"{k}={v}" for k, v in self.tags.items())
        return f"{self.kernel_name} [{tags}] w{self.num_warps} s{self.num_stages}"


# ----------------------------------------------------------------------------------------- discovery


def kernel_modules() -> list[str]:
    """Every module of the `tokensel.kernels` package (the harness itself excluded)."""
    import tokensel.kernels as pkg

    return sorted(f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if m.name != "aot")


def _body_names(fn) -> set[str]:
    """Names read in the body of a JIT function (its docstring and signature excluded)."""
    src = textwrap.dedent(inspect.getsource(fn))
    node = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef))
    return {n.id for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Name)}


def _params(kernel) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of every parameter of a JITFunction."""
    return [(p.name, bool(p.is_constexpr)) for p in kernel.params]


def _helpers(kernel) -> list:
    """JIT functions a kernel calls, transitively (they compile as part of it)."""
    from triton.runtime.jit import JITFunction

    seen, stack = {}, [kernel]
    while stack:
        k = stack.pop()
        for name in _body_names(k.fn):
            obj = k.fn.__globals__.get(name)
            if isinstance(obj, JITFunction) and id(obj) not in seen and obj is not kernel:
                seen[id(obj)] = obj
                stack.append(obj)
    return list(seen.values())


def collect(modules: Sequence[str] | None = None) -> tuple[list[Variant], list[str], dict]:
    """(variants, coverage problems, inventory) of the kernel modules; see the module docstring."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("tokensel.kernels.aot: unset TRITON_INTERPRET (it turns kernels into interpreter objects "
                           "when they are defined; GPU targets need real JITFunctions)")
    from triton.runtime.jit import JITFunction

    modules = kernel_modules() if modules is None else list(modules)
    variants, problems, single = [], [], {}
    for name in modules:
        mod = importlib.import_module(name)
        src = inspect.getsource(mod)
        if not hasattr(mod, "launch_variants"):
            if "triton.jit" in src:
                problems.append(f"{name} defines Triton kernels but has no launch_variants(): add one beside its "
                                "host code (see tokensel.kernels.aot)")
            continue
        got = list(mod.launch_variants())
        if not got:
            problems.append(f"{name}.launch_variants() returned no variants")
        variants += got
        for kname, consts in getattr(mod, "AOT_SINGLE_VALUED", {}).items():
            single[f"{name.rsplit('.', 1)[-1]}.{kname}"] = consts
    with warnings.catch_warnings():  # isinstance() on some torch objects warns about deprecations
        warnings.simplefilter("ignore")
        jit = {id(o): o for o in gc.get_objects() if isinstance(o, JITFunction)
               and getattr(o.fn, "__module__", "").startswith("tokensel.kernels.")}
    by_kernel: dict[int, list[Variant]] = {}
    for v in variants:
        if not isinstance(v.kernel, JITFunction):
            problems.append(f"{v.label}: kernel is {type(v.kernel).__name__}, not a triton JITFunction")
            continue
        by_kernel.setdefault(id(v.kernel), []).append(v)
        jit.setdefault(id(v.kernel), v.kernel)
    helpers = {id(h): h for kid in by_kernel for h in _helpers(jit[kid])}
    inventory = {"kernels": {}, "helpers": sorted(f"{h.fn.__module__}.{h.fn.__name__}" for h in helpers.values())}
    for kid, k in sorted(jit.items(), key=lambda kv: (kv[1].fn.__module__, kv[1].fn.__name__)):
        kname = f"{k.fn.__module__.rsplit('.', 1)[-1]}.{k.fn.__name__}"
        vs = by_kernel.get(kid, [])
        if not vs:
            if kid not in helpers:
                problems.append(f"{kname}: a Triton kernel with no launch variant and called by no covered kernel; "
                                f"add its launches to {k.fn.__module__}.launch_variants()")
            continue
        params = _params(k)
        names = {p for p, _ in params}
        values: dict[str, set] = {p: set() for p, c in params if c}
        stale = {}
        for v in vs:
            missing, extra = names - set(v.args), set(v.args) - names
            if missing or extra:
                stale.setdefault((tuple(sorted(missing)), tuple(sorted(extra))), []).append(v)
            for p in values:
                if p in v.args:
                    values[p].add(repr(v.args[p]))
        for (missing, extra), bad in stale.items():
            problems.append(f"{kname}: {len(bad)} of {len(vs)} variants miss parameters {list(missing)} / pass unknown "
                            f"{list(extra)} (the kernel's signature changed; update launch_variants()), e.g. "
                            f"{bad[0].label}")
        fixed = single.get(kname, {})
        for p, vals in values.items():
            if vals <= {"True", "False"} and len(vals) == 1 and p not in fixed:
                problems.append(f"{kname}: bool constexpr {p} only ever {vals.pop()} in launch_variants(); cover "
                                "both values or list it in AOT_SINGLE_VALUED with the reason")
        inventory["kernels"][kname] = {"variants": len(vs), "constexprs": {p: sorted(s) for p, s in values.items()},
                                       "single_valued": fixed}
    return variants, problems, inventory


# ------------------------------------------------------------------------------------------- compile


def _specialize(value) -> tuple[str, str | None]:
    """Triton's launch-time specialization of a scalar argument: (type or "constexpr", attribute)."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl

        return native_specialize_impl(BaseBackend, value, False, True, True)
    except ImportError:  # older/newer triton: the same rules by hand
        if isinstance(value, bool):
            return "u1", None
        if isinstance(value, int):
            if value == 1:
                return "constexpr", 1
            ty = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
            return ty, "D" if value % 16 == 0 else ""
        return "fp32", None


def specialization(v: Variant) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for `ASTSource`, as `JITFunction.run` would build them for this launch."""
    sig, consts, attrs = {}, {}, {}
    for i, (name, is_const) in enumerate(_params(v.kernel)):
        val = v.args[name]
        if is_const:
            sig[name], consts[name] = "constexpr", val
        elif isinstance(val, str) and val.startswith("*"):
            sig[name] = val
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            ty, attr = _specialize(val)
            sig[name] = ty
            if ty == "constexpr":
                consts[name] = attr
            elif attr == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def dedup_key(v: Variant, arch: int):
    """Launches that compile to the same code: same options, and the same type, attributes and constexpr value
    of every parameter the kernel body reads (an unread parameter cannot change the code)."""
    sig, consts, attrs = specialization(v)
    used = _body_names(v.kernel.fn)
    names = [p for p, _ in _params(v.kernel)]
    return (v.kernel_name, arch, v.num_warps, v.num_stages,
            tuple((p, sig[p], repr(consts.get(p)), (i,) in attrs) for i, p in enumerate(names) if p in used))


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
}


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile one variant for sm_`arch`; returns what the compiled kernel says about itself (or the error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    t0 = time.time()
    out: dict[str, Any] = {"ok": False}
    log = io.StringIO()
    try:
        sig, consts, attrs = specialization(v)
        with contextlib.redirect_stdout(log):  # triton prints the ptxas -v log there
            k = triton.compile(ASTSource(v.kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
    except Exception as e:  # noqa: BLE001 -- any compiler error is a result to report
        out["error"] = _describe(e)
    else:
        ptx = k.asm["ptx"]
        text = log.getvalue()
        m = {key: rx.search(text) for key, rx in _PTXAS.items()}
        if m["regs"] is None:  # no ptxas log (e.g. a cache hit): fall back to cuobjdump -res-usage
            text = _res_usage(k.asm["cubin"])
            regs = re.search(r"REG:(\d+)", text)
            stack = re.search(r"STACK:(\d+)", text)
            out.update(regs=int(regs.group(1)) if regs else -1, stack=int(stack.group(1)) if stack else -1,
                       spill_stores=int(stack.group(1)) if stack else -1, spill_loads=-1)
        else:
            out.update(regs=int(m["regs"].group(1)), stack=int(m["stack"].group(1)) if m["stack"] else 0,
                       spill_stores=int(m["spill"].group(1)) if m["spill"] else 0,
                       spill_loads=int(m["spill"].group(2)) if m["spill"] else 0)
        mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if re.search(r"\bmma\.sync", ptx) else "fma")
        kind = next((t for t in ("bf16", "f16", "tf32") if re.search(rf"(wgmma|mma)[.\w]*\.{t}\b", ptx)), "")
        out.update(ok=True, smem=int(k.metadata.shared), mma=mma + (f".{kind}" if kind and mma != "fma" else ""))
    out["seconds"] = round(time.time() - t0, 2)
    return out


def _describe(e: BaseException) -> str:
    """A compile error as text: the root cause first (a nested JIT helper's error is chained), then the innermost
    source context Triton printed."""
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(nxt)
    root = chain[-1]
    cause = "".join(traceback.format_exception_only(type(root), root)).strip().splitlines()
    where = next((x for x in reversed(chain) if type(x).__name__ == "CompilationError"), e)
    context = "".join(traceback.format_exception_only(type(where), where)).strip().splitlines()
    return "\n".join([(cause[-1] if cause else type(root).__name__)[:500], *context[-14:]])[-3000:]


def _res_usage(cubin: bytes) -> str:
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout


def toolchain_problem(archs: Sequence[int] = TARGETS) -> str | None:
    """Why this machine cannot compile for `archs` (None when it can): triton, its nvidia backend, ptxas."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"triton or its nvidia backend is not installed ({e})"
    for arch in archs:
        try:
            path = get_ptxas(arch).path
        except Exception as e:  # noqa: BLE001 -- a missing binary raises RuntimeError in recent triton
            return f"no ptxas for sm_{arch} ({e})"
        if not path or not os.path.exists(path):
            return f"no ptxas for sm_{arch} ({path})"
    return None


_VARIANTS: list[Variant] = []  # the collected variants; forked workers inherit them


def _compile_task(task: tuple[int, int]) -> tuple[int, int, dict]:
    i, arch = task
    return i, arch, compile_variant(_VARIANTS[i], arch)


def _cost(v: Variant) -> float:
    """Rough compile-time order (longest first keeps both workers busy to the end)."""
    c = v.args
    tile = c.get("BLOCK_M", c.get("BS", 16)) * c.get("BLOCK_V", c.get("BLOCK_D", 16))
    return tile * (1 + c.get("LEVELS", 0)) * (2 if c.get("PRECISION") == "ieee" else 1)


def run(archs: Sequence[int] = TARGETS, workers: int = 2, only: str | None = None) -> dict:
    """Collect, check coverage, compile every distinct variant for every arch; a JSON-able report."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import triton

    t0 = time.time()
    variants, problems, inventory = collect()
    _VARIANTS[:] = variants
    rows, tasks, first = [], [], {}
    for i, v in enumerate(variants):
        if only and only not in v.label:
            continue
        for arch in archs:
            key = dedup_key(v, arch)
            consts = {p: v.args[p] for p, c in _params(v.kernel) if c}
            rows.append(dict(id=i, arch=arch, kernel=v.kernel_name, label=v.label, tags=v.tags, constexprs=consts,
                             num_warps=v.num_warps, num_stages=v.num_stages, same_as=first.get(key)))
            if key not in first:
                first[key] = len(rows) - 1
                tasks.append((i, arch))
    tasks.sort(key=lambda t: -_cost(variants[t[0]]))
    results: dict[tuple[int, int], dict] = {}
    if workers > 1 and len(tasks) > 1 and "fork" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("fork")  # workers inherit the collected variants (JITFunctions don't pickle)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for i, arch, res in pool.map(_compile_task, tasks, chunksize=1):
                results[(i, arch)] = res
    else:
        for t in tasks:
            i, arch, res = _compile_task(t)
            results[(i, arch)] = res
    for row in rows:
        src = rows[row["same_as"]] if row["same_as"] is not None else row
        row.update(results[(src["id"], src["arch"])])
    return dict(triton=triton.__version__, archs=list(archs), smem_limit={a: SMEM_LIMIT[a] for a in archs},
                coverage_problems=problems, inventory=inventory, variants=len(variants), compiled=len(tasks),
                rows=rows, wall_s=round(time.time() - t0, 1), workers=workers)


def format_rows(report: dict) -> str:
    """One line per (variant, arch): registers, spills, stack, shared memory, MMA kind (or the error)."""
    out = []
    for r in report["rows"]:
        dup = f" (= #{r['same_as']})" if r["same_as"] is not None else ""
        if r["ok"]:
            out.append(f"sm{r['arch']} {r['label']}: regs={r['regs']} spill={r['spill_stores']}/{r['spill_loads']}B "
                       f"stack={r['stack']}B smem={r['smem']} {r['mma']} {r['seconds']}s{dup}")
        else:
            out.append(f"sm{r['arch']} {r['label']}: FAILED {r['error'].splitlines()[0][:300]}{dup}")
    return "\n".join(out)


def summary_table(report: dict) -> str:
    """Markdown: per kernel and target, variants, distinct compiles, registers, worst spill, shared memory, MMA."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in report["rows"]:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    lines = ["| kernel | target | variants | compiled | failed | regs | max spill B | max smem KiB (limit) | MMA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (kernel, arch), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        ok = [r for r in rs if r["ok"]]
        regs = sorted(r["regs"] for r in ok)
        spill = max((max(r["spill_stores"], r["spill_loads"]) for r in ok), default=0)
        smem = max((r["smem"] for r in ok), default=0)
        mma = ", ".join(f"{k} x{n}" for k, n in sorted(_count(r["mma"] for r in ok).items()))
        lines.append(f"| {kernel} | sm_{arch} | {len(rs)} | {sum(r['same_as'] is None for r in rs)} | "
                     f"{len(rs) - len(ok)} | {regs[0] if regs else '-'}-{regs[-1] if regs else '-'} | {spill} | "
                     f"{smem / 1024:.0f} ({SMEM_LIMIT[arch] // 1024}) | {mma} |")
    return "\n".join(lines)


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def default_workers() -> int:
    """The CPUs this process may use (compiling is CPU-bound), at most 8."""
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:
        return max(1, min(8, os.cpu_count() or 1))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the report here")
    p.add_argument("--arch", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 90,80")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--filter", help="only variants whose label contains this")
    p.add_argument("--quiet", action="store_true", help="no per-variant lines")
    a = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported (it is read at definition)
    archs = [int(x) for x in a.arch.split(",")]
    why = toolchain_problem(archs)
    if why:
        print(f"aot: cannot compile for {archs}: {why}", file=sys.stderr)
        return 3
    report = run(archs, a.workers, a.filter)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    if not a.quiet:
        print(format_rows(report))
    bad = [r for r in report["rows"] if not r["ok"]]
    for prob in report["coverage_problems"]:
        print("COVERAGE:", prob)
    print(f"aot: triton {report['triton']}, {report['variants']} variants, {len(report['rows'])} (variant, arch) "
          f"rows, {report['compiled']} distinct compiles, {len(bad)} failed, {report['wall_s']}s "
          f"with {report['workers']} workers")
    return 2 if bad or report["coverage_problems"] else 0


if __name__ == "__main__":  # run the importable copy, so kernel modules and workers share its state
    from tokensel.kernels import aot

    sys.exit(aot.main())
