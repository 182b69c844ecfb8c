"""lm-evaluation-harness on an exported model (the optional `eval` extra: `pip install 'tokensel[eval]'`).

    trainer export --config recipes/sft.yaml --ckpt_path last --out exported/sft
    python -m tokensel.trainer.harness exported/sft --tasks gsm8k --limit 200

runs the same evaluation as `lm_eval --model hf --model_args pretrained=exported/sft --tasks gsm8k --limit 200`
(an export is a plain Hugging Face folder, so the harness's own CLI works on it too) and writes the results to
`<export>/lm_eval.json`. Without the package it stops with one line saying how to install it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from tokensel.errors import ConfigError, TokenselError

INSTALL = "pip install 'tokensel[eval]' (or pip install lm-eval)"


def lm_eval_command(export_dir: str, tasks: str, batch_size: str = "auto", limit: float | None = None,
                    num_fewshot: int | None = None, device: str | None = None, dtype: str = "auto") -> list[str]:
    """The equivalent `lm_eval` command line (printed, and for users who prefer the harness's CLI)."""
    cmd = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={export_dir},dtype={dtype}", "--tasks", tasks,
           "--batch_size", str(batch_size)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if num_fewshot is not None:
        cmd += ["--num_fewshot", str(num_fewshot)]
    if device:
        cmd += ["--device", device]
    return cmd


def evaluate(export_dir: str, tasks: str, batch_size: str = "auto", limit: float | None = None,
             num_fewshot: int | None = None, device: str | None = None, dtype: str = "auto",
             output: str | None = None) -> dict:
    """Run the harness on `export_dir` (a `trainer export` folder); returns its results dict."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"lm-evaluation-harness is not installed: {INSTALL}, then rerun")
    folder = Path(export_dir)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{export_dir}: not an exported model folder (no config.json); make one with "
                          "`trainer export --config RECIPE --ckpt_path last --out DIR`")
    from lm_eval import simple_evaluate

    print("tokensel: " + " ".join(lm_eval_command(export_dir, tasks, batch_size, limit, num_fewshot, device, dtype)),
          flush=True)
    results = simple_evaluate(model="hf", model_args=f"pretrained={export_dir},dtype={dtype}",
                              tasks=tasks.split(","), batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
                              device=device)
    out = Path(output) if output else folder / "lm_eval.json"
    out.write_text(json.dumps(results.get("results", results), indent=2, default=str), encoding="utf-8")
    try:
        from lm_eval.utils import make_table

        print(make_table(results))
    except ImportError:  # older / newer harness without it: the JSON has everything
        pass
    print(f"tokensel: lm-eval results in {out}")
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tokensel.trainer.harness", description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", help="a `trainer export` folder")
    p.add_argument("--tasks", default="gsm8k", help="comma-separated lm-eval task names (default gsm8k)")
    p.add_argument("--batch_size", default="auto")
    p.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--device", default=None, help="e.g. cuda:0 (default: the harness's choice)")
    p.add_argument("--dtype", default="auto", help="weights dtype for loading (auto = as exported)")
    p.add_argument("--output", default=None, help="results JSON (default <export_dir>/lm_eval.json)")
    a = p.parse_args(argv)
    try:
        evaluate(a.export_dir, a.tasks, a.batch_size, a.limit, a.num_fewshot, a.device, a.dtype, a.output)
    except TokenselError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
