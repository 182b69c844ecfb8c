"""Writing Hugging Face folders: the weights' dtype, and the model code compute-side exports carry.

`save_hf(model, out_dir, dtype, remote_code)` is what every `export_hf` calls:

* `dtype` ("float32" | "bfloat16" | "float16", `trainer export --dtype`): floating-point weights are
  cast on the way to disk (tied weights stay tied); the live model is not touched, and `dtype` in the
  folder's config.json says what was written.
* `remote_code` (a key of `REMOTE_CODE`): the listed source files are copied flat into the folder and
  `config.json` gets an `auto_map`, the layout transformers' `register_for_auto_class` produces. Then
  `AutoModel*.from_pretrained(DIR, trust_remote_code=True)` runs the pruned model with only torch and
  transformers installed. transformers' own `custom_object_save` cannot do it: it copies only files
  beside the model's file, and ours span `modules/`, `kernels/` and `errors.py`. The files import each
  other as `tokensel.<pkg>.<mod>` inside `try/except ImportError`, falling back to `.<mod>` (the
  bundled sibling); transformers ignores imports in `try` blocks when it checks requirements.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from tokensel.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[1]
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# model family -> (source files relative to the package, auto_map written into config.json)
REMOTE_CODE = {
    "vit": (("modules/modeling_vit.py", "modules/dynamic_tuning.py", "modules/spa.py", "kernels/pack.py",
             "errors.py"),
            {"AutoConfig": "modeling_vit.TokenselViTConfig",
             "AutoModelForImageClassification": "modeling_vit.TokenselViTForImageClassification"}),
    "llsa_dit": (("modules/modeling_llsa_dit.py", "modules/llsa.py", "kernels/llsa_reference.py", "errors.py"),
                 {"AutoConfig": "modeling_llsa_dit.LLSADiTConfig", "AutoModel": "modeling_llsa_dit.LLSADiTModel"}),
}


def export_dtype(name: str | None) -> torch.dtype | None:
    """`--dtype` as a torch dtype (None keeps the trained dtype); ConfigError names the choices."""
    if name is None:
        return None
    if name not in EXPORT_DTYPES:
        raise ConfigError(f"export --dtype={name!r} is not one of {sorted(EXPORT_DTYPES)}; omit it to keep the "
                          f"trained dtype")
    return EXPORT_DTYPES[name]


def cast_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with floating tensors in `dtype`; tensors sharing storage (tied weights)
    map to one cast tensor, so transformers still sees them as tied."""
    cast: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            out[key] = value
            continue
        ident = (value.data_ptr(), value.dtype, tuple(value.shape))
        if ident not in cast:
            cast[ident] = value.detach().to(dtype)
        out[key] = cast[ident]
    return out


def save_hf(model, out_dir: str | Path, dtype: str | None = None, remote_code: str | None = None,
            **save_kwargs) -> None:
    """`model.save_pretrained(out_dir)` with the weights in `dtype` and, for `remote_code`, the model code."""
    torch_dtype = export_dtype(dtype)
    config = model.config
    had_map, old_map = hasattr(config, "auto_map"), getattr(config, "auto_map", None)
    if remote_code is not None:
        files, auto_map = REMOTE_CODE[remote_code]
        config.auto_map = dict(auto_map)
    if torch_dtype is not None:
        save_kwargs["state_dict"] = cast_state_dict(model, torch_dtype)
    try:
        model.save_pretrained(str(out_dir), **save_kwargs)
    finally:  # the live model keeps its own config
        if had_map:
            config.auto_map = old_map
        elif hasattr(config, "auto_map"):
            del config.auto_map
    if torch_dtype is not None:  # save_pretrained records the live model's dtype; record the written one
        path = Path(out_dir) / "config.json"
        written = json.loads(path.read_text())
        written["dtype"] = dtype
        path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    if remote_code is not None:
        for rel in files:
            shutil.copyfile(PACKAGE / rel, Path(out_dir) / Path(rel).name)


__all__ = ["save_hf", "export_dtype", "cast_state_dict", "EXPORT_DTYPES", "REMOTE_CODE"]
