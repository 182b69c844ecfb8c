"""Rho-1 in its two published stages: the reference recipe trains on a curated split and exports a Hugging Face
folder; rho1.yaml reads it. A missing, degenerate (`initial`) or mismatched reference stops with one line."""

from pathlib import Path

import pytest
import torch

from tokensel.cli import cli_main, main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"
RECIPES = ROOT / "recipes"


def _fit(recipe: str, *extra: str):
    return cli_main(["fit", "--config", str(RECIPES / recipe), "--config", str(TINY),
                     "--trainer.max_steps", "2", "--trainer.logger", "false", *extra])


def _error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_reference_then_selective_run(in_tmp):
    ref = _fit("rho1_reference.yaml")
    export = in_tmp / "checkpoints" / "rho1_reference" / "export"
    assert (export / "config.json").exists() and (export / "model.safetensors").exists()
    # the curated split and the selective run's training set are disjoint; both validate on the same samples
    ref_dm = ref.datamodule
    ref_ids = {int(ref_dm.train_set[i]["sample_index"]) for i in range(len(ref_dm.train_set))}
    cli = _fit("rho1.yaml")
    dm = cli.datamodule
    main_ids = {int(dm.train_set[i]["sample_index"]) for i in range(len(dm.train_set))}
    val_ids = {int(dm.val_set[i]["sample_index"]) for i in range(len(dm.val_set))}
    assert ref_ids and main_ids and not ref_ids & main_ids
    assert not val_ids & (ref_ids | main_ids)
    assert len(ref_ids) == round(0.3 * (len(ref_ids) + len(main_ids)))
    assert cli.trainer.global_step == 2
    # the reference is the exported (trained) model, not the policy's start weights
    m = cli.model
    ref_w = dict(m.reference.named_parameters())
    base = m.model.get_base_model() if hasattr(m.model, "get_base_model") else m.model
    name = "model.layers.0.mlp.down_proj.weight"
    start = dict(base.named_parameters())
    start_w = start[name.replace("down_proj.weight", "down_proj.base_layer.weight")] if m.lora else start[name]
    assert not torch.allclose(ref_w[name], start_w)


def test_missing_reference_names_the_command(in_tmp, capsys):
    line = _error(capsys, "fit", "--config", str(RECIPES / "rho1.yaml"), "--config", str(TINY))
    assert "checkpoints/rho1_reference/export" in line and "recipes/rho1_reference.yaml" in line


def test_initial_reference_is_refused_for_rho1(in_tmp, capsys):
    line = _error(capsys, "fit", "--config", str(RECIPES / "rho1.yaml"), "--config", str(TINY),
                  "--model.init_args.reference_model", "initial")
    assert "reference_model=initial" in line and "rho1_reference.yaml" in line


def test_reference_with_another_vocabulary_is_refused(in_tmp, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(in_tmp / "other" / "ref")
    capsys.readouterr()
    line = _error(capsys, "fit", "--config", str(RECIPES / "rho1.yaml"), "--config", str(TINY),
                  "--model.init_args.reference_model", "./other/ref")
    assert "512" in line and "1024" in line and "tokenizer" in line
