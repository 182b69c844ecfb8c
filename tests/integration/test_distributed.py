"""Data parallelism on one machine (gloo, 2 CPU processes, a tiny Llama, 5 steps).

* 2-process DDP / DeepSpeed ZeRO-2 / ZeRO-3 fits of an SFT recipe with a global token selector train
  exactly like one process holding the same global batch (per-step losses within 1e-4, fp32).
* A ZeRO-3 checkpoint exports to a Hugging Face folder whose logits match the trained model.
* Two torchrun agents on 127.0.0.1 with distinct node ranks ("two nodes") complete a fit.
* Killing one rank mid-run ends the job non-zero with a message; `last.ckpt` stays loadable.

Every subprocess is bounded by a timeout. DeepSpeed JIT-builds its shm op once (~60 s) into
TORCH_EXTENSIONS_DIR, kept under ~/.cache/tokensel so later tests and CI steps reuse it.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "random.yaml"
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"
B = 2  # per-process micro-batch; the 1-process reference uses 2 * B
STEPS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    cache = Path(os.environ.get("TOKENSEL_CACHE", Path.home() / ".cache" / "tokensel"))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions")),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(extra)
    return env


def _args(run: str, batch_size: int, *extra) -> list[str]:
    return ["fit", "--config", RECIPE, "--config", TINY, "--run_name", run,
            "--trainer.accelerator", "cpu", "--trainer.max_steps", STEPS, "--trainer.val_check_interval", "null",
            "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.logger", '{"class_path": "lightning.pytorch.loggers.CSVLogger", '
                                f'"init_args": {{"save_dir": "logs", "name": "{run}"}}}}',
            "--model.init_args.lora", "null", "--model.init_args.normaliser", "global_selected",
            "--model.init_args.selector.init_args.scope", "global",
            "--data.init_args.batch_size", batch_size, "--data.init_args.max_samples", "40", *extra]


def _run(cmd: list, cwd: Path, timeout: float = 420, **env) -> subprocess.CompletedProcess:
    r = subprocess.run(list(map(str, cmd)), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env=_env(**env))
    assert r.returncode == 0, f"{cmd}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}"
    return r


def fit(cwd: Path, run: str, devices: int, *extra, timeout: float = 420) -> list[float]:
    """`python -m tokensel fit` (Lightning launches the other processes); returns train/loss per step."""
    bs = B * 2 // devices
    cwd.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "tokensel", *_args(run, bs, "--trainer.devices", devices, *extra)], cwd, timeout)
    return _losses(cwd, run)


def _losses(cwd: Path, run: str) -> list[float]:
    files = sorted((cwd / "logs" / run).glob("version_*/metrics.csv"))
    assert files, f"no metrics.csv under {cwd / 'logs' / run}"
    with open(files[-1]) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The 1-process reference run: batch size 2 * B."""
    cwd = tmp_path_factory.mktemp("single")
    return fit(cwd, "single", 1), cwd / "checkpoints" / "single" / "last.ckpt"


def _close(a: list[float], b: list[float], tol: float = 1e-4) -> None:
    assert len(a) == len(b) == STEPS, (a, b)
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"losses 1 proc {a}\nlosses 2 proc {b}\nmax |diff| {diff:.2e}")
    assert diff <= tol, (a, b)


def test_ddp_two_processes_match_one(tmp_path, single):
    _close(single[0], fit(tmp_path, "ddp", 2, "--trainer.strategy", "ddp"))


def test_zero2_two_processes_match_one(tmp_path, single):
    _close(single[0], fit(tmp_path, "z2", 2, "--config", ROOT / "configs" / "deepspeed" / "zero2.yaml"))


