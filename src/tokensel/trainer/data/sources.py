"""Where text rows come from: local files (read by our own reader, so a bad row names its file and line),
saved dataset folders, data folders and hub datasets (through `datasets`, each row named by source and row).

A data entry (`train_files` / `val_files` item) is a string or a mapping:

* `path/to/file.jsonl`, `.json` (one array), `.txt` (one document per line), `.csv` / `.tsv`, `.parquet`;
* a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a folder of data files;
* a hub id (`HuggingFaceH4/ultrachat_200k`), loaded with `datasets.load_dataset` (cached by `datasets`;
  offline it uses that cache);
* `embedded:<name>`: a text shipped with tokensel (`embedded:shakespeare`, `embedded:wiki`);
* any of these with `:split` (`org/name:train_sft`, `saved_folder:test`), or as a mapping
  `{path: ..., split: ..., subset: ..., weight: ..., name: ...}` (`subset`: the hub configuration name;
  `weight`: the share of training draws for mixtures; `name`: the label in logs and per-source metrics).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokensel.errors import ConfigError, DataError, first_line

LOCAL_TYPES = (".jsonl", ".json", ".txt", ".text", ".csv", ".tsv", ".parquet", "")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SPLIT = re.compile(r"^[\w.-]+(\[[^\]]*\])?$")  # train, train_sft, train[:1000], test[10%:]
SOURCE_KEYS = ("path", "split", "subset", "weight", "name")


@dataclass(frozen=True)
class Source:
    """One data entry, parsed (see the module docstring)."""

    path: str
    split: str | None = None
    subset: str | None = None
    weight: float | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        """Short name for logs and per-source metrics."""
        if self.name:
            return self.name
        base = self.path.removeprefix("embedded:")
        stem = Path(base).stem if Path(base).suffix in LOCAL_TYPES else base.rstrip("/").split("/")[-1]
        return stem + (f"_{self.split}" if self.split else "")

    @property
    def where(self) -> str:
        """How error messages name this source."""
        return self.path + (f"[{self.subset}]" if self.subset else "") + (f":{self.split}" if self.split else "")

    @property
    def kind(self) -> str:
        """file | saved (save_to_disk folder) | folder (data files) | hub."""
        p = Path(self.path).expanduser()
        if p.is_file():
            return "file"
        if p.is_dir():
            return "saved" if _is_saved(p) else "folder"
        return "hub"


def _is_saved(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def parse_source(entry, key: str) -> Source:
    """A `train_files` / `val_files` entry -> Source; `key` names the setting in errors."""
    if isinstance(entry, Source):
        return entry
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown or not isinstance(entry.get("path"), str):
            raise ConfigError(f"{key}: entry {entry!r}: a mapping needs a string `path` and may have only "
                              f"{', '.join(SOURCE_KEYS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        w = entry.get("weight")
        if w is not None and (isinstance(w, bool) or not isinstance(w, int | float) or not w > 0):
            raise ConfigError(f"{key}: entry {entry['path']!r}: weight={w!r} must be a positive number")
        src = Source(entry["path"], entry.get("split"), entry.get("subset"), None if w is None else float(w),
                     entry.get("name"))
    elif isinstance(entry, str) and entry:
        src = Source(entry)
        if entry.startswith("embedded:"):
            from tokensel.offline import resolve_text_file

            return Source(resolve_text_file(entry), name=entry.removeprefix("embedded:"))
        if not Path(entry).expanduser().exists() and ":" in entry:
            head, split = entry.rsplit(":", 1) if "[" not in entry else entry.split(":", 1)
            if _SPLIT.match(split) and (Path(head).expanduser().exists() or _HUB_ID.match(head)):
                src = Source(head, split)
    else:
        raise ConfigError(f"{key}: entry {entry!r}: give a file, folder or hub id (optionally `:split`), or a "
                          "mapping {path, split, subset, weight, name}")
    if src.split is not None and not _SPLIT.match(src.split):
        raise ConfigError(f"{key}: entry {src.path!r}: split {src.split!r} is not a split name (train, test, "
                          "train[:1000], ...)")
    p = Path(src.path).expanduser()
    if p.is_file() and p.suffix not in LOCAL_TYPES:
        raise DataError(f"{key}: {src.path}: unknown file type {p.suffix!r}; use .jsonl, .json, .txt, .csv, "
                          ".tsv, .parquet or a dataset folder")
    if src.kind == "hub" and not _HUB_ID.match(src.path):
        raise DataError(f"{key}: {src.path}: no such file or folder, and not a hub dataset id (org/name)")
    if src.kind == "file" and src.split is not None:
        raise ConfigError(f"{key}: {src.path}: a single file has no splits; drop `:{src.split}`")
    return src


def parse_sources(entries, key: str) -> list[Source]:
    """A list of entries (or one) -> Sources; weights all-or-none."""
    if entries is None:
        return []
    items = [entries] if isinstance(entries, str | dict) else list(entries)
    out = [parse_source(e, key) for e in items]
    weighted = [s.weight is not None for s in out]
    if any(weighted) and not all(weighted):
        missing = [s.where for s in out if s.weight is None]
        raise ConfigError(f"{key}: some entries have a weight and {', '.join(missing)} do not; give every source a "
                          "weight (a mixture) or none (concatenation)")
    labels = [s.label for s in out]
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise ConfigError(f"{key}: two sources are both named {dup[0]!r}; give them distinct `name`s")
    return out


# ---------------------------------------------------------------- rows


def iter_rows(src: Source, streaming: bool = False) -> Iterator[tuple[str, object]]:
    """Rows of one source, each with its location; a row that cannot be decoded comes as a DataError in place
    of the row (the caller decides: stop or skip). Lazy: nothing is held beyond the current row, except for a
    `.json` array (one document by design)."""
    p = Path(src.path).expanduser()
    kind = src.kind
    if kind == "file" and p.suffix in (".jsonl", ".txt", ".text", ""):
        yield from _iter_lines(src.path, p)
    elif kind == "file" and p.suffix == ".json":
        yield from _iter_json(src.path, p)
    else:
        yield from _iter_datasets(src, streaming)


def _iter_lines(path: str, p: Path) -> Iterator[tuple[str, object]]:
    with open(p, "rb") as f:
        for n, raw in enumerate(f, start=1):
            loc = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield loc, DataError(f"{loc}: invalid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if n == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark (spreadsheet / Windows tools) is not data
            line = line.rstrip("\r\n")  # CRLF or LF line ends
            if not line.strip():
                continue
            if p.suffix == ".jsonl":
                try:
                    yield loc, json.loads(line)
                except json.JSONDecodeError as e:
                    yield loc, DataError(f"{loc}: bad JSON ({e.msg} at column {e.colno})")
                except RecursionError:
                    yield loc, DataError(f"{loc}: bad JSON (nested too deeply); one object per line")
            else:
                yield loc, {"text": line}


def _iter_json(path: str, p: Path) -> Iterator[tuple[str, object]]:
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))  # (a byte-order mark is allowed)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e}); a .json file must hold one array of objects") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON (nested too deeply); a .json file must hold one array of "
                        "objects") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: top level is {type(data).__name__}; a .json file must hold an array of objects")
    for i, r in enumerate(data):
        yield f"{path}: item {i}", r


def load_hf(src: Source, streaming: bool = False):
    """The `datasets` Dataset (or IterableDataset) of a non-JSONL source, split chosen."""
    import datasets

    p = Path(src.path).expanduser()
    kind = src.kind
    try:
        if kind == "saved":
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                split = src.split or ("train" if "train" in ds else next(iter(ds)))
                if split not in ds:
                    raise DataError(f"{src.where}: no split {split!r}; the folder has {', '.join(ds)}")
                ds = ds[split]
            elif src.split not in (None, "train"):
                raise DataError(f"{src.where}: the saved dataset has no splits; drop `:{src.split}`")
            return ds.to_iterable_dataset() if streaming else ds
        if kind == "file":
            builder = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}[p.suffix]
            extra = {"encoding": "utf-8-sig"} if builder == "csv" else {}  # a BOM must not rename column 1
            extra |= {"delimiter": "\t"} if p.suffix == ".tsv" else {}
            return datasets.load_dataset(builder, data_files=str(p), split="train", streaming=streaming, **extra)
        return datasets.load_dataset(str(p) if kind == "folder" else src.path, src.subset, split=src.split or "train",
                                     streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets / pyarrow / hub raise many types for a bad source
        if kind == "file" and p.suffix == ".parquet":
            raise DataError(f"{src.where}: not a parquet file datasets can read ({first_line(e)}); rewrite it or "
                            "use JSONL") from None
        hint = {"file": "check the file, or convert it to JSONL",
                "saved": "it must be a folder written by save_to_disk",
                "folder": "it must hold data files datasets can read (jsonl, csv, parquet, ...)",
                "hub": "check the id and split; offline, the dataset must be in the datasets cache (load it once "
                       "online) or saved locally with save_to_disk"}[kind]
        raise DataError(f"{src.where}: cannot load ({first_line(e)}); {hint}") from None


def _iter_datasets(src: Source, streaming: bool) -> Iterator[tuple[str, object]]:
    ds = load_hf(src, streaming)
    for i, r in enumerate(ds):
        yield f"{src.where}: row {i}", r


def source_identity(src: Source, content: bool = False, streaming: bool = False) -> dict:
    """What a source's rows depend on, for cache keys: path, size and mtime of local files (content hash when
    `content`); the dataset fingerprint for hub datasets (its cached files' hash; a streamed hub dataset has
    none, so only its id, subset and split count)."""
    from tokensel.trainer.token_cache import file_identity

    out = {"path": src.path, "split": src.split, "subset": src.subset}
    if src.kind != "hub":
        out.update(file_identity(str(Path(src.path).expanduser()), content))
    elif streaming:
        out["streaming"] = True
    else:
        try:
            out["fingerprint"] = load_hf(src)._fingerprint
        except DataError:
            out["fingerprint"] = None
    return out
