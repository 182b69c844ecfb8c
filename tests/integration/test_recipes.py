"""Every shipped recipe parses (`--print_config` output is itself a valid recipe) and fits 2 steps on a
tiny config (LitGPT `test_config_hub.py` style). Tiny overrides live in tests/integration/tiny/<recipe>.yaml;
causal-LM recipes without one use tiny/_lm.yaml."""

from pathlib import Path

import pytest
import yaml

from tokensel.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = ROOT / "tests" / "integration" / "tiny"


# recipes that read another run's product: make it first (tiny), in the same folder, as the recipe's header says
WRITER = ["--trainer.callbacks+=TokenStatsWriter", "--trainer.callbacks.out"]
PREREQ = {
    "rho1": [["fit", "rho1_reference"]],
    "rho1_static": [["fit", "rho1_reference"],
                    ["predict", "rho1_static", *WRITER, "checkpoints/rho1_static/base_losses.safetensors"],
                    ["predict", "rho1_static", "--model.init_args.model", "checkpoints/rho1_reference/export",
                     *WRITER, "checkpoints/rho1_static/ref_losses.safetensors"]],
}


def overlay(recipe: Path) -> Path:
    own = TINY / recipe.name
    return own if own.exists() else TINY / "_lm.yaml"


def test_recipes_exist():
    assert {"sft.yaml", "random.yaml", "rho1.yaml"} <= {r.name for r in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_print_config_roundtrip(recipe, in_tmp, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(recipe), "--print_config"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert cfg["model"]["class_path"].startswith("tokensel.")
    (in_tmp / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):  # the printed config parses again
        cli_main(["fit", "--config", str(in_tmp / "printed.yaml"), "--print_config"])


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_two_step_fit(recipe, in_tmp):
    for sub, first, *extra in PREREQ.get(recipe.stem, []):
        pre = recipe.with_name(f"{first}.yaml")
        steps = ["--trainer.max_steps", "2"] if sub == "fit" else []
        cli_main([sub, "--config", str(pre), "--config", str(overlay(pre)), *steps, "--trainer.logger", "false",
                  *extra])
    cli = cli_main(["fit", "--config", str(recipe), "--config", str(overlay(recipe)),
                    "--trainer.max_steps", "2", "--trainer.logger", "false"])
    assert cli.trainer.global_step == 2
    assert (Path(cli.trainer.default_root_dir) / "last.ckpt").exists()
    assert Path(cli.trainer.default_root_dir).parent == Path("checkpoints") / recipe.stem  # <recipe>/<config hash>