def test_zero3_matches_one_and_exports(tmp_path, single):
    _close(single[0], fit(tmp_path, "z3", 2, "--config", ROOT / "configs" / "deepspeed" / "zero3.yaml"))
    last = tmp_path / "checkpoints" / "z3" / "last.ckpt"
    assert last.is_dir(), "ZeRO-3 checkpoints are folders"
    # export (one process, consolidating the shards), then compare logits with the sharded model's weights
    out = tmp_path / "hf"
    _run([sys.executable, "-m", "tokensel", "export", "--config", RECIPE, "--config", TINY,
          "--run_name", "z3", "--model.init_args.lora", "null", "--ckpt_path", "last", "--out", out], tmp_path, 300)
    # the export must hold the weights of the equivalent 1-process run: equal logits in plain transformers
    code = (
        "import sys, torch, transformers\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "assert 'tokensel' not in sys.modules\n"
        "sd = {k.removeprefix('model.'): v for k, v in torch.load(sys.argv[2], weights_only=False)"
        "['state_dict'].items()}\n"
        "ref = transformers.AutoModelForCausalLM.from_config(m.config).eval()\n"
        "missing, unexpected = ref.load_state_dict(sd, strict=False)\n"
        "assert not unexpected and all('lm_head' in k for k in missing), (missing, unexpected)\n"
        "ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))\n"
        "with torch.no_grad(): a, b = m(input_ids=ids).logits, ref(input_ids=ids).logits\n"
        "err = (a - b).abs().max().item(); print('max |logit diff|', err)\n"
        "sys.exit(0 if err <= 1e-4 else 1)\n")
    r = _run([sys.executable, "-c", code, out, single[1]], tmp_path, 120)
    print(r.stdout)


def test_two_agents_on_loopback_complete_a_fit(tmp_path):
    """Two torchrun agents, node ranks 0 and 1, one process each: the multi-node launch, on one machine."""
    port = free_port()
    script = ROOT / "scripts" / "torchrun_multinode.sh"
    args = _args("mn", B, "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp")
    procs = [subprocess.Popen(["bash", str(script), *map(str, args)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(NNODES="2", NODE_RANK=str(r), NPROC_PER_NODE="1", MASTER_PORT=str(port),
                                       PYTHON=sys.executable))
             for r in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(o[-4000:] for o in outs)
    assert len(_losses(tmp_path, "mn")) == STEPS
    assert (tmp_path / "checkpoints" / "mn" / "last.ckpt").is_file()


def test_killed_rank_stops_the_job_and_last_loads(tmp_path):
    port = free_port()
    args = _args("kill", B, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "400",
                 "--trainer.save_every_n_steps", "2", "--data.init_args.max_samples", "400")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "tokensel", *map(str, args)]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(), start_new_session=True)
    last = tmp_path / "checkpoints" / "kill" / "last.ckpt"
    try:
        deadline = time.time() + 240
        while not last.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.5)
        assert last.exists(), "no checkpoint appeared: " + (p.communicate(timeout=30)[1] if p.poll() is not None
                                                            else "still running")
        victim = _worker_pids(p.pid)[-1]
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        _, err = p.communicate(timeout=120)
        took = time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    print(f"job ended {took:.1f} s after the kill, rc={p.returncode}")
    assert p.returncode != 0
    assert "exitcode  : -9" in err or "Signal 9" in err or "SIGKILL" in err, err[-3000:]
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] >= 2 and ckpt["state_dict"]


def _worker_pids(agent: int) -> list[int]:
    """Child processes of the torchrun agent (the workers), by pid, from /proc."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == agent:
                kids.append(int(d.name))
    assert kids, "torchrun has no worker processes"
    return sorted(kids)


def _validate(cwd: Path, run: str, devices: int, *extra) -> dict[str, float]:
    """`trainer validate` of the untrained tiny model (seeded: the same weights in every run) on two validation
    sources of 13 and 8 rows at micro-batch 2; returns the logged val/ metrics."""
    import json

    files = []
    cwd.mkdir(parents=True, exist_ok=True)
    for name, n in (("arith", 13), ("words", 8)):
        f = cwd / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"prompt": f"{name} {i}?", "response": f"{name} answer {i * 7}"}) + "\n"
                             for i in range(n)))
        files.append(str(f))
    gen = cwd / "gen.yaml"  # greedy generations too: under ZeRO-3 every rank must take part in generate()
    gen.write_text("trainer:\n  callbacks:\n    - class_path: GenerationEval\n"
                   "      init_args: {n_prompts: 3, max_new_tokens: 5}\n")
    args = _args(run, 2, "--trainer.devices", devices, "--data.init_args.val_files", json.dumps(files),
                 "--trainer.limit_val_batches", "null", "--config", gen, *extra)
    _run([sys.executable, "-m", "tokensel", "validate", *args[1:]], cwd)
    (samples,) = (cwd / "checkpoints" / run / "generations").glob("val_step*.jsonl")
    (metrics,) = (cwd / "logs" / run).glob("version_*/metrics.csv")
    with open(metrics) as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("val/loss")]
    out = {k: float(v) for k, v in row.items() if k.startswith("val/") and v and k != "val/exact_match"}
    out["outputs"] = [json.loads(ln)["output"] for ln in samples.read_text().splitlines()]
    return out


def test_validation_is_sharded_across_ranks_and_its_means_match_one_process(tmp_path):
    """Each rank scores its own share (13 + 8 rows over 2 ranks: shares of 11 and 10, padded to 11 with an
    unlabelled copy), so the labelled tokens scored, summed over ranks, equal one process's (scoring the whole set
    on each rank would double them), and val/loss, token accuracy and each source's loss equal one process's.
    ZeRO-3, whose forward gathers weights collectively, needs the equal batch counts the padding gives, and
    every rank in GenerationEval's generate() (which decodes the same prompts as one process)."""
    one = _validate(tmp_path / "one", "v1", 1)
    assert {"val/loss", "val/token_acc", "val/tokens", "val/loss/arith", "val/loss/words"} <= one.keys(), one
    for run, extra in (("ddp", ["--trainer.strategy", "ddp"]),
                       ("z3", ["--config", ROOT / "configs" / "deepspeed" / "zero3.yaml"])):
        two = _validate(tmp_path / run, run, 2, *extra)
        print(run, two)
        assert two["val/tokens"] == one["val/tokens"], (one, two)
        assert len(one["outputs"]) == 3 and two["outputs"] == one["outputs"]  # the same greedy decoding
        for k in ("val/loss", "val/token_acc", "val/loss/arith", "val/loss/words"):
            assert abs(two[k] - one[k]) <= 1e-5, (k, one, two)


