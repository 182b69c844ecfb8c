"""The README's shell commands run: every `trainer ...` line of its ```bash blocks, in order, in one folder,
with the tiny overrides appended; the install / test lines must match .ci/run. So the docs cannot drift."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from tokensel.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"


def _bash_blocks() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    return [[ln for ln in b.splitlines() if ln.strip()] for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def _commands() -> list[str]:
    return [ln for block in _bash_blocks() for ln in block if ln.split()[0] == "trainer"]


def test_every_recipe_is_in_the_readme():
    text = (ROOT / "README.md").read_text()
    missing = [r.name for r in (ROOT / "recipes").glob("*.yaml") if f"recipes/{r.name}" not in text]
    assert not missing, f"recipes without a README section: {missing}"


def test_readme_test_command_is_the_ci_command():
    ci = (ROOT / ".ci" / "run").read_text().split("keep identical) ---", 1)[1].strip().splitlines()
    blocks = _bash_blocks()
    assert any(b == ci for b in blocks), (ci, blocks)
    for b in blocks:  # every install line names the pinned CPU torch
        for ln in b:
            if ln.startswith("pip install"):
                assert "torch==2.13.0" in ln, ln


def test_readme_trainer_commands_run(in_tmp):
    cmds = _commands()
    assert len(cmds) >= 5, cmds
    for cmd in cmds:
        words = shlex.split(cmd, comments=True)
        out_file = None
        if ">" in words:  # `... --print_config > my_recipe.yaml`
            i = words.index(">")
            words, out_file = words[:i], words[i + 1]
        args = [str(ROOT / w) if w.startswith(("recipes/", "configs/")) else w for w in words[1:]]
        sub, rest = args[0], args[1:]
        if "configs/scale/" in cmd or "recipes/paper/" in cmd:  # GPUs / published scale: parsed, not run here
            rest = [*rest, "--print_config"]
        recipe = Path(rest[rest.index("--config") + 1])
        own = ROOT / "tests" / "integration" / "tiny" / recipe.name  # the recipe's own tiny overlay, if any
        extra = ["--config", str(own if own.exists() else TINY)]
        if sub == "fit" and "--print_config" not in rest:
            extra += ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.logger", "false"]
        # the tiny overrides go right after the recipe, so the command's own keys still win
        i = rest.index("--config") + 2
        full = [sub, *rest[:i], *extra, *rest[i:]]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                cli_main(full)
            except SystemExit as e:  # --print_config exits 0 after printing
                assert e.code in (0, None), (cmd, e.code)
        if out_file:
            Path(out_file).write_text(buf.getvalue())
            assert "model:" in buf.getvalue() and "trainer:" in buf.getvalue()
            # the printed recipe is complete and valid: it parses by itself
            with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
                cli_main(["fit", "--config", out_file, "--config", str(TINY), "--print_config"])
            assert e.value.code in (0, None)
    assert (in_tmp / "exported" / "rho1" / "config.json").exists()
    assert (in_tmp / "exported" / "rho1-lora" / "adapter_config.json").exists()
    assert (in_tmp / "checkpoints" / "rho1_reference" / "export" / "config.json").exists()
    for cache in ("base_losses", "ref_losses"):
        assert (in_tmp / "checkpoints" / "rho1_static" / f"{cache}.safetensors").exists()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
