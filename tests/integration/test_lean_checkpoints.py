"""Lean checkpoints: with LoRA (or a frozen ViT backbone) a checkpoint holds the trainable weights, optimizer,
schedulers, data and RNG state and a fingerprint of the frozen base; resume and export rebuild the base from
the config and refuse another one in one line."""

import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokensel.cli import cli_main
from tokensel.errors import ConfigError
from tokensel.trainer.lean import FINGERPRINT

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"
RECIPE = ROOT / "recipes" / "random.yaml"
LORA2 = ["--model.init_args.lora.r", "2", "--model.init_args.lora.alpha", "4"]
SEED1 = ('{model_type: llama, vocab_size: 1024, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, '
         'num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, tie_word_embeddings: true, '
         'bos_token_id: 0, eos_token_id: 2, pad_token_id: 0, seed: 1}')


def _args(*extra):
    return ["--config", str(RECIPE), "--config", str(TINY), "--trainer.logger", "false", *LORA2, *map(str, extra)]


def _fit(*extra):
    cli = cli_main(["fit", *_args(*extra)])
    return cli, Path(cli.trainer.checkpoint_callback.last_model_path)


def test_lora_checkpoint_holds_only_trainable_weights(in_tmp):
    cli, last = _fit("--run_name", "lean", "--trainer.max_steps", "1")
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    module = cli.model
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable and all(".lora_" in k for k in trainable)
    # hand count, LoRA r=2 on the 7 linears of each of 2 layers (hidden 32, kv 16, mlp 64): r * (in + out) =
    # 2 * (64 + 48 + 48 + 64 + 96 + 96 + 96) = 1024 per layer
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == 2048
    fp = ckpt[FINGERPRINT]
    # frozen: embed_tokens and the tied lm_head, 7 base linears + 2 norms per layer, the final norm
    # frozen parameters: embeddings 1024 * 32 = 32768; per layer q 1024, k 512, v 512, o 1024, gate / up / down
    # 2048 each, norms 64 = 9280; final norm 32: 51360, fp32 -> 205440 bytes (the tied lm_head shares them)
    assert (fp["tensors"], fp["dtype"], fp["method"], fp["bytes"]) == (21, "float32", "sha256", 205440)
    assert fp["source"] == "model_config (llama, seed 0)"
    # the optimizer state covers exactly the trainable weights: 2 AdamW moments of each
    state = ckpt["optimizer_states"][0]["state"]
    assert sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state.values()) == 2 * 2048
    full = io.BytesIO()
    torch.save({**ckpt, "state_dict": module.state_dict()}, full)
    assert full.getbuffer().nbytes - last.stat().st_size >= 205440  # the frozen base's bytes are gone


def _crash_run(*extra):
    return _args("--data.init_args.batch_size", "3", "--data.init_args.max_samples", "20", "--trainer.max_steps", "6",
                 "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0",
                 "--trainer.save_every_n_steps", "2", *extra)


def test_resume_from_a_lean_checkpoint_is_exact(in_tmp, fit_losses):
    full, _ = fit_losses(_crash_run("--run_name", "full"))
    _, cli = fit_losses(_crash_run("--run_name", "part"), crash_at=3)
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and FINGERPRINT in ckpt
    assert all(".lora_" in k for k in ckpt["state_dict"])  # no base weight: it is rebuilt from model_config
    resumed, _ = fit_losses(_crash_run("--run_name", "part"), ckpt_path=str(last))
    assert [s for s, _ in resumed] == [3, 4, 5, 6]
    torch.testing.assert_close([v for _, v in resumed], [v for s, v in full if s > 2], rtol=0, atol=1e-6)


