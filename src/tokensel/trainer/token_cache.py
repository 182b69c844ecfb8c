"""Cached per-token statistics (reference / history losses) keyed by (sample index, token position).

File format (safetensors): `values` float32 [total tokens], `offsets` int64 [samples + 1]; sample s
owns `values[offsets[s]:offsets[s+1]]`, where entry t is the loss of predicting token t (entry 0 = 0),
the same alignment as `SelectiveLM.token_stats`. `present` uint8 [samples] marks the samples the file
holds and `token_hash` int64 [samples] is a hash of each sample's token ids and labels (`sample_hash`),
so a stale cache is caught sample by sample. The metadata key `tokensel_fingerprint` holds (JSON) the
run that wrote it: the model that produced the losses, the tokenizer (name, size, vocabulary hash), the
data files (path, size, mtime, sha256) and settings (max_length, format, packing, ...).

Written by `TokenStatsWriter` during `trainer predict` (under several processes every rank's rows are
gathered to rank 0, which writes the file once). `SelectiveLM` checks the fingerprint against its own
run at the first use, and never returns a silent 0 for a labelled token the cache lacks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from tokensel.errors import ConfigError

log = logging.getLogger(__name__)
IGNORE = -100
FORMAT = "tokensel-token-stats/2"
META_KEY = "tokensel_fingerprint"
FIX = "re-run `trainer predict --config RECIPE --trainer.callbacks+=TokenStatsWriter --trainer.callbacks.out {path}`"


# ---------------------------------------------------------------- per-sample token hashes


def sample_positions(batch: dict) -> Iterator[tuple[int, int, Tensor]]:
    """(row, sample id, column indices of that sample in token order) for every sample of a padded or
    packed batch (`sample_index` / `token_index`, -1 on padding)."""
    si, ti = batch["sample_index"].cpu(), batch["token_index"].cpu()
    for b in range(si.shape[0]):
        row = si[b]
        for s in row[row >= 0].unique().tolist():
            pos = (row == s).nonzero().squeeze(1)
            yield b, int(s), pos[ti[b, pos].argsort()]


def sample_hash(input_ids: Tensor, labels: Tensor) -> int:
    """63-bit hash of one sample's token ids and labels (labels decide which positions carry a loss)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(input_ids.detach().to("cpu", torch.int64).numpy().tobytes())
    h.update(b"|")
    h.update(labels.detach().to("cpu", torch.int64).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------- run fingerprints


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()[:16]


def model_identity(module, trainer=None) -> dict:
    """The model whose losses a cache holds: hub id / folder, or a hash of the from-config dict."""
    cfg = getattr(module, "model_config", None)
    out = {"name": None if cfg is not None else getattr(module, "model_name", None),
           "config_sha": _sha(cfg) if cfg is not None else None,
           "lora": getattr(module, "lora", None) is not None, "dtype": getattr(module, "dtype_name", None)}
    ckpt = getattr(trainer, "ckpt_path", None) if trainer is not None else None
    out["ckpt_path"] = str(ckpt) if ckpt else None
    return out


def tokenizer_identity(tok) -> dict:
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    template = getattr(tok, "chat_template", None)
    return {"name": str(getattr(tok, "name_or_path", "")), "vocab_size": len(tok), "vocab_sha": _sha(vocab),
            "chat_template_sha": _sha(template) if template else None, "eos_token_id": tok.eos_token_id}


def _file_sha(p: Path) -> str:
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def file_identity(path: str, content: bool = True) -> dict:
    """Path, size and mtime of a data file (or saved dataset folder); its sha256 when `content`."""
    p = Path(path)
    if not p.exists():
        return {"path": str(path), "size": None, "mtime_ns": None, "sha256": None}
    files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
    return {"path": str(p.resolve()), "size": sum(f.stat().st_size for f in files),
            "mtime_ns": max((f.stat().st_mtime_ns for f in files), default=0),
            "sha256": _file_sha(p) if content else None}


# data settings that change the samples' ids or tokens (compared); the others are recorded only
DATA_COMPARED = ("kind", "max_length", "format", "column_map", "role_map", "train_on", "chat_template_kwargs",
                 "text_column", "split")
DATA_RECORDED = ("packing", "max_samples", "val_fraction", "val_files", "seed", "on_bad_row",
                 "reference_fraction", "split_part", "train_files")


def data_identity(dm, content: bool = True) -> dict:
    out = {"kind": type(dm).__name__}
    for k in DATA_COMPARED[1:] + DATA_RECORDED:
        v = getattr(dm, k, None)
        out[k] = list(v) if isinstance(v, tuple) else v
    paths = dm.train_paths() if hasattr(dm, "train_paths") else []
    out["files"] = [file_identity(p, content) for p in paths]
    return out


def run_fingerprint(module, datamodule=None, trainer=None, content: bool = True) -> dict:
    """What a cache written by (or used in) this run depends on: the model, the tokenizer that made the
    token ids (the data module's), and the data (files and settings; absent without a data module)."""
    tok = getattr(datamodule, "tokenizer", None) if datamodule is not None else None
    tok = tok if tok is not None else module.tokenizer
    fp = {"format": FORMAT, "model": model_identity(module, trainer), "tokenizer": tokenizer_identity(tok)}
    if datamodule is not None:
        fp["data"] = data_identity(datamodule, content)
    return fp


def _model_str(m: dict) -> str:
    return m.get("name") or f"model_config sha {m.get('config_sha')}"


def fingerprint_differences(cached: dict, run: dict, compare_model: bool) -> list[str]:
    """Human-readable differences between a cache's fingerprint and this run's (empty = compatible)."""
    diffs = []
    ct, rt = cached.get("tokenizer", {}), run.get("tokenizer", {})
    for k in ("vocab_size", "vocab_sha", "chat_template_sha", "eos_token_id"):
        if ct.get(k) != rt.get(k):
            diffs.append(f"tokenizer {k}: cache {ct.get(k)} ({ct.get('name')}), run {rt.get(k)} ({rt.get('name')})")
    cm, rm = cached.get("model", {}), run.get("model", {})
    if compare_model and (cm.get("name"), cm.get("config_sha")) != (rm.get("name"), rm.get("config_sha")):
        diffs.append(f"model: cache {_model_str(cm)}, run {_model_str(rm)}")
    cd, rd = cached.get("data"), run.get("data")
    if cd is not None and rd is not None:
        for k in DATA_COMPARED:
            if k in cd and cd.get(k) != rd.get(k):  # (a cache from before a setting existed: not compared)
                diffs.append(f"data.{k}: cache {cd.get(k)!r}, run {rd.get(k)!r}")
        cf, rf = cd.get("files", []), rd.get("files", [])
        if len(cf) != len(rf):
            diffs.append(f"data files: cache {[f['path'] for f in cf]}, run {[f['path'] for f in rf]}")
        else:
            for c, r in zip(cf, rf):
                if (c["path"], c["size"], c["mtime_ns"]) == (r["path"], r["size"], r["mtime_ns"]):
                    continue  # same file, untouched: no need to hash it again
                sha = r.get("sha256") or (_file_sha(Path(r["path"])) if r["size"] is not None else None)
                if c["size"] != r["size"] or c["sha256"] != sha:
                    diffs.append(f"data file {r['path']}: content differs from the cache's {c['path']} "
                                 f"(size {c['size']} vs {r['size']}, sha256 {c['sha256']} vs {sha})")
    return diffs


# ---------------------------------------------------------------- the cache


class TokenStatsCache:
    """Per-token values of every sample of a run, read from a `TokenStatsWriter` file.

    Args (of `load`): path; role: the model key naming it (`model.reference_losses`, ...), used in errors.
    """

    def __init__(self, values: Tensor, offsets: Tensor, present: Tensor | None = None,
                 token_hash: Tensor | None = None, fingerprint: dict | None = None,
                 path: str = "(in memory)", role: str | None = None) -> None:
        self.values, self.offsets = values.float(), offsets.long()
        n = len(self.offsets) - 1
        self.present = (present.bool() if present is not None else self.offsets[1:] > self.offsets[:-1])[:n]
        self.token_hash = token_hash.long() if token_hash is not None else None
        self.fingerprint, self.path, self.role = fingerprint, str(path), role
        self.checked = False  # fingerprint compared with the run (first use)
        self._verified: set[int] = set()  # samples whose token hash matched

    @property
    def name(self) -> str:
        return f"token statistics cache {self.path}" + (f" ({self.role})" if self.role else "")

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def load(cls, path: str, role: str | None = None) -> TokenStatsCache:
        if not Path(path).is_file():
            raise ConfigError(f"{role + '=' if role else 'token statistics cache '}{path}: no such file; write it "
                              "with `trainer predict --config RECIPE --trainer.callbacks+=TokenStatsWriter "
                              f"--trainer.callbacks.out {path}`")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                d = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise ConfigError(f"token statistics cache {path}: not a readable safetensors file ({e}); "
                              + FIX.format(path=path)) from None
        if "values" not in d or "offsets" not in d:
            raise ConfigError(f"token statistics cache {path}: no `values` / `offsets` tensors; "
                              + FIX.format(path=path))
        fp = json.loads(meta[META_KEY]) if META_KEY in meta else None
        return cls(d["values"], d["offsets"], d.get("present"), d.get("token_hash"), fp, str(path), role)

    @staticmethod
    def save(path: str, per_sample: dict[int, list[float] | Tensor], token_hashes: dict[int, int] | None = None,
             fingerprint: dict | None = None) -> None:
        """Write `per_sample` (sample id -> values) with optional per-sample hashes and run fingerprint:
        a temporary file in the same folder, then renamed over `path` (never a half-written cache)."""
        from safetensors.torch import save_file

        n = max(per_sample) + 1 if per_sample else 0
        rows = [torch.as_tensor(per_sample[s], dtype=torch.float32).reshape(-1) if s in per_sample
                else torch.zeros(0) for s in range(n)]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        tensors = {"values": torch.cat(rows) if rows else torch.zeros(0),
                   "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
                   "present": torch.tensor([s in per_sample for s in range(n)], dtype=torch.uint8)}
        if token_hashes is not None:
            tensors["token_hash"] = torch.tensor([token_hashes.get(s, -1) for s in range(n)], dtype=torch.long)
        meta = {"format": FORMAT}
        if fingerprint is not None:
            meta[META_KEY] = json.dumps(fingerprint, sort_keys=True, default=str)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)

    # ---- checks

    def check_fingerprint(self, run: dict, compare_model: bool = False) -> None:
        """Refuse a cache written for another tokenizer / data (and, with `compare_model`, model): one
        line naming the file, what differs and the fix. A cache without a fingerprint is refused when the
        run knows its data (a training run); without a data module it is used with a warning."""
        self.checked = True
        fix = FIX.format(path=self.path)
        if self.fingerprint is None:
            if "data" in run:
                raise ConfigError(f"{self.name} has no run fingerprint (written by an older tokensel or by hand), "
                                  f"so nothing shows it matches this run's tokenizer and data; {fix}")
            log.warning("%s has no run fingerprint; its samples are not checked against this run", self.name)
            return
        diffs = fingerprint_differences(self.fingerprint, run, compare_model)
        if diffs:
            raise ConfigError(f"{self.name} was written for another run: {'; '.join(diffs)}; {fix} with this "
                              "run's tokenizer and data settings")
        log.info("%s: losses of %s", self.name, _model_str(self.fingerprint.get("model", {})))

    def verify(self, batch: dict) -> None:
        """Each sample's token ids and labels must hash to what the cache was written for."""
        if self.token_hash is None:
            return
        si = batch["sample_index"].cpu()
        if set(si[si >= 0].unique().tolist()) <= self._verified:
            return  # every sample of this batch was checked before (the usual case after the first epoch)
        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        for b, s, pos in sample_positions(batch):
            if s in self._verified or not (0 <= s < self.num_samples) or not bool(self.present[s]):
                continue  # absent samples are reported by `lookup` when they carry a label
            n_cached = int(self.offsets[s + 1] - self.offsets[s])
            h = sample_hash(ids[b, pos], labels[b, pos])
            if n_cached != pos.numel() or h != int(self.token_hash[s]):
                raise ConfigError(f"{self.name}: sample {s} has {pos.numel()} tokens here but the cache was written "
                                  f"for a different sample ({n_cached} tokens, token hash differs): the cache is stale "
                                  f"(data or tokenization changed); {FIX.format(path=self.path)}")
            self._verified.add(s)

    def lookup(self, sample_index: Tensor, token_index: Tensor, valid: Tensor | None = None) -> Tensor:
        """`[B, T]` cached values; 0 on padding (index -1). With `valid` (`[B, T]` bool, labelled
        positions), a labelled token of a sample the cache lacks, or past its cached length, is an error."""
        si, ti = sample_index.cpu(), token_index.cpu()
        n = self.num_samples
        sc = si.clamp(0, max(n - 1, 0))
        ok = (si >= 0) & (si < n)
        if n:
            ok &= self.present[sc]
            start, length = self.offsets[sc], self.offsets[sc + 1] - self.offsets[sc]
        else:
            start = length = torch.zeros_like(si)
        has = ok & (ti >= 0) & (ti < length)
        if valid is not None:
            bad = valid.cpu().bool() & (si >= 0) & ~has
            if bool(bad.any()):
                b, t = (int(x) for x in bad.nonzero()[0])
                s = int(si[b, t])
                fix = FIX.format(path=self.path)
                settings = ""
                d = (self.fingerprint or {}).get("data") or {}
                if d:
                    settings = (f" (it was written with max_samples={d.get('max_samples')}, val_fraction="
                                f"{d.get('val_fraction')}, seed={d.get('seed')}, split_part={d.get('split_part')})")
                if not bool(ok[b, t]):
                    raise ConfigError(f"{self.name} has no row for sample {s} (it holds {int(self.present.sum())} "
                                      f"of sample ids 0..{n - 1}){settings}; {fix} with this run's data settings")
                raise ConfigError(f"{self.name}: sample {s} has {int(length[b, t])} cached tokens but position "
                                  f"{int(ti[b, t])} carries a label; the cache is stale; {fix}")
        flat = torch.where(has, start + ti, 0)
        if not n or not len(self.values):
            return torch.zeros(si.shape)
        return torch.where(has, self.values[flat], torch.zeros(()))

    def lookup_batch(self, batch: dict) -> Tensor:
        """`lookup` for a training batch, after checking its samples' token hashes: every labelled
        position (labels != -100, not a sample's first token) must be in the cache."""
        self.verify(batch)
        valid = (batch["labels"] != IGNORE) & (batch["token_index"] > 0)
        return self.lookup(batch["sample_index"], batch["token_index"], valid)


