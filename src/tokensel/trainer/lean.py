"""Lean checkpoints: leave frozen weights out, keep a fingerprint of them, rebuild and check them on load.

A LoRA run (or a frozen ViT backbone) trains a few percent of the weights; the rest is the base the module
builds from its config (`model` id / folder, `model_config` + seed, `backbone`). `strip_frozen` removes
the frozen parameters from a checkpoint's `state_dict` and stores `FINGERPRINT` (where the base comes
from, its dtype, how many tensors, and a sha256 of them); `restore_frozen` compares that fingerprint
with the base the config built and puts the live frozen tensors back into the `state_dict`, so Lightning's
loader (strict or not) and `trainer export` see a complete one. Buffers always stay in the checkpoint
(Dynamic Tuning's calibrated offsets are buffers that train).

Hash cost: sha256 runs at ~1.1 GB/s on one CPU core (0.5 s for SmolLM2-135M's 540 MB of fp32 weights,
measured); the frozen weights never change, so it is computed once per process. Above
`FULL_HASH_BYTES` (an 8B base in bf16 would take ~15 s) each tensor is hashed on `SAMPLE` evenly spaced
elements plus its name, shape and dtype instead: still tells one base from another, in milliseconds.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from tokensel.errors import ConfigError

FINGERPRINT = "frozen_base"
FULL_HASH_BYTES = 4 << 30
SAMPLE = 65536


def frozen_keys(module: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """State-dict keys of parameters that do not train (tied names included), minus the `skip` prefixes."""
    return [n for n, p in module.named_parameters(remove_duplicate=False)
            if not p.requires_grad and not n.startswith(skip)]


def trainable_keys(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fingerprint(module: nn.Module, source: str, skip: tuple[str, ...] = (), dtype: str | None = None) -> dict:
    """{source, dtype, tensors (names), bytes (storage), method, sha256} of the module's frozen parameters;
    `dtype` hashes them cast to that dtype (a checkpoint written under `precision: bf16-true` from a float32
    config: the cast is deterministic, so the float32 base rebuilt at export hashes like the bf16 one)."""
    keys = frozen_keys(module, skip)
    params = dict(module.named_parameters(remove_duplicate=False))
    target = getattr(torch, dtype) if dtype else None
    dtypes = {_dtype_name(target or params[k].dtype) for k in keys}
    unique = {params[k].data_ptr(): params[k] for k in keys}.values()  # a tied weight counts once
    size = sum(p.numel() * (target or p.dtype).itemsize for p in unique)
    full = size <= FULL_HASH_BYTES
    h = hashlib.sha256()
    seen: dict[tuple[int, torch.dtype], str] = {}
    for k in keys:
        p = params[k].detach()
        t = p.to(target) if target is not None else p
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        ident = (p.data_ptr(), p.dtype)
        if ident in seen:  # a tied weight: the same storage as an earlier key
            h.update(f"tied:{seen[ident]};".encode())
            continue
        seen[ident] = k
        flat = t.reshape(-1)
        if not full and flat.numel() > SAMPLE:
            # integer positions: the same elements on every device (a float linspace rounds differently)
            flat = flat[torch.arange(SAMPLE, device=flat.device) * (flat.numel() - 1) // (SAMPLE - 1)]
        h.update(flat.contiguous().cpu().view(torch.uint8).numpy())
    return {"source": source, "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed", "tensors": len(keys),
            "bytes": int(size), "method": "sha256" if full else f"sha256-sampled{SAMPLE}", "sha256": h.hexdigest()}


def _describe(fp: dict) -> str:
    return f"{fp['source']} ({fp['dtype']}, {fp['tensors']} frozen tensors, sha256 {fp['sha256'][:12]})"


def strip_frozen(module: nn.Module, checkpoint: dict, source: str, skip: tuple[str, ...] = ()) -> None:
    """Drop the frozen parameters from `checkpoint["state_dict"]` and record their fingerprint (nothing when
    every parameter trains). The fingerprint is cached on the module: frozen weights never change."""
    sd = checkpoint.get("state_dict")
    keys = [k for k in frozen_keys(module, skip) if sd is not None and k in sd]
    if not keys:
        return
    cached = getattr(module, "_frozen_fingerprint", None)
    if cached is None:
        cached = fingerprint(module, source, skip)
        module._frozen_fingerprint = cached
    for k in keys:
        del sd[k]
    checkpoint[FINGERPRINT] = dict(cached)


def restore_frozen(module: nn.Module, checkpoint: dict, source: str, skip: tuple[str, ...] = ()) -> None:
    """Check a lean checkpoint's fingerprint against the base the config built, then fill its `state_dict`
    with the live frozen tensors (cast to the dtype it was trained in). A full checkpoint passes untouched.

    Raises:
        ConfigError: the config builds another base, or the checkpoint lacks weights that train here.
    """
    want = checkpoint.get(FINGERPRINT)
    sd = checkpoint.get("state_dict")
    if want is None or sd is None:
        return
    dtype = want["dtype"] if want["dtype"] != "mixed" else None
    got = fingerprint(module, source, skip, dtype=dtype)
    if (got["sha256"], got["tensors"]) != (want["sha256"], want["tensors"]):
        raise ConfigError(f"checkpoint was trained on the frozen base {_describe(want)} but the config builds "
                          f"{_describe(got)}; set model.init_args (model / model_config / backbone, lora, "
                          "finetune) as in the run that wrote it")
    missing = [k for k in trainable_keys(module) if k not in sd]
    if missing:
        raise ConfigError(f"checkpoint lacks {len(missing)} weights that train under this config (e.g. "
                          f"{missing[0]}); set model.init_args (lora / finetune) as in the run that wrote it")
    live = module.state_dict(keep_vars=False)
    target = getattr(torch, dtype) if dtype else None
    for k in frozen_keys(module, skip):
        if k not in sd:
            sd[k] = live[k] if target is None or live[k].dtype == target else live[k].to(target)