def test_export_from_a_lean_checkpoint_gives_the_same_logits(in_tmp):
    from transformers import AutoModelForCausalLM

    cli, last = _fit("--run_name", "ex", "--trainer.max_steps", "2")
    assert FINGERPRINT in torch.load(last, map_location="cpu", weights_only=False)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = cli.model.eval().model(input_ids=ids).logits
    cli_main(["export", *_args(), "--ckpt_path", str(last), "--out", str(in_tmp / "hf")])
    got = AutoModelForCausalLM.from_pretrained(in_tmp / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def _tiny_base(folder: Path, seed: int) -> None:
    """A tiny Llama folder (the `_lm.yaml` shape, init seed `seed`) with the shipped tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tokensel.offline import TINY_TOKENIZER

    cfg = AutoConfig.for_model("llama", vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(folder)


def test_another_base_is_refused_in_one_line(in_tmp):
    # a LoRA run on a base folder; then the folder holds another model (same name, same shapes)
    _tiny_base(in_tmp / "base", seed=0)
    base = ["--model.init_args.model_config", "null", "--model.init_args.model", str(in_tmp / "base")]
    _, last = _fit("--run_name", "fp", "--trainer.max_steps", "1", *base)
    assert torch.load(last, map_location="cpu", weights_only=False)[FINGERPRINT]["source"] == str(in_tmp / "base")
    _tiny_base(in_tmp / "base", seed=1)
    r = subprocess.run([sys.executable, "-m", "tokensel", "export", *_args(*base), "--ckpt_path", str(last),
                        "--out", "hf"], capture_output=True, text=True, cwd=in_tmp, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{last}: checkpoint was trained on the frozen base {in_tmp / 'base'} (float32, 21" in errors[0]
    assert f"but the config builds {in_tmp / 'base'} (float32, 21" in errors[0]
    assert not (in_tmp / "hf").exists() and not (in_tmp / "hf.tmp").exists()
    # resuming a model_config run under another init seed is refused the same way, before any step
    _, last = _fit("--run_name", "fp2", "--trainer.max_steps", "1")
    cli = cli_main([*_args("--run_name", "fp2", "--trainer.max_steps", "2", "--model.init_args.model_config", SEED1)],
                   run=False)
    with pytest.raises(ConfigError, match=r"frozen base model_config \(llama, seed 0\).*builds model_config "
                                          r"\(llama, seed 1\)"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path="last")
    assert cli.trainer.global_step == 0  # refused while restoring the model, before the loops or any step


def _vit(backbone, finetune="adapter"):
    from tokensel.trainer.vit import ViTClassifier

    return ViTClassifier(method="dense", backbone=str(backbone), finetune=finetune, adapter_bottleneck=4, pictures=0)


def test_frozen_vit_backbone_stays_out_and_comes_back(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
                    patch_size=7, num_channels=1, num_labels=10)
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        ViTForImageClassification(cfg).save_pretrained(tmp_path / name)
    torch.manual_seed(5)
    trained = _vit(tmp_path / "a")
    with torch.no_grad():  # "training": the adapters and head move, the backbone does not
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.5)
    ckpt = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and not any(k.startswith("model.vit.") for k in ckpt["state_dict"])
    assert ckpt[FINGERPRINT]["source"] == f"backbone {tmp_path / 'a'}"
    torch.manual_seed(6)  # another init for the adapters and head: they must come from the checkpoint
    fresh = _vit(tmp_path / "a")
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    for (k, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    ckpt = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(ckpt)
    with pytest.raises(ConfigError, match="frozen base backbone .*/a .* but the config builds backbone .*/b "):
        _vit(tmp_path / "b").on_load_checkpoint(ckpt)
    full = {"state_dict": _vit(tmp_path / "a", finetune="full").state_dict()}
    n = len(full["state_dict"])
    _vit(tmp_path / "a", finetune="full").on_save_checkpoint(full)  # nothing frozen: everything stays
    assert len(full["state_dict"]) == n and FINGERPRINT not in full


def test_fingerprint_of_a_cast_base_and_of_a_sampled_one(monkeypatch):
    from tokensel.trainer import lean

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 2))
    net[0].requires_grad_(False)
    fp = lean.fingerprint(net, "x")
    assert (fp["tensors"], fp["bytes"], fp["method"]) == (2, (300 * 300 + 300) * 4, "sha256")
    # a bf16-true run hashed its bf16 base; the float32 base cast the same way hashes the same
    half = copy.deepcopy(net).to(torch.bfloat16)
    bf16 = lean.fingerprint(half, "x")
    assert bf16["dtype"] == "bfloat16" and lean.fingerprint(net, "x", dtype="bfloat16")["sha256"] == bf16["sha256"]
    assert bf16["sha256"] != fp["sha256"]
    # above FULL_HASH_BYTES each tensor is hashed on SAMPLE evenly spaced elements: positions 0, 999, ... hit
    monkeypatch.setattr(lean, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(lean, "SAMPLE", 91)  # of 90000 weights: k * 89999 // 90 = 0, 999, 1999, ..., 89999
    sampled = lean.fingerprint(net, "x")
    assert sampled["method"] == "sha256-sampled91"
    with torch.no_grad():
        net[0].weight.view(-1)[1] += 1.0  # between two sampled positions: unseen
    assert lean.fingerprint(net, "x")["sha256"] == sampled["sha256"]
    with torch.no_grad():
        net[0].weight.view(-1)[999] += 1.0  # a sampled position
    assert lean.fingerprint(net, "x")["sha256"] != sampled["sha256"]
