"""Step time of each token selector ÷ full-SFT step time: same model, same batches, same run.

    python benchmarks/selection_overhead.py                       # SmolLM2-135M-Instruct + LoRA r16, 8 x 256 tokens
    python benchmarks/selection_overhead.py --tiny --steps 3      # a from-config 2-layer Llama (seconds)

Each configuration trains `--steps` optimizer steps (after one warm-up step) on the same fixed batches
of the embedded GSM-style SFT set; the table reports the median step time and its ratio to full SFT.
ssToken is measured with the online history (base model with LoRA disabled: one extra no-grad forward)
and with cached history losses (written once before timing, as `trainer predict` + TokenStatsWriter
would). Goals (issue 4): ssToken <= 1.4x online, <= 1.05x cached; Q-Tuning at 25% samples x 50% tokens
<= 0.5x. Writes benchmarks/results/selection_overhead.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from tokensel.machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "selection_overhead.md"
TINY = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 2}


def configs(cache_path: str, ref_dir: str) -> list[tuple[str, dict]]:
    from tokensel.modules import (
        EslmSelection,
        FullSelection,
        QTuningSelection,
        RandomSelection,
        Rho1Selection,
        SsTokenSelection,
    )

    return [
        ("full", {"selector": FullSelection()}),
        ("random k=0.6", {"selector": RandomSelection(k=0.6)}),
        # the cost of a resident reference does not depend on its weights: the base model's export serves
        ("rho1 k=0.6 (resident ref)", {"selector": Rho1Selection(k=0.6), "reference_model": ref_dir}),
        ("eslm alpha=0.4", {"selector": EslmSelection(alpha=0.4)}),
        # steady state (after the attention-only warm-up): REL and attention both computed
        ("sstoken online history", {"selector": SsTokenSelection(warmup_fraction=0.0), "history": "base"}),
        ("sstoken cached history", {"selector": SsTokenSelection(warmup_fraction=0.0), "history": "cached",
                                    "history_losses": cache_path}),
        ("qtuning 25% x 50%", {"selector": QTuningSelection(sample_ratio=0.25, token_ratio=0.5)}),
    ]


def build(args, **kw):
    from tokensel.trainer.lm import LoRA, SelectiveLM

    base = {"model_config": TINY} if args.tiny else {"model": args.model}
    torch.manual_seed(0)
    return SelectiveLM(lora=LoRA(r=16, alpha=32, dropout=0.0), kernels="torch", **base, **kw)


def batches(args, module) -> list[dict]:
    from tokensel.trainer.data import SFTDataModule

    dm = SFTDataModule(max_length=args.seq, batch_size=args.batch, val_fraction=0.0, shuffle=False)
    dm._tokenizer = module.tokenizer
    dm.setup()
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(args.steps + 1)]


def write_history_cache(module, data, path) -> None:
    """Per-token losses of the base model (LoRA disabled), as the cached-history option expects."""
    from tokensel.trainer.token_cache import TokenStatsCache

    per_sample: dict[int, list[float]] = {}
    with torch.no_grad(), module.model.disable_adapter():
        for batch in data:
            loss, _, _ = module.token_stats(module.model, batch, grad=False)
            for b in range(loss.shape[0]):
                si = int(batch["sample_index"][b][0])
                n = int((batch["sample_index"][b] == si).sum())
                per_sample[si] = loss[b, :n].tolist()
    TokenStatsCache.save(path, per_sample)


def share_frozen(dst, src) -> None:
    """Point `dst`'s frozen (non-LoRA) weights at `src`'s storage: every configuration starts from the same
    base, so one copy serves all and the benchmark fits in memory (7 x SmolLM2 fp32 would not)."""
    for (n, p), (m, q) in zip(dst.model.named_parameters(), src.model.named_parameters()):
        assert n == m, (n, m)
        if not p.requires_grad:
            p.data = q.data


def one_step(module, opt, batch) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = module.selective_step(batch)
    out["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, out


def time_interleaved(modules: list, data: list[dict]) -> tuple[list[list[float]], list[dict]]:
    """Round-robin: step i of every configuration runs before step i+1 of any, so background load on the
    machine affects every row alike (the ratios are what this benchmark reports)."""
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for m in modules]
    for m in modules:
        m.train()
    times: list[list[float]] = [[] for _ in modules]
    infos: list[dict] = [{} for _ in modules]
    for i, batch in enumerate(data):
        for k, (m, opt) in enumerate(zip(modules, opts)):
            dt, infos[k] = one_step(m, opt, batch)
            if i > 0:  # step 0 is warm-up
                times[k].append(dt)
    return times, infos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--tiny", action="store_true", help="2-layer Llama from config (quick check)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    tmp = tempfile.mkdtemp()
    cache = str(Path(tmp) / "his.safetensors")
    first = build(args)
    data = batches(args, first)
    write_history_cache(first, data, cache)
    first.export_hf(str(Path(tmp) / "reference"))
    del first
    named = configs(cache, str(Path(tmp) / "reference"))
    modules = []
    for _, kw in named:
        modules.append(build(args, **kw))
        share_frozen(modules[-1], modules[0])
    times, infos = time_interleaved(modules, data)
    rows = [(name, statistics.median(t), info) for (name, _), t, info in zip(named, times, infos)]
    full = rows[0][1]
    lines = ["| selector | s/step (median) | ÷ full | keep ratio (last step) | samples kept |",
             "|---|---|---|---|---|"]
    for name, t, info in rows:
        lines.append(f"| {name} | {t:.3f} | {t / full:.2f} | {info['keep_ratio']:.2f} | {info['samples_kept']:.2f} |")
    table = "\n".join(lines)
    print(table)
    what = "tiny 2-layer Llama (from config)" if args.tiny else f"{args.model} (LoRA r16, fp32)"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        f"# Selector overhead: optimizer-step time ÷ full SFT\n\n- date: {date.today()}\n"
        f"- machine: {cpu_model()}, {torch.get_num_threads()} torch threads, no GPU\n"
        f"- versions: torch {torch.__version__}, python {platform.python_version()}\n"
        f"- command: `python benchmarks/selection_overhead.py {' '.join(sys.argv[1:])}`\n"
        f"- model: {what}; batch {args.batch} x {args.seq} tokens max; {args.steps} timed steps after 1 warm-up; "
        f"same fixed batches for every row, configurations interleaved step by step\n\n{table}\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
