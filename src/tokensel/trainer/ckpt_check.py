"""`--ckpt_path` checked before Lightning touches it, for fit, validate, test and predict: a missing path, a file
that is no checkpoint (truncated, random bytes, another format), and a checkpoint of another model or recipe
each stop with one line saying what is wrong and what differs, instead of a traceback from deep inside
`torch.load` or `load_state_dict`."""

from __future__ import annotations

from pathlib import Path

import torch

from tokensel.errors import TokenselError, first_line


def read_checkpoint(ckpt_path: str) -> dict | None:
    """The checkpoint's dict (memory-mapped: no copy of the weights), or None for a DeepSpeed folder."""
    p = Path(ckpt_path)
    if not p.exists():
        raise TokenselError(f"--ckpt_path {ckpt_path}: no such file or directory")
    if p.is_dir():
        return None  # a DeepSpeed ZeRO folder: strategies.check_resume judges it
    import zipfile

    if not zipfile.is_zipfile(p):  # what torch.save writes; a copy cut short loses its directory at the end
        raise TokenselError(f"--ckpt_path {ckpt_path}: not a checkpoint (not a complete torch zip archive: truncated, "
                            "random bytes or another format); pass a .ckpt written by trainer fit")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch / pickle / zipfile raise many types for a bad file
        raise TokenselError(f"--ckpt_path {ckpt_path}: not a checkpoint tokensel can read ({first_line(e)}); it may "
                            "be truncated (a copy cut short) or another format; pass a .ckpt written by trainer "
                            "fit") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("state_dict"), dict):
        raise TokenselError(f"--ckpt_path {ckpt_path}: a torch file but not a Lightning checkpoint (no state_dict); "
                            "pass a .ckpt written by trainer fit")
    return ck


def check_recipe(ckpt_path: str, ck: dict | None, config) -> None:
    """Refuse a checkpoint written by another model or data class than the config's (Lightning would rebuild
    the checkpoint's model from its hyperparameters and fail later, deep inside a step, on the other data)."""
    if ck is None:
        return
    for key, saved in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        wrote = (ck.get(saved) or {}).get("_class_path") if isinstance(ck.get(saved), dict) else None
        node = config.get(key) if hasattr(config, "get") else None
        want = node.get("class_path") if node is not None and hasattr(node, "get") else None
        if wrote and isinstance(want, str) and wrote.rpartition(".")[2] != want.rpartition(".")[2]:
            raise TokenselError(f"--ckpt_path {ckpt_path}: written by a {wrote.rpartition('.')[2]} run, but this "
                                f"config's {key} is {want.rpartition('.')[2]}; use the recipe it was trained with")


def check_checkpoint(ckpt_path: str, model) -> None:
    """Refuse a checkpoint whose weights do not fit `model` (another model, size or recipe), naming what differs:
    the class that wrote it, missing / unexpected weights, different shapes. Weights a module deliberately leaves
    out of its checkpoints (frozen bases of lean checkpoints, reference / teacher models) are not required."""
    ck = read_checkpoint(ckpt_path)
    if ck is None or model is None:
        return
    want = model.state_dict()
    if not want:  # built lazily (configure_model): nothing to compare yet
        return
    from tokensel.trainer.lean import FINGERPRINT, frozen_keys

    skip = tuple(getattr(model, "checkpoint_skip_prefixes", ()))
    optional = set(frozen_keys(model, skip)) if FINGERPRINT in ck else set()
    sd = ck["state_dict"]
    missing = [k for k in want if k not in sd and k not in optional and not k.startswith(skip)]
    unexpected = [k for k in sd if k not in want and not k.startswith(skip)]
    shapes = [(k, tuple(sd[k].shape), tuple(want[k].shape)) for k in want
              if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(want[k].shape)]
    if not (missing or unexpected or shapes):
        return
    wrote = ck.get("hyper_parameters", {}) or {}
    what = []
    if missing:
        what.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        what.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        k, a, b = shapes[0]
        what.append(f"{len(shapes)} of another shape (e.g. {k}: checkpoint {list(a)}, model {list(b)})")
    src = wrote.get("model") or wrote.get("backbone") or wrote.get("model_config")
    origin = f" (it was written for model {str(src)[:80]!r})" if src else ""
    raise TokenselError(f"--ckpt_path {ckpt_path}: written for another model or recipe{origin}: {'; '.join(what)}; "
                        f"use the recipe and model settings it was trained with")