# ---------------------------------------------------------------- writing under `trainer predict`


def _pack(predictions) -> dict:
    """Flatten `predict_step` outputs [(sample, values, hash), ...] into compact tensors (cheap to gather)."""
    ids, hashes, rows = [], [], []
    for batch_out in predictions:
        for item in batch_out:
            s, vals = item[0], item[1]
            ids.append(int(s))
            hashes.append(int(item[2]) if len(item) > 2 else -1)
            rows.append(torch.as_tensor(vals, dtype=torch.float32).reshape(-1))
    return {"ids": torch.tensor(ids, dtype=torch.long), "hashes": torch.tensor(hashes, dtype=torch.long),
            "lengths": torch.tensor([len(r) for r in rows], dtype=torch.long),
            "values": torch.cat(rows) if rows else torch.zeros(0)}


def _merge(parts: list[dict]) -> tuple[dict[int, Tensor], dict[int, int]]:
    """Every rank's rows; a sample predicted on several ranks (sampler padding, unsharded loaders) must
    agree on its tokens and is kept once."""
    per_sample: dict[int, Tensor] = {}
    hashes: dict[int, int] = {}
    for part in parts:
        for s, h, row in zip(part["ids"].tolist(), part["hashes"].tolist(),
                             torch.split(part["values"], part["lengths"].tolist())):
            if s in per_sample:
                if hashes[s] != h or len(per_sample[s]) != len(row):
                    raise RuntimeError(f"TokenStatsWriter: sample {s} was predicted twice with different tokens")
                continue
            per_sample[s], hashes[s] = row, h
    return per_sample, hashes


