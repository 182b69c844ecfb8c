"""Property-based checks of the config layer: recipes with unknown keys, wrong types, missing required values
and YAML garbage either build the run or stop with one clear line (`error: ...` naming the key) and exit
status 2, or a `TokenselError`; never another exception. Bounded: few examples per class, no deadline."""

import collections
import contextlib
import io
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokensel.cli import cli_main
from tokensel.errors import TokenselError

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "random.yaml"
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"
CASES = collections.Counter()
OUTCOMES = collections.Counter()
BUILT_UNKNOWN: list[str] = []
N = int(os.environ.get("TOKENSEL_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=N, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

KEYS = ["trainer.max_steps", "trainer.precision", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
        "trainer.on_nonfinite", "trainer.save_every_n_steps", "model.init_args.normaliser",
        "model.init_args.selector.init_args.k", "model.init_args.selector.init_args.scope",
        "model.init_args.lora.r", "model.init_args.lora", "model.init_args.dtype", "model.init_args.kernels",
        "model.init_args.history", "model.init_args.ema_decay", "data.init_args.max_length",
        "data.init_args.batch_size", "data.init_args.format", "data.init_args.column_map",
        "data.init_args.train_files", "data.init_args.on_bad_row", "data.init_args.val_fraction",
        "optimizer.init_args.lr", "seed_everything", "run_name"]
PLACES = ["", "trainer", "model", "model.init_args", "model.init_args.selector.init_args", "data.init_args",
          "optimizer.init_args", "model.init_args.lora"]
ident = st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(ident, c, max_size=3), max_leaves=6)


@pytest.fixture(scope="module", autouse=True)
def _report():
    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="fuzzcfg"))  # run folders (never written: run=False) land here
    yield
    os.chdir(cwd)
    print("\nconfig fuzz cases per class: " + ", ".join(f"{k}={v}" for k, v in sorted(CASES.items())))
    print("config fuzz outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(OUTCOMES.items())))
    print("unknown-key cases that built: " + ", ".join(BUILT_UNKNOWN))


def _nest(path: str, value) -> dict:
    out = value
    for part in reversed([p for p in path.split(".") if p]):
        out = {part: out}
    return out


def _check(cls, override_text: str, key: str | None = None):
    CASES[cls] += 1
    p = Path(tempfile.mkdtemp(prefix="fuzzcfg")) / "override.yaml"
    p.write_text(override_text)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli_main(["--config", str(RECIPE), "--config", str(TINY), "--config", str(p)], run=False)
    except SystemExit as e:
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")]
        assert e.code == 2, (e.code, err.getvalue()[-2000:])
        assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()[-2000:]
        assert len(lines[0]) < 600, lines[0]
        OUTCOMES[f"{cls}:exit2"] += 1
        return lines[0]
    except TokenselError as e:
        assert "\n" not in str(e).strip() and str(e), str(e)
        OUTCOMES[f"{cls}:TokenselError"] += 1
        return str(e)
    OUTCOMES[f"{cls}:built"] += 1
    return None


@FUZZ
@given(st.sampled_from(PLACES), ident.filter(lambda k: k not in {"class_path", "init_args", "dict_kwargs"}), values)
def test_unknown_keys(place, key, value):
    known = yaml.safe_load(RECIPE.read_text())
    node = known
    for part in [p for p in place.split(".") if p]:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and key in node:
        return
    line = _check("unknown_key", yaml.safe_dump(_nest(f"{place}.{key}" if place else key, value)))
    if line is None:
        BUILT_UNKNOWN.append(f"{place}.{key}={value!r}")
    elif line.startswith("error:"):
        assert key in line, line


@FUZZ
@given(st.sampled_from(KEYS), values)
def test_wrong_types(key, value):
    _check("wrong_type", yaml.safe_dump(_nest(key, value)))


@FUZZ
@given(st.sampled_from(["model", "data", "model.class_path", "data.class_path", "model.init_args.selector",
                        "model.init_args.selector.class_path", "optimizer.class_path", "trainer"]),
       st.sampled_from([None, "", "NoSuchThing", "tokensel.nope.Missing", [], {}]))
def test_missing_required(key, value):
    _check("missing_required", yaml.safe_dump(_nest(key, value)))


@FUZZ
@given(st.text(max_size=120) | st.sampled_from(["trainer: [", "model: {class_path", ": :", "\t- x", "a: *b",
                                                 "%YAML 9.9\n---\n", "- 1\n- 2", "--- !!python/object:os.system x"]))
def test_yaml_garbage(text):
    _check("yaml_garbage", text)
