"""scripts/gpu_check.sh on a CPU machine: its --dry-run checks the syntax, the carried-wheel list, the scripts it
calls and the environment probe without a GPU, and plans every step a GPU run takes."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("install carried wheels", "pip install --no-deps . (offline build)", "env probe",
         "pytest -m gpu tests/kernels", "pytest tests/kernels -m 'not gpu' (native CUDA)", "fused CE profile",
         "benchmarks/fused_ce.py", "benchmarks/llsa.py cuda bf16", "SmolLM2-135M folder",
         "ssToken 20 bf16 steps, Triton LM head")


def test_wheel_list_pins_one_version_each():
    specs = [line.split("#")[0].strip() for line in (ROOT / "scripts" / "gpu_wheels.txt").read_text().splitlines()]
    specs = [s for s in specs if s]
    assert specs and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", s) for s in specs), specs
    names = [s.split("==")[0].lower() for s in specs]
    assert len(names) == len(set(names))
    assert {"jsonargparse", "datasets", "liger-kernel", "cut-cross-entropy"} <= set(names)


def test_shell_syntax():
    for script in ("gpu_check.sh", "fetch_wheels.sh"):
        r = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_dry_run_probes_the_environment_and_plans_every_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "OK    shell syntax" in out and "OK    environment probe (dry run)" in out
    for step in STEPS:
        assert re.search(rf"PLAN  {re.escape(step)}", out), step
    probe = (tmp_path / "env.txt").read_text()
    assert re.search(r"^  ok  torch>=", probe, re.M) and "pyproject requirements" in probe
    assert (tmp_path / "summary.txt").read_text().strip().splitlines()[-1].startswith("PLAN  ssToken")


def test_bad_argument_is_refused():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stdout
