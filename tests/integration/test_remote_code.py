"""Compute-side exports load with `trust_remote_code=True` where tokensel cannot be imported.

The child interpreter runs with `-S` (no site processing, so tokensel's editable-install `.pth` is never
read) and only the site-packages folders on `PYTHONPATH`: torch and transformers import, tokensel does
not (the child asserts it). It loads each exported folder through the Auto classes, runs it on saved
inputs, and the parent compares with the trained module's own hard-decision outputs (fp32, atol 1e-5).
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tokensel.errors import ConfigError
from tokensel.trainer.base_trainer import write_export
from tokensel.trainer.dit import FlowMatchingDiT
from tokensel.trainer.vit import ViTClassifier

TINY_VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=28,
                patch_size=7, num_channels=1)
TINY_DIT = dict(image_size=8, width=32, depth=2, num_heads=2, num_classes=3, levels=2, block_size=4, top_k=2)

CHILD = r"""
import importlib.util, json, sys
import torch
assert importlib.util.find_spec("tokensel") is None, "tokensel is importable in the child"
from transformers import AutoModel, AutoModelForImageClassification
jobs = json.loads(sys.argv[1])
for name, job in jobs.items():
    cls = AutoModelForImageClassification if job["kind"] == "vit" else AutoModel
    model = cls.from_pretrained(job["dir"], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = torch.load(job["inputs"])
    with torch.no_grad():
        out = model(**inputs)
    torch.save(out.logits if job["kind"] == "vit" else out, job["out"])
print("child ok")
"""


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Small noise on every weight, so zero-initialised parts (adapter up-projections, AdaLN-zero, gate
    biases) are live and a wrong piece of exported code would change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _vit(method: str, **kwargs) -> ViTClassifier:
    model = ViTClassifier(method=method, backbone=None, vit_config=TINY_VIT, pictures=0, adapter_bottleneck=8,
                          **kwargs)
    _perturb(model, seed=len(method))
    return model.eval()


def _child_env() -> dict:
    paths = [p for p in dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]) if Path(p).is_dir()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def test_exports_run_without_tokensel(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 1, 28, 28)
    models = {
        "dyt": _vit("dynamic_tuning"),
        "dyt_moe_calibrated": _vit("dynamic_tuning", adapter_experts=2, calibrate_keep=True),
        "spa_threshold": _vit("spa", spa_selection="threshold"),
        "spa_topk": _vit("spa", spa_selection="topk", keep_rate=0.5),
    }
    models["dyt_moe_calibrated"].model.dispatchers[1].offset.fill_(0.7)  # a non-zero calibrated keep offset
    expected, jobs = {}, {}
    for name, module in models.items():
        with torch.no_grad():
            out = module.model(x, mode="skip")
        kept = torch.cat([m[:, 1:] for m in out.keep_masks]).float().mean().item()
        assert 0.0 < kept < 1.0, f"{name}: the test needs a partial selection, kept {kept}"
        expected[name] = out.logits
        torch.save({"pixel_values": x}, tmp_path / f"{name}.in")
        jobs[name] = dict(kind="vit", dir=write_export(module, str(tmp_path / name)),
                          inputs=str(tmp_path / f"{name}.in"), out=str(tmp_path / f"{name}.out"))

    for attention in ("llsa", "dense"):
        dit = FlowMatchingDiT(**TINY_DIT, attention=attention)
        _perturb(dit, seed=7)
        dit.eval()
        xs, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 2, 1])
        with torch.no_grad():
            expected[attention] = dit.net(xs, t, y)
        torch.save({"x": xs, "t": t, "y": y}, tmp_path / f"{attention}.in")
        jobs[attention] = dict(kind="dit", dir=write_export(dit, str(tmp_path / attention)),
                               inputs=str(tmp_path / f"{attention}.in"), out=str(tmp_path / f"{attention}.out"))

    for name, job in jobs.items():
        cfg = json.loads(Path(job["dir"], "config.json").read_text())
        assert "auto_map" in cfg, name
        for ref in cfg["auto_map"].values():
            assert Path(job["dir"], ref.split(".")[0] + ".py").is_file(), (name, ref)
    env = _child_env()
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    proc = subprocess.run([sys.executable, "-S", "-c", CHILD, json.dumps(jobs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, job in jobs.items():
        got = torch.load(job["out"])
        torch.testing.assert_close(got, expected[name], atol=1e-5, rtol=0, msg=name)


def test_live_config_has_no_auto_map_after_export(tmp_path):
    module = _vit("spa")
    write_export(module, str(tmp_path / "spa"))
    assert not hasattr(module.model.config, "auto_map") or module.model.config.auto_map is None
    assert json.loads((tmp_path / "spa" / "config.json").read_text())["auto_map"]


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_export_dtype_casts_written_weights_only(tmp_path, dtype, torch_dtype):
    module = _vit("dynamic_tuning")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    folder = Path(write_export(module, str(tmp_path / dtype), dtype=dtype))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    floats = [v for v in tensors.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch_dtype for v in floats)
    w = tensors["classifier.weight"]
    assert torch.equal(w, module.model.classifier.weight.detach().to(torch_dtype))
    assert json.loads((folder / "config.json").read_text())["dtype"] == dtype
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_export_dtype_rejects_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match="--dtype='fp8'.*bfloat16"):
        write_export(_vit("dense"), str(tmp_path / "x"), dtype="fp8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()


def test_image_processor_is_transformers_own(tmp_path):
    from transformers import AutoImageProcessor

    folder = write_export(_vit("spa"), str(tmp_path / "spa"))
    proc = AutoImageProcessor.from_pretrained(folder)
    assert type(proc).__name__.startswith("ViTImageProcessor")
    img = (torch.arange(28 * 28) % 256).to(torch.uint8).view(28, 28).numpy()
    pix = proc(images=img[..., None], input_data_format="channels_last", return_tensors="pt")["pixel_values"]
    assert pix.shape == (1, 1, 28, 28)
    torch.testing.assert_close(pix[0, 0], torch.from_numpy(img).float() / 255 * 2 - 1, atol=1e-6, rtol=0)
