"""Reading rows of local files, each with a location (file:line, or file: row i) for error messages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokensel.errors import DataError

log = logging.getLogger(__name__)


def _read_rows(path: str) -> list[tuple[str, object]]:
    """Rows of a JSONL / JSON / parquet file or saved HF dataset folder, each with a location string."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad folder
            raise DataError(f"{path}: not a saved Hugging Face dataset folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return [(f"{path}: row {i}", r) for i, r in enumerate(ds)]
    if p.suffix == ".parquet":
        import datasets

        try:
            ds = datasets.Dataset.from_parquet(str(p))
        except Exception as e:  # noqa: BLE001 - pyarrow / datasets raise many types for a bad file
            raise DataError(f"{path}: not a parquet file datasets can read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); rewrite it or use JSONL") from None
        return [(f"{path}: row {i}", r) for i, r in enumerate(ds)]
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: invalid JSON ({e}); a .json file must hold one array of objects") from None
        except RecursionError:
            raise DataError(f"{path}: invalid JSON (nested too deeply); a .json file must hold one array of "
                            "objects") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: top level is {type(data).__name__}; a .json file must hold an array of objects")
        return [(f"{path}: item {i}", r) for i, r in enumerate(data)]
    if p.suffix in (".jsonl", ".txt", ".text") or p.suffix == "":
        rows = []
        with open(p, "rb") as f:
            for n, raw in enumerate(f, start=1):
                loc = f"{path}:{n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    rows.append((loc, DataError(f"{loc}: invalid UTF-8 ({e.reason} at byte {e.start})")))
                    continue
                if not line.strip():
                    continue
                if p.suffix == ".jsonl":
                    try:
                        rows.append((loc, json.loads(line)))
                    except json.JSONDecodeError as e:
                        rows.append((loc, DataError(f"{loc}: bad JSON ({e.msg} at column {e.colno})")))
                    except RecursionError:
                        rows.append((loc, DataError(f"{loc}: bad JSON (nested too deeply); one object per line")))
                else:
                    rows.append((loc, {"text": line.rstrip("\n")}))
        return rows
    raise DataError(f"{path}: unknown file type {p.suffix!r}; use .jsonl, .json, .parquet, .txt or a saved dataset")


def _collect(paths: list[str], parse, on_bad_row: str) -> list:
    """Parse every row with `parse(loc, row)`; bad rows raise or are counted, per `on_bad_row`."""
    out, bad = [], 0
    for path in paths:
        for loc, row in _read_rows(path):
            try:
                if isinstance(row, DataError):
                    raise row
                item = parse(loc, row)
            except DataError:
                if on_bad_row == "error":
                    raise
                bad += 1
                continue
            if item is not None:
                out.append(item)
    if bad:
        log.warning("tokensel data: skipped %d malformed rows (on_bad_row=skip)", bad)
        print(f"tokensel data: skipped {bad} malformed rows (on_bad_row=skip)")
    if not out:
        raise DataError(f"{', '.join(paths)}: no usable rows")
    return out

