"""Bad values that used to escape as tracebacks or misleading text now stop with one line naming the key:
a nested class's own check (only its message, with the key path), a word for a number (the expected type, not
"unknown class"), a setting Lightning rejects only when the run starts, and `key: {}` under an unknown key
(which jsonargparse drops silently)."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokensel.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "random.yaml"
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"


def _error_line(*extra, tmp_path=None) -> str:
    err = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
        try:
            cli_main(["--config", str(RECIPE), "--config", str(TINY), *map(str, extra)], run=False)
        except Exception as exc:  # noqa: BLE001 - what the console entry point prints for a TokenselError
            from tokensel.errors import TokenselError

            if not isinstance(exc, TokenselError):
                raise
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1, err.getvalue()[-2000:]
    assert "Union subtypes" not in lines[0] and "Traceback" not in err.getvalue()
    return lines[0]


def test_a_nested_class_check_shows_its_message_alone_with_the_key_path(in_tmp):
    line = _error_line("--model.init_args.selector.init_args.k", "1.5")
    assert line == "error: model.init_args.selector (RandomSelection): k=1.5 must lie in [0, 1]"


@pytest.mark.parametrize("key,value,kind", [("optimizer.init_args.lr", "abc", "float"),
                                            ("data.init_args.batch_size", "two", "int")])
def test_a_word_for_a_number_names_the_type_expected(in_tmp, key, value, kind):
    line = _error_line(f"--{key}", value)
    assert line == f"error: key '{key}': got '{value}'; expected a value of type {kind}", line


def test_an_empty_mapping_under_an_unknown_key_is_refused(in_tmp):
    (in_tmp / "typo.yaml").write_text("model:\n  init_args:\n    selectr: {}\n")
    line = _error_line("--config", in_tmp / "typo.yaml")
    assert line.startswith("error: unknown key 'selectr' (at model.init_args.selectr)"), line
    assert "'zz' (at data.init_args.zz)" in _error_line("--data.init_args.zz", "{}")
    # an empty mapping under a key that exists is a value, not a typo
    cli_main(["--config", str(RECIPE), "--config", str(TINY), "--data.init_args.column_map", "{}"], run=False)


def test_a_setting_lightning_rejects_at_run_start_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tokensel", "fit", "--config", RECIPE, "--config", TINY,
                        "--trainer.val_check_interval", "1000", "--trainer.max_steps", "2"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: trainer: `val_check_interval` (1000) must be less"), \
        errors
