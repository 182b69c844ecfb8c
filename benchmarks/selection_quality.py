"""Selection quality at equal optimizer steps: held-out loss (+ answer accuracy) and step time ÷ full.

    python benchmarks/selection_quality.py                     # SmolLM2-135M LoRA SFT + GPT-2-style pretraining
    python benchmarks/selection_quality.py --sft-steps 200 --pt-steps 2000 --n-eval 64 --n-gen 100   # larger
    python benchmarks/selection_quality.py --tiny --max-samples 80 --out /tmp/q.md                   # seconds (smoke)

Part 1 (SFT): full vs random vs Rho-1 vs ssToken vs Q-Tuning. Every configuration starts from the same
weights (SmolLM2-135M-Instruct, offline copy; LoRA r16 alpha32 dropout 0, seed 0), trains `--sft-steps`
AdamW steps on the same batches of the embedded GSM-style set, and is then scored on held-out samples of
that set (the data module's validation split): mean per-token CE over the response tokens of `--n-eval`
samples, and answer accuracy of greedy generation (chat template, `--max-new` tokens) on `--n-gen`
problems: the number after `####` compared with the JSONL `answer` field ("strict"); "lenient" takes the
last number in the output when there is no `####`. A "base (step 0)" row scores the starting weights.

Part 2 (pretraining): full vs random vs ESLM. A GPT-2-style model from config (GPT-2 BPE, 4 layers) trained
from scratch for `--pt-steps` steps on the same blocks of embedded Shakespeare; held-out loss = mean CE over
all tokens of `--n-eval` held-out blocks.

Configurations run interleaved step by step (step i of every row before step i+1 of any), so background
load on the machine hits every row alike; s/step is the median over the steps after the first.
Writes benchmarks/results/selection_quality.md (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from tokensel.machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "selection_quality.md"
TINY_LLAMA = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 2}


def gpt2_config(args) -> dict:
    return {"model_type": "gpt2", "vocab_size": 1024 if args.tiny else 50257, "n_positions": max(128, args.pt_seq),
            "n_embd": 64 if args.tiny else args.pt_hidden, "n_layer": 2 if args.tiny else args.pt_layers,
            "n_head": 4, "bos_token_id": 2 if args.tiny else 50256, "eos_token_id": 2 if args.tiny else 50256}


# ---------------------------------------------------------------- configurations


def sft_configs() -> list[tuple[str, dict]]:
    from tokensel.modules import FullSelection, QTuningSelection, RandomSelection, Rho1Selection, SsTokenSelection

    return [
        ("full", {"selector": FullSelection()}),
        ("random k=0.6", {"selector": RandomSelection(k=0.6)}),
        ("rho1 k=0.6 (ref = initial)", {"selector": Rho1Selection(k=0.6), "reference_model": "initial"}),
        ("sstoken rho=0.6 gamma=0.5 (history = base)", {"selector": SsTokenSelection(rho=0.6, gamma=0.5),
                                                        "history": "base"}),
        ("qtuning 25% samples x 50% tokens", {"selector": QTuningSelection(sample_ratio=0.25, token_ratio=0.5)}),
    ]


def pt_configs() -> list[tuple[str, dict]]:
    from tokensel.modules import EslmSelection, FullSelection, RandomSelection

    return [
        ("full", {"selector": FullSelection()}),
        ("random k=0.6", {"selector": RandomSelection(k=0.6)}),
        ("eslm alpha=0.4 (score = loss)", {"selector": EslmSelection(alpha=0.4)}),
    ]


def build_sft(args, **kw):
    from tokensel.trainer.lm import LoRA, SelectiveLM

    base = {"model_config": TINY_LLAMA} if args.tiny else {"model": args.model}
    torch.manual_seed(args.seed)  # LoRA A init: identical for every row
    return SelectiveLM(lora=LoRA(r=16, alpha=32, dropout=0.0), kernels="torch", **base, **kw)


def build_pt(args, **kw):
    from tokensel.trainer.lm import SelectiveLM

    torch.manual_seed(args.seed)
    return SelectiveLM(model_config=gpt2_config(args), tokenizer=None if args.tiny else "gpt2",
                       lora=None, kernels="torch", **kw)


# ---------------------------------------------------------------- training


def train_interleaved(modules: list, data: list[dict], lr: float, wd: float, clip: float | None
                      ) -> tuple[list[list[float]], list[list[float]]]:
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
            for m in modules]
    for m in modules:
        m.train()
    times: list[list[float]] = [[] for _ in modules]
    keeps: list[list[float]] = [[] for _ in modules]
    for i, batch in enumerate(data):
        step_t: list[float] = []
        for k, (m, opt) in enumerate(zip(modules, opts)):
            t0 = time.perf_counter()
            out = m.selective_step(batch)
            out["loss"].backward()
            if clip:
                torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            step_t.append(dt)
            if i > 0 or len(data) == 1:  # step 0 also pays one-off costs (allocations, lazy init)
                times[k].append(dt)
            keeps[k].append(out["keep_ratio"])
        print(f"  step {i + 1}/{len(data)}: " + ", ".join(f"{t:.2f}s" for t in step_t), flush=True)
    return times, keeps


@torch.no_grad()
def heldout_loss(module, batches: list[dict]) -> float:
    module.eval()
    tot, n = 0.0, 0
    for b in batches:
        loss, _, valid = module.token_stats(module.model, b, grad=False)
        tot += float(loss[valid].sum())
        n += int(valid.sum())
    return tot / max(n, 1)


# ---------------------------------------------------------------- answer accuracy

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _norm(s: str) -> str | None:
    m = _NUM.search(s)
    if not m:
        return None
    v = m.group(0).replace(",", "")
    try:
        f = float(v)
    except ValueError:
        return None
    return str(int(f)) if f == int(f) else str(f)


def extract(text: str) -> tuple[str | None, str | None]:
    """(strict: first number after '####', lenient: that or else the last number in the text)."""
    strict = _norm(text.split("####", 1)[1]) if "####" in text else None
    nums = _NUM.findall(text)
    return strict, strict if strict is not None else (_norm(nums[-1]) if nums else None)


@torch.no_grad()
def answer_accuracy(module, problems: list[dict], max_new: int, bs: int) -> tuple[float, float, list[str]]:
    tok = module.tokenizer
    model = module.model
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    strict_ok = lenient_ok = 0
    outs: list[str] = []
    for s in range(0, len(problems), bs):
        chunk = problems[s:s + bs]
        prompts = []
        for p in chunk:
            if getattr(tok, "chat_template", None):
                ids = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=True,
                                              add_generation_prompt=True)
                ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
            else:
                ids = list(tok(p["prompt"] + "\n", add_special_tokens=False)["input_ids"])
            prompts.append(ids)
        L = max(len(x) for x in prompts)  # left padding for batched greedy decoding
        input_ids = torch.tensor([[pad] * (L - len(x)) + x for x in prompts])
        mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in prompts])
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id)
        for p, row in zip(chunk, gen[:, L:]):
            text = tok.decode(row, skip_special_tokens=True)
            outs.append(text)
            gold = _norm(str(p["answer"]))
            strict, lenient = extract(text)
            strict_ok += strict is not None and strict == gold
            lenient_ok += lenient is not None and lenient == gold
    n = max(len(problems), 1)
    return strict_ok / n, lenient_ok / n, outs


# ---------------------------------------------------------------- the two parts


def run_sft(args) -> tuple[str, dict]:
    from tokensel.offline import EMBEDDED_SFT
    from tokensel.trainer.data import SFTDataModule

    named = sft_configs()
    print(f"SFT: building {len(named)} configurations", flush=True)
    modules = [build_sft(args, **kw) for _, kw in named]
    dm = SFTDataModule(max_length=args.seq, batch_size=args.batch, val_fraction=args.val_fraction,
                       shuffle=False, seed=args.seed, max_samples=args.max_samples)
    dm._tokenizer = modules[0].tokenizer
    dm.setup()
    rows = [json.loads(ln) for ln in open(EMBEDDED_SFT, encoding="utf-8") if ln.strip()]
    it = iter(dm.train_dataloader())
    n_batches = -(-len(dm.train_set) // args.batch)
    if args.sft_steps > n_batches:
        raise SystemExit(f"--sft-steps {args.sft_steps} > {n_batches} batches in one epoch")
    data = [next(it) for _ in range(args.sft_steps)]
    val_items = [dm.val_set[i] for i in range(min(args.n_eval, len(dm.val_set)))]
    coll = dm._collate()
    val_batches = [coll(val_items[s:s + args.batch]) for s in range(0, len(val_items), args.batch)]
    problems = [_row_of(dm.val_set[i], rows, dm.tokenizer) for i in range(min(args.n_gen, len(dm.val_set)))]

    res: dict = {"n_train": len(dm.train_set), "n_val": len(dm.val_set), "n_eval": len(val_items),
                 "n_gen": len(problems), "rows": []}
    t0 = time.perf_counter()
    base_loss = heldout_loss(modules[0], val_batches)
    base_acc = (answer_accuracy(modules[0], problems, args.max_new, args.gen_batch) if problems
                else (math.nan, math.nan, []))
    res["eval_s"] = time.perf_counter() - t0
    print(f"SFT base: held-out loss {base_loss:.4f}, acc {base_acc[0]:.2f}/{base_acc[1]:.2f}", flush=True)
    print(f"SFT: training {args.sft_steps} steps x {len(modules)} configurations (interleaved)", flush=True)
    times, keeps = train_interleaved(modules, data, args.sft_lr, 0.0, 1.0)
    samples = []
    for (name, _), m, t, k in zip(named, modules, times, keeps):
        loss = heldout_loss(m, val_batches)
        acc = answer_accuracy(m, problems, args.max_new, args.gen_batch) if problems else (math.nan, math.nan, [])
        samples.append((name, acc[2][:1]))
        print(f"SFT {name}: held-out loss {loss:.4f}, acc {acc[0]:.2f}/{acc[1]:.2f}", flush=True)
        res["rows"].append((name, loss, acc[0], acc[1], statistics.median(t), statistics.mean(k)))
        # free as we go
    full_t = res["rows"][0][4]
    lines = ["| selector | held-out loss (response CE) | Δ vs full | answer acc strict (####) | answer acc lenient | "
             "s/step (median) | ÷ full | mean keep ratio |", "|---|---|---|---|---|---|---|---|"]
    lines.append(f"| base (step 0, no training) | {base_loss:.4f} | {base_loss - res['rows'][0][1]:+.4f} | "
                 f"{_frac(base_acc[0], len(problems))} | {_frac(base_acc[1], len(problems))} | – | – | – |")
    for name, loss, a_s, a_l, t, k in res["rows"]:
        lines.append(f"| {name} | {loss:.4f} | {loss - res['rows'][0][1]:+.4f} | {_frac(a_s, len(problems))} | "
                     f"{_frac(a_l, len(problems))} | {t:.2f} | {t / full_t:.2f} | {k:.2f} |")
    res["samples"] = samples
    return "\n".join(lines), res


def _row_of(sample: dict, rows: list[dict], tok) -> dict:
    """The JSONL row of a held-out sample (by its prompt text: truncation may have dropped samples, which
    shifts sample_index)."""
    text = tok.decode(sample["input_ids"], skip_special_tokens=True)
    hits = [r for r in rows if r["prompt"][:80] in text]
    if len(hits) != 1:
        raise RuntimeError(f"held-out sample maps to {len(hits)} JSONL rows")
    return hits[0]


def run_pt(args) -> tuple[str, dict]:
    from tokensel.trainer.data import PretrainDataModule

    named = pt_configs()
    print(f"PT: building {len(named)} configurations", flush=True)
    modules = [build_pt(args, **kw) for _, kw in named]
    dm = PretrainDataModule(train_files=[] if args.tiny else ["embedded:shakespeare"], max_length=args.pt_seq,
                            batch_size=args.batch, val_fraction=args.pt_val_fraction, shuffle=True, seed=args.seed,
                            tokenizer=None if args.tiny else "gpt2")
    dm._tokenizer = modules[0].tokenizer
    t0 = time.perf_counter()
    dm.setup()
    print(f"PT: tokenized in {time.perf_counter() - t0:.1f}s", flush=True)
    it = iter(dm.train_dataloader())
    data = [next(it) for _ in range(args.pt_steps)]
    coll = dm._collate()
    val_items = [dm.val_set[i] for i in range(min(args.n_eval, len(dm.val_set)))]
    val_batches = [coll(val_items[s:s + args.batch]) for s in range(0, len(val_items), args.batch)]
    init_loss = heldout_loss(modules[0], val_batches)
    times, keeps = train_interleaved(modules, data, args.pt_lr, 0.1, 1.0)
    rows = []
    for (name, _), m, t, k in zip(named, modules, times, keeps):
        rows.append((name, heldout_loss(m, val_batches), statistics.median(t), statistics.mean(k)))
        print(f"PT {name}: held-out loss {rows[-1][1]:.4f}", flush=True)
    full_loss, full_t = rows[0][1], rows[0][2]
    lines = ["| selector | held-out loss (all tokens) | Δ vs full | s/step (median) | ÷ full | mean keep ratio |",
             "|---|---|---|---|---|---|",
             f"| init (step 0) | {init_loss:.4f} | {init_loss - full_loss:+.4f} | – | – | – |"]
    for name, loss, t, k in rows:
        lines.append(f"| {name} | {loss:.4f} | {loss - full_loss:+.4f} | {t:.3f} | {t / full_t:.2f} | {k:.2f} |")
    n_params = sum(p.numel() for p in modules[0].model.parameters())
    return "\n".join(lines), {"n_train": len(dm.train_set), "n_val": len(dm.val_set), "n_eval": len(val_items),
                              "n_params": n_params}


def _frac(a: float, n: int) -> str:
    return "–" if n == 0 or a != a else f"{round(a * n)}/{n}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--tiny", action="store_true", help="from-config 2-layer models, tiny tokenizer (smoke test)")
    ap.add_argument("--sft-steps", type=int, default=12)
    ap.add_argument("--pt-steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8, help="samples (SFT) / blocks (pretraining) per step")
    ap.add_argument("--seq", type=int, default=256, help="SFT max_length")
    ap.add_argument("--pt-seq", type=int, default=128, help="pretraining block length")
    ap.add_argument("--pt-hidden", type=int, default=128)
    ap.add_argument("--pt-layers", type=int, default=4)
    ap.add_argument("--n-eval", type=int, default=32, help="held-out samples / blocks for the loss")
    ap.add_argument("--n-gen", type=int, default=16, help="held-out problems for answer accuracy (0 = skip)")
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--sft-lr", type=float, default=3e-4)
    ap.add_argument("--pt-lr", type=float, default=6e-4)
    ap.add_argument("--val-fraction", type=float, default=0.1, help="SFT held-out share (seeded split)")
    ap.add_argument("--pt-val-fraction", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-samples", type=int, default=None, help="SFT: use only the first N samples (smoke tests)")
    ap.add_argument("--skip-sft", action="store_true")
    ap.add_argument("--skip-pt", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    what_sft = "tiny 2-layer Llama (from config)" if args.tiny else f"{args.model} + LoRA r16 alpha32 dropout 0 (fp32)"
    sections: dict[str, str] = {}

    def write() -> None:
        import transformers

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            "# Selection quality at equal optimizer steps (reduced scale, CPU)\n\n"
            f"- date: {date.today()}\n"
            f"- machine: {cpu_model()}, {torch.get_num_threads()} torch threads, no GPU; load average at start "
            f"{load0:.1f} (shared machine)\n"
            f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, "
            f"python {platform.python_version()}\n"
            f"- command: `python benchmarks/selection_quality.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n"
            f"- total wall time: {time.perf_counter() - t_start:.0f} s; seed {args.seed}; configurations interleaved "
            f"step by step, s/step = median over steps 2..N (selection + forward + backward + optimizer step)\n\n"
            + "\n".join(sections[k] for k in ("sft", "pt") if k in sections))
        print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)", flush=True)

    if not args.skip_pt:
        t0 = time.perf_counter()
        table, r = run_pt(args)
        print(table)
        cfg = gpt2_config(args)
        sections["pt"] = (
            f"## Pretraining: GPT-2-style model from scratch ({cfg['n_layer']} layers, n_embd {cfg['n_embd']}, "
            f"{cfg['n_head']} heads, vocab {cfg['vocab_size']}; {r['n_params'] / 1e6:.1f}M params incl. tied "
            f"embeddings)\n\n"
            f"- data: {'embedded GSM text, tiny tokenizer' if args.tiny else 'embedded:shakespeare, GPT-2 BPE'}, "
            f"blocks of {args.pt_seq} tokens, {r['n_train']} train / {r['n_val']} held-out blocks; batch "
            f"{args.batch} blocks, {args.pt_steps} AdamW steps (lr {args.pt_lr} constant, wd 0.1, clip 1.0), "
            f"the same batches for every row\n"
            f"- held-out loss: mean CE over every token of {r['n_eval']} held-out blocks\n"
            f"- part wall time: {time.perf_counter() - t0:.0f} s\n\n{table}\n")
        write()
    if not args.skip_sft:
        t0 = time.perf_counter()
        table, r = run_sft(args)
        print(table)
        sections["sft"] = (
            f"## SFT: {what_sft}\n\n"
            f"- data: embedded GSM-style set (gsm_symbolic_600), {r['n_train']} train / {r['n_val']} held-out "
            f"(seeded split, val_fraction {args.val_fraction}); batch {args.batch} x max {args.seq} tokens, "
            f"{args.sft_steps} AdamW steps (lr {args.sft_lr}, no decay, clip 1.0), the same batches for every row\n"
            f"- held-out loss: mean per-token CE over the response tokens of {r['n_eval']} held-out samples\n"
            + (f"- answer accuracy: greedy decoding (chat template, max {args.max_new} new tokens) on {r['n_gen']} "
               f"held-out problems; strict = number after `####` equals `answer`; lenient = else the last number\n"
               if r["n_gen"] else "- answer accuracy: not run (--n-gen 0)\n") +
            f"- part wall time: {time.perf_counter() - t0:.0f} s\n\n{table}\n")
        write()


if __name__ == "__main__":
    main()