class TokenStatsWriter(BasePredictionWriter):
    """`trainer predict` callback: gather `SelectiveLM.predict_step` outputs into a `TokenStatsCache` file.

    Under several processes every rank's rows are gathered to rank 0, which writes the file once
    (temporary name, then rename); the other ranks wait until it is written. The file records the run's
    fingerprint (model, tokenizer, data) and a per-sample token hash.

    Args:
        out: destination `.safetensors` path.
    """

    def __init__(self, out: str = "token_losses.safetensors") -> None:
        super().__init__(write_interval="epoch")
        self.out = out

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        import torch.distributed as dist

        local = _pack(predictions)
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank0 = not multi or dist.get_rank() == 0
        if multi:
            parts: list | None = [None] * dist.get_world_size() if rank0 else None
            dist.gather_object(local, parts, dst=0)
        else:
            parts = [local]
        status: list = [None]
        error = None
        if rank0:
            try:
                per_sample, hashes = _merge(parts)
                fp = run_fingerprint(pl_module, getattr(trainer, "datamodule", None), trainer)
                TokenStatsCache.save(self.out, per_sample, hashes, fp)
                print(f"tokensel: wrote per-token losses of {len(per_sample)} samples to {self.out}")
            except Exception as e:  # noqa: BLE001 - reported on every rank below, so none waits forever
                error, status = e, [f"{type(e).__name__}: {e}"]
        if multi:  # also the barrier: no rank returns before the file is in place
            dist.broadcast_object_list(status, src=0)
        if error is not None:
            raise error
        if status[0] is not None:
            raise RuntimeError(f"TokenStatsWriter: writing {self.out} failed on rank 0: {status[0]}")
