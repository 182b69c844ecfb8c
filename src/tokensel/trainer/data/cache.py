"""Tokenise once: tokenised data is written to a cache folder named by the fingerprint of everything it
depends on (the source's files or dataset fingerprint, the tokenizer, the data settings), and every later run,
and every other rank, reads it from there (memory-mapped Arrow or token shards) instead of tokenising again.

The folder is written under a temporary name and renamed when complete, so a crash leaves nothing that a
later run could take for a finished cache, and two processes building the same entry keep one. In a
Lightning run `prepare_data` (local rank 0 of each node) builds the entries before `setup` reads them on
every rank.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from tokensel.trainer.token_cache import _sha, tokenizer_identity

CACHE_FORMAT = 1
ENV = "TOKENSEL_DATA_CACHE"
META = "meta.json"


def cache_root(cache_dir: str | None = None) -> Path:
    """`data.cache_dir`, else $TOKENSEL_DATA_CACHE, else ~/.cache/tokensel/data."""
    return Path(cache_dir or os.environ.get(ENV) or Path.home() / ".cache" / "tokensel" / "data").expanduser()


def entry_key(kind: str, source: dict, tokenizer, settings: dict) -> tuple[str, dict]:
    """(folder name, fingerprint) of one tokenised source."""
    fp = {"format": CACHE_FORMAT, "kind": kind, "source": source, "tokenizer": tokenizer_identity(tokenizer),
          "settings": settings}
    stem = Path(str(source.get("path", "data"))).name.replace(":", "_")[:40] or "data"
    return f"{kind}-{stem}-{_sha(fp)}", fp


def is_ready(folder: Path) -> bool:
    return (folder / META).is_file()


def build_once(folder: Path, build: Callable[[Path], dict], fingerprint: dict | None) -> tuple[Path, bool]:
    """Make `folder` unless it is already complete: `build(tmp)` fills a temporary sibling and returns metadata,
    which is written as meta.json (with the fingerprint, when given) before the rename. Returns (folder, built
    now); when another process renamed its copy into place first, that one is kept."""
    if is_ready(folder):
        return folder, False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = build(tmp)
        extra = {"fingerprint": fingerprint} if fingerprint is not None else {}
        (tmp / META).write_text(json.dumps({**meta, **extra}, indent=1, default=str))
        if folder.exists() and not is_ready(folder):  # a stale, incomplete entry (should not happen): replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same entry first: keep theirs
            if not is_ready(folder):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return folder, False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder, True


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text())