def test_zero3_distillation_trains_like_one_process(tmp_path):
    """ESLM-KD's loss reads both LM heads' weights directly; under ZeRO-3 both are sharded, and before the KL ran
    inside the heads' calls the teacher's head had 0 rows ("distillation needs one vocabulary ... teacher 0")."""
    kd = ["--model.init_args.distill", '{"teacher": "initial", "alpha": 0.5}']
    one = fit(tmp_path / "one", "kd1", 1, *kd)
    _close(one, fit(tmp_path / "z3", "kd3", 2, "--config", ROOT / "configs" / "deepspeed" / "zero3.yaml", *kd))


@pytest.mark.parametrize("recipe, extra, keys", [
    ("dyt", ["--data.init_args.synthetic_sizes", "[32, 13, 13]", "--data.init_args.batch_size", "4"],
     ("val/loss", "val/acc", "val/keep_rate")),
    ("llsa_dit", ["--data.init_args.synthetic_size", "60"], ("val/loss",)),
])
def test_vision_validation_is_sharded_across_ranks_and_matches_one_process(tmp_path, recipe, extra, keys):
    """The ViT (13 validation images) and DiT (15) modules: 2 DDP processes score shares of 7 and 6 (8 and 7),
    each padded with a weight-0 copy, so the images scored over all ranks equal one process's and so do the
    means. DiT's fixed validation noise is seeded per image, so it is the same however the set is split. Both
    write pictures after validation (keep maps, sample grids): rank 0 alone asked for `trainer.log_dir`, a
    broadcast under DDP, and the job hung there before."""
    got = {}
    for devices in (1, 2):
        run = f"{recipe}{devices}"
        cwd = tmp_path / run
        cwd.mkdir()
        _run([sys.executable, "-m", "tokensel", "validate", "--config", ROOT / "recipes" / f"{recipe}.yaml",
              "--config", ROOT / "tests" / "integration" / "tiny" / f"{recipe}.yaml", "--trainer.accelerator", "cpu",
              "--trainer.devices", devices, "--trainer.limit_val_batches", "null",
              *(["--trainer.strategy", "ddp"] if devices > 1 else []),
              "--trainer.logger", '{"class_path": "lightning.pytorch.loggers.CSVLogger", '
                                  f'"init_args": {{"save_dir": "logs", "name": "{run}"}}}}', *extra], cwd, 240)
        assert list(cwd.rglob("*.png")), f"{run}: no keep map / sample grid written"
        (metrics,) = (cwd / "logs" / run).glob("version_*/metrics.csv")
        with open(metrics) as f:
            (row,) = [r for r in csv.DictReader(f) if r.get("val/loss")]
        got[devices] = {k: float(v) for k, v in row.items() if k.startswith("val/") and v}
    print(got)
    one, two = got[1], got[2]
    assert one["val/images"] == two["val/images"] == {"dyt": 13, "llsa_dit": 15}[recipe], got
    for k in keys:
        assert abs(one[k] - two[k]) <= 1e-5, (k, got)
