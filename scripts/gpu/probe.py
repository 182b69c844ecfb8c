"""Environment probe of scripts/gpu_check.sh: versions, the pyproject requirement check, imports, and (on CUDA)
device facts, the cuBLAS / copy ceilings and the fp32-output matmul the fused CE's dX accumulation uses.

    python scripts/gpu/probe.py [--dry-run]      # --dry-run: everything that needs no GPU
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
OTHER = ("lightning", "pytorch-lightning", "peft", "datasets", "jsonargparse", "liger-kernel", "cut-cross-entropy",
         "huggingface-hub", "tokenizers", "regex", "pyarrow", "fsspec", "dill", "multiprocess", "xxhash", "setuptools",
         "wheel", "pytest", "pytest-timeout", "hypothesis", "torchvision")
IMPORTS = ("tokensel", "tokensel.kernels.fused_linear_ce", "tokensel.kernels.llsa", "tokensel.kernels.pack",
           "transformers", "jsonargparse", "datasets", "peft", "liger_kernel.transformers.functional",
           "cut_cross_entropy")


def requirements() -> list[str]:
    """`ok` / `BAD` per pyproject dependency (and the kernels extra) against what python sees."""
    from packaging.requirements import Requirement

    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = []
    for spec in proj["dependencies"] + proj["optional-dependencies"]["kernels"]:
        req = Requirement(spec)
        try:
            version = md.version(req.name)
            ok = req.specifier.contains(version, prereleases=True)
        except md.PackageNotFoundError:
            version, ok = "ABSENT", False
        lines.append(f"  {'ok ' if ok else 'BAD'} {spec:32s} {version}")
    return lines


def versions() -> list[str]:
    out = []
    for name in OTHER:
        try:
            out.append(f"  {name:18s} {md.version(name)}")
        except md.PackageNotFoundError:
            out.append(f"  {name:18s} ABSENT")
    return out


def imports() -> list[str]:
    out = []
    for mod in IMPORTS:
        t0 = time.time()
        try:
            importlib.import_module(mod)
            out.append(f"  ok   {mod} ({time.time() - t0:.1f}s)")
        except Exception as e:  # report every failure, keep probing
            out.append(f"  FAIL {mod}: {type(e).__name__}: {str(e)[:200]}")
    return out


def cuda_facts() -> None:
    import torch

    from tokensel.kernels import fused_linear_ce as F

    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name} cc {p.major}.{p.minor} SMs {p.multi_processor_count} "
          f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB mem {p.total_memory / 2**30:.0f} GiB")
    print("allow_tf32(matmul)", torch.backends.cuda.matmul.allow_tf32, "| float32_matmul_precision",
          torch.get_float32_matmul_precision())

    def ev_ms(fn, reps=10, warm=3):
        for _ in range(warm):
            fn()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / reps

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    t = ev_ms(lambda: a @ b)
    print(f"ceiling: cuBLAS bf16 8192^3 {2 * 8192 ** 3 / t / 1e9:.0f} TFLOP/s ({t:.2f} ms)")
    src = torch.empty(2 ** 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = ev_ms(lambda: dst.copy_(src))
    print(f"ceiling: d2d copy 1 GiB {2 * 2 ** 30 / t / 1e9:.0f} GB/s (read+write)")
    a = b = src = dst = None  # free the ceilings' buffers
    # the dX accumulation of the fused CE backward: which fp32-output product it found, and what each costs
    for dtype in (torch.bfloat16, torch.float16):
        mode = F._fp32_mm_mode(torch.device("cuda"), dtype)
        print(f"fused CE dX accumulation mode for {dtype}: {mode} (addmm = fused fp32-output addmm, the fast path)")
    k, h, vc = 16384, 4096, 8192
    dz = torch.randn(k, vc, device="cuda", dtype=torch.bfloat16) * 1e-3
    w = torch.randn(vc, h, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(k, h, device="cuda", dtype=torch.float32)
    for mode in ("addmm", "mm", "lowp"):
        try:
            t = ev_ms(lambda mode=mode: F._accumulate_fp32_(acc, dz, w, mode), reps=5, warm=1)
            print(f"  dX slice {k}x{vc} @ {vc}x{h} via {mode:5s}: {t:.2f} ms ({2 * k * vc * h / t / 1e9:.0f} TF/s)")
        except Exception as e:
            print(f"  dX slice via {mode}: {type(e).__name__}: {str(e)[:160]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="skip everything that needs a GPU")
    args = p.parse_args()
    import torch

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "ABSENT"
    print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
          "| triton", tv, "| cuda available", torch.cuda.is_available())
    print("\npyproject requirements (installed version as python sees it):")
    print("\n".join(requirements()))
    print("\nother versions:")
    print("\n".join(versions()))
    print("\nimports:")
    print("\n".join(imports()))
    if args.dry_run or not torch.cuda.is_available():
        print("\n(dry run: no device facts, ceilings or matmul probes)" if args.dry_run else "\nno CUDA device")
        return
    print()
    cuda_facts()


if __name__ == "__main__":
    main()
