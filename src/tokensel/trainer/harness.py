"""`trainer eval`: lm-evaluation-harness on an exported model (the optional `eval` extra:
`pip install 'tokensel[eval]'`).

    trainer export --config recipes/sft.yaml --ckpt_path last --out exported/sft
    trainer eval exported/sft --tasks gsm8k --limit 200

runs the same evaluation as `lm_eval --model hf --model_args pretrained=exported/sft --tasks gsm8k --limit 200`
(an export is a plain Hugging Face folder, so the harness's own CLI works on it too) and writes the results to
`<export>/lm_eval.json` (with `--log_samples`, each example's inputs and scores to `lm_eval_samples.jsonl`).
`--include_path DIR` adds your own task YAMLs (local data files work offline). Without the package it stops with
one line saying how to install it. `python -m tokensel.trainer.harness` is the same command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from tokensel.errors import ConfigError, TokenselError

INSTALL = "pip install 'tokensel[eval]' (or pip install lm-eval)"


def lm_eval_command(export_dir: str, tasks: str, batch_size: str = "auto", limit: float | None = None,
                    num_fewshot: int | None = None, device: str | None = None, dtype: str = "auto",
                    include_path: str | None = None, log_samples: bool = False) -> list[str]:
    """The equivalent `lm_eval` command line (printed, and for users who prefer the harness's CLI)."""
    cmd = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={export_dir},dtype={dtype}", "--tasks", tasks,
           "--batch_size", str(batch_size)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if num_fewshot is not None:
        cmd += ["--num_fewshot", str(num_fewshot)]
    if device:
        cmd += ["--device", device]
    if include_path:
        cmd += ["--include_path", include_path]
    if log_samples:
        cmd += ["--log_samples", "--output_path", str(Path(export_dir) / "lm_eval")]
    return cmd


def _write_atomic(path: Path, text: str) -> None:
    """Results are written under a temporary name and renamed: a crash never leaves half a JSON file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _sample_rows(samples: dict) -> list[str]:
    """One JSON line per evaluated example: task, doc id, target, the model's (filtered) responses and metrics."""
    skip = {"doc", "arguments", "resps", "filtered_resps", "doc_hash", "prompt_hash", "target_hash"}
    rows = []
    for task, items in samples.items():
        for it in items:
            row = {"task": task, "doc_id": it.get("doc_id"), "target": it.get("target"),
                   "prompts": [a[0] if isinstance(a, (list, tuple)) else a for a in it.get("arguments", [])],
                   "responses": it.get("filtered_resps"),
                   **{k: v for k, v in it.items() if k not in skip and k not in ("doc_id", "target")}}
            rows.append(json.dumps(row, default=str))
    return rows


def evaluate(export_dir: str, tasks: str, batch_size: str = "auto", limit: float | None = None,
             num_fewshot: int | None = None, device: str | None = None, dtype: str = "auto",
             output: str | None = None, include_path: str | None = None, log_samples: bool = False) -> dict:
    """Run the harness on `export_dir` (a `trainer export` folder); returns its results dict."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"lm-evaluation-harness is not installed: {INSTALL}, then rerun")
    folder = Path(export_dir)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{export_dir}: not an exported model folder (no config.json); make one with "
                          "`trainer export --config RECIPE --ckpt_path last --out DIR`")
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"--include_path {include_path}: no such folder (it should hold your task YAML files)")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in names if not manager.match_tasks([t])]  # names, groups, tags or patterns
    if not names or unknown:
        raise ConfigError(f"--tasks {tasks}: unknown lm-eval task(s) {', '.join(unknown) or '(none given)'}; "
                          "`lm_eval ls tasks` lists them, or pass --include_path DIR with your own task YAML")
    print("tokensel: " + " ".join(lm_eval_command(export_dir, tasks, batch_size, limit, num_fewshot, device, dtype,
                                                   include_path, log_samples)), flush=True)
    results = simple_evaluate(model="hf", model_args=f"pretrained={export_dir},dtype={dtype}", tasks=names,
                              batch_size=batch_size, limit=limit, num_fewshot=num_fewshot, device=device,
                              task_manager=manager, log_samples=log_samples)
    out = Path(output) if output else folder / "lm_eval.json"
    _write_atomic(out, json.dumps(results.get("results", results), indent=2, default=str))
    if log_samples:
        rows = _sample_rows(results.get("samples") or {})
        _write_atomic(out.with_name(f"{out.stem}_samples.jsonl"), "".join(r + "\n" for r in rows))
    try:
        from lm_eval.utils import make_table

        print(make_table(results))
    except ImportError:  # older / newer harness without it: the JSON has everything
        pass
    print(f"tokensel: lm-eval results in {out}")
    return results


def main(argv: list[str] | None = None, prog: str = "trainer eval") -> None:
    p = argparse.ArgumentParser(prog=prog, description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("export_dir", help="a `trainer export` folder")
    p.add_argument("--tasks", default="gsm8k", help="comma-separated lm-eval task names (default gsm8k)")
    p.add_argument("--batch_size", default="auto")
    p.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--device", default=None, help="e.g. cuda:0 (default: the harness's choice)")
    p.add_argument("--dtype", default="auto", help="weights dtype for loading (auto = as exported)")
    p.add_argument("--output", default=None, help="results JSON (default <export_dir>/lm_eval.json)")
    p.add_argument("--include_path", default=None, help="a folder of your own lm-eval task YAML files")
    p.add_argument("--log_samples", action="store_true",
                   help="also write each example's prompts, responses and scores to <output stem>_samples.jsonl")
    a = p.parse_args(argv)
    try:
        evaluate(a.export_dir, a.tasks, a.batch_size, a.limit, a.num_fewshot, a.device, a.dtype, a.output,
                 a.include_path, a.log_samples)
    except TokenselError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(prog="python -m tokensel.trainer.harness")
