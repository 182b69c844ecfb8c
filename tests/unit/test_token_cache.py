"""Cached per-token statistics (`TokenStatsWriter` -> `TokenStatsCache` -> `SelectiveLM._cached`) never lie.

* A padded `trainer predict` round-trips exactly into a packed training batch's lookup.
* The cache records the run that wrote it (model, tokenizer, data files and settings); a run with other data
  settings, changed data files, or (for history losses) another model is refused with one line naming the
  cache; a reference-loss cache from another model is accepted (that is what a reference model is).
* A labelled token of a sample the cache lacks, or past its cached length, or a sample whose tokens changed,
  is an error naming the cache and the sample, never a silent 0.
* A 2-process `trainer predict` (gloo, CPU) writes one file holding every sample's rows, equal to a
  1-process run's file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokensel.errors import ConfigError
from tokensel.modules.rho1 import Rho1Selection
from tokensel.trainer.data import SFTDataModule
from tokensel.trainer.lm import SelectiveLM
from tokensel.trainer.token_cache import TokenStatsCache, TokenStatsWriter

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(model_type="llama", vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=2, pad_token_id=0)
N = 10  # samples
DATA = [{"prompt": f"What is {i} plus {i * i}?" + " Think." * (i % 3), "response": f"{i} + {i * i} = {i + i * i}."}
        for i in range(N + 4)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    """Short SFT rows (20-40 tokens), so a packed row of 96 tokens holds several samples."""
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in DATA))
    return str(path)


def _dm(**kw) -> SFTDataModule:
    args = dict(max_length=96, batch_size=4, val_fraction=0.0, shuffle=False, max_samples=N)
    args.update(kw)
    return SFTDataModule(**args)


def _trainer(**kw):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, **kw)


def _predict(path: Path, module=None, **dm_kw) -> list:
    """`trainer predict` with `TokenStatsWriter` in this process; returns the predict_step outputs."""
    module = module or SelectiveLM(model_config=TINY, kernels="torch")
    return _trainer(callbacks=[TokenStatsWriter(str(path))]).predict(module, datamodule=_dm(**dm_kw))


def _batches(module, **dm_kw) -> list[dict]:
    dm = _dm(**dm_kw)
    dm._tokenizer = module.tokenizer
    dm.setup()
    return list(dm.train_dataloader())


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data_file):
    """A padded predict's cache of the tiny model's losses, and its predictions by sample."""
    path = tmp_path_factory.mktemp("cache") / "losses.safetensors"
    preds = _predict(path, train_files=[data_file])
    return path, {s: torch.as_tensor(vals) for batch in preds for s, vals, *_ in batch}


def test_padded_predict_round_trips_into_packed_lookup(cache, data_file):
    path, preds = cache
    assert sorted(preds) == list(range(N))
    module = SelectiveLM(model_config=TINY, kernels="torch", selector=Rho1Selection(), reference_losses=str(path))
    batches = _batches(module, packing=True, train_files=[data_file])
    assert any(len(row[row >= 0].unique()) > 1 for b in batches for row in b["sample_index"]), \
        "no packed row holds several samples"
    seen = set()
    for batch in batches:
        got = module._cached(module.reference_cache, batch)
        with torch.no_grad():
            live, _, valid = module.token_stats(module.model, batch, grad=False)
        si, ti = batch["sample_index"], batch["token_index"]
        for b, t in (si >= 0).nonzero().tolist():
            assert got[b, t] == preds[int(si[b, t])][int(ti[b, t])]  # exact: the cached value, in place
        seen |= set(si[si >= 0].tolist())
        assert torch.equal(got[si < 0], torch.zeros_like(got[si < 0]))
        # and the padded predict's losses are the packed batch's own (block-diagonal mask), up to float noise
        assert torch.allclose(got[valid], live[valid], atol=1e-5), (got[valid] - live[valid]).abs().max()
    assert seen == set(range(N))


def test_cache_records_the_run(cache):
    path, _ = cache
    c = TokenStatsCache.load(str(path))
    fp = c.fingerprint
    assert fp["model"]["config_sha"] and fp["tokenizer"]["vocab_size"] == 1024 and fp["tokenizer"]["vocab_sha"]
    data = fp["data"]
    assert data["max_length"] == 96 and data["format"] == "auto" and data["packing"] is False
    assert data["files"][0]["path"].endswith("sft.jsonl") and data["files"][0]["sha256"]
    assert c.token_hash is not None and bool(c.present.all()) and c.num_samples == N


def _fit_one_step(module, dm) -> None:
    _trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=dm)


def test_matching_run_trains_and_a_mismatch_names_the_cache(cache, data_file):
    path, _ = cache

    def module():
        return SelectiveLM(model_config=TINY, kernels="torch", selector=Rho1Selection(), reference_losses=str(path))

    # packing is recorded, not compared: the lookup is by (sample, position)
    _fit_one_step(module(), _dm(packing=True, train_files=[data_file]))
    with pytest.raises(ConfigError) as e:
        _fit_one_step(module(), _dm(max_length=80, train_files=[data_file]))
    msg = str(e.value)
    assert str(path) in msg and "model.reference_losses" in msg and "data.max_length: cache 96, run 80" in msg
    assert "trainer predict" in msg and "TokenStatsWriter" in msg and "\n" not in msg


def test_changed_data_file_is_refused(tmp_path):
    rows = [{"prompt": f"what is {i} + {i}?", "response": f"{2 * i}"} for i in range(6)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "c.safetensors"
    _predict(path, train_files=[str(data)], max_samples=None)
    rows[3]["response"] = "wrong"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = SelectiveLM(model_config=TINY, kernels="torch", selector=Rho1Selection(), reference_losses=str(path))
    with pytest.raises(ConfigError, match=rf"{path}.*data file .*d\.jsonl: content differs"):
        _fit_one_step(module, _dm(train_files=[str(data)], max_samples=None))
    # without the run fingerprint (no data module) the per-sample token hash still catches sample 3
    module = SelectiveLM(model_config=TINY, kernels="torch", selector=Rho1Selection(), reference_losses=str(path))
    batch = _batches(module, train_files=[str(data)], max_samples=None)[0]
    with pytest.raises(ConfigError, match=rf"{path}.*sample 3 .*stale"):
        module._cached(module.reference_cache, batch)


def test_history_cache_needs_the_same_model_reference_cache_does_not(cache, data_file):
    path, _ = cache
    other = dict(TINY, hidden_size=64, intermediate_size=128)
    ref = SelectiveLM(model_config=other, kernels="torch", selector=Rho1Selection(), reference_losses=str(path))
    batch = _batches(ref, train_files=[data_file])[0]
    assert ref._cached(ref.reference_cache, batch).abs().sum() > 0  # another model's reference losses: fine
    his = SelectiveLM(model_config=other, kernels="torch", history="cached", history_losses=str(path))
    with pytest.raises(ConfigError, match=rf"{path} \(model.history_losses\) was written for another run: model:"):
        his._cached(his.history_cache, batch)


def test_missing_sample_is_an_error_not_zero(tmp_path, cache, data_file):
    path, _ = cache
    module = SelectiveLM(model_config=TINY, kernels="torch", selector=Rho1Selection(), reference_losses=str(path))
    batches = _batches(module, max_samples=N + 4, train_files=[data_file])
    raised = 0
    for b in batches:
        firsts = [int(row[row >= 0][0]) for row in b["sample_index"]]
        missing = [s for s in firsts if s >= N]
        if not missing:
            module._cached(module.reference_cache, b)  # every sample cached: fine
            continue
        expected = rf"{path} \(model.reference_losses\) has no row for sample {missing[0]} \("
        with pytest.raises(ConfigError, match=expected):
            module._cached(module.reference_cache, b)
        raised += 1
    assert raised and raised < len(batches)
    # a hand-written cache (no hashes, no fingerprint) with a short row: past its cached length is an error
    short = tmp_path / "short.safetensors"
    TokenStatsCache.save(str(short), {0: [0.0, 1.0, 2.0]})
    c = TokenStatsCache.load(str(short))
    with pytest.raises(ConfigError, match=r"sample 0 has 3 cached tokens but position 3 carries a label"):
        c.lookup_batch({"sample_index": torch.zeros(1, 6, dtype=torch.long), "token_index": torch.arange(6)[None],
                        "input_ids": torch.ones(1, 6, dtype=torch.long), "labels": torch.ones(1, 6, dtype=torch.long)})
    # padding and prompt positions of absent samples stay 0 (nothing to look up)
    out = c.lookup(torch.tensor([[0, 0, -1, 7]]), torch.tensor([[0, 1, -1, 0]]),
                   valid=torch.tensor([[False, True, False, False]]))
    assert out.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    # and a run that knows its data refuses a cache that cannot show what it was written for
    with pytest.raises(ConfigError, match=r"short.safetensors has no run fingerprint"):
        c.check_fingerprint({"data": {}})


# ---------------------------------------------------------------- 2-process trainer predict (gloo, CPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_predict(cwd: Path, out: Path, devices: int, timeout: float = 300) -> None:
    cmd = [sys.executable, "-m", "tokensel", "predict", "--config", ROOT / "recipes" / "sft.yaml",
           "--config", ROOT / "tests" / "integration" / "tiny" / "_lm.yaml", "--run_name", f"predict{devices}",
           "--trainer.accelerator", "cpu", "--trainer.devices", devices,
           "--trainer.strategy", "ddp" if devices > 1 else "auto",
           "--trainer.use_distributed_sampler", "true",  # each rank predicts its own share of the samples
           "--model.init_args.lora", "null", "--data.init_args.max_samples", "24", "--data.init_args.batch_size", "4",
           "--data.init_args.val_fraction", "0",
           "--trainer.callbacks+=TokenStatsWriter", "--trainer.callbacks.out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    r = subprocess.run(list(map(str, cmd)), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{cmd}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"


@pytest.mark.distributed
def test_two_process_predict_writes_one_file_with_every_sample(tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _cli_predict(tmp_path, one, 1)
    _cli_predict(tmp_path, two, 2)
    from safetensors.torch import load_file

    ra, rb = load_file(str(one)), load_file(str(two))
    la, lb = ra["offsets"].diff(), rb["offsets"].diff()
    assert len(la) == 24 and bool((la > 0).all()), "the 1-process file misses samples"
    assert len(lb) == 24 and bool((lb > 0).all()), f"2 processes wrote {int((lb > 0).sum())} of 24 samples"
    assert torch.equal(la, lb) and torch.allclose(ra["values"], rb["values"], atol=1e-6)
    a, b = TokenStatsCache.load(str(one)), TokenStatsCache.load(str(two))
    assert torch.equal(a.token_hash, b.token_hash) and bool(b.present.all())
    assert a.fingerprint["data"] == b.fingerprint["data"] and a.fingerprint["tokenizer"] == b.fingerprint["tokenizer"]
    assert not list(tmp_path.glob("*.tmp*")), "a temporary file was left behind"
