"""Do the selectors beat the random control? Held-out loss and answer accuracy at equal optimizer steps, over seeds.

    python benchmarks/selection_quality.py                       # both parts, 3 seeds (about an hour each here)
    python benchmarks/selection_quality.py --parts pt            # only the pretraining part
    python benchmarks/selection_quality.py --tiny --seeds 0 --sft-steps 2 --pt-steps 2 --out /tmp/q.md   # smoke

Part SFT: SmolLM2-135M-Instruct (offline copy) + LoRA r16 alpha32 dropout 0 on the embedded GSM-style set. The
data module splits it once (data seed 0): held-out problems (val_fraction), a curated reference split
(reference_fraction, Rho-1 stage 1) and the main split every arm trains on. The Rho-1 reference model is
trained once (seed 0, full SFT on the reference split, `--ref-steps`) and merged; the static Rho-1 caches
(base loss, reference loss per main-split token) are written once with `TokenStatsWriter`'s format, as
`trainer predict` would. Arms: full, random 0.6, Rho-1 0.6 (trained reference), static Rho-1 0.6, ssToken
rho 0.6 gamma 0.5 (history = base, 20% attention-only warm-up, official row t), Q-Tuning (released-code rule,
25% samples x 50% tokens). Per seed every arm starts from the same LoRA init and trains on the same batches
(seeded order of the main split). Scores: mean response CE over every held-out problem, and exact-match
accuracy of greedy decoding (chat template) on `--n-gen` held-out problems (the number after `####`, else
the last number, against the JSONL `answer`).

Part PT: a GPT-2-style model from scratch (GPT-2 BPE, embedded Shakespeare, blocks of `--pt-seq`); arms full,
random 0.6, ESLM alpha 0.4 (score loss), ESLM alpha 0.4 (score entropy), Ada-ESLM; per seed the same init
and batches for every arm; held-out loss = mean CE over every token of `--pt-n-eval` held-out blocks.

Arms run interleaved step by step (step i of every arm before step i+1 of any), so load on the machine hits
them alike; s/step is the median over steps 2..N. Writes benchmarks/results/selection_quality.md (or --out).
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
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from tokensel.machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "selection_quality.md"
TINY_LLAMA = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 2}


def gpt2_config(args, seed: int) -> dict:
    return {"model_type": "gpt2", "vocab_size": 1024 if args.tiny else 50257, "n_positions": max(128, args.pt_seq),
            "n_embd": 64 if args.tiny else args.pt_hidden, "n_layer": 2 if args.tiny else args.pt_layers,
            "n_head": 4, "bos_token_id": 2 if args.tiny else 50256, "eos_token_id": 2 if args.tiny else 50256,
            "seed": seed}


# ---------------------------------------------------------------- arms


def sft_arms(args, seed: int, ref_dir: str, caches: dict[str, str]) -> list[tuple[str, dict]]:
    from tokensel.modules import (
        FullSelection,
        QTuningSelection,
        RandomSelection,
        Rho1Selection,
        SsTokenSelection,
        StaticRho1Selection,
    )

    return [
        ("full", {"selector": FullSelection()}),
        ("random k=0.6", {"selector": RandomSelection(k=0.6, seed=seed)}),
        ("rho1 k=0.6 (trained reference)", {"selector": Rho1Selection(k=0.6), "reference_model": ref_dir}),
        ("static rho1 k=0.6 (cached base - ref)", {"selector": StaticRho1Selection(k=0.6),
                                                   "base_losses": caches["base"], "reference_losses": caches["ref"]}),
        ("sstoken rho=0.6 gamma=0.5", {"selector": SsTokenSelection(rho=0.6, gamma=0.5), "history": "base"}),
        ("qtuning 25% samples x 50% tokens", {"selector": QTuningSelection(sample_ratio=0.25, token_ratio=0.5)}),
    ] + ([  # ablations (--ablate): which half of ssToken's score moves the held-out loss
        ("sstoken-ablation gamma=0 (attention only)", {"selector": SsTokenSelection(rho=0.6, gamma=0.0),
                                                       "history": "base"}),
        ("sstoken-ablation gamma=1 (REL only, no warm-up)", {
            "selector": SsTokenSelection(rho=0.6, gamma=1.0, warmup_fraction=0.0), "history": "base"}),
    ] if args.ablate else [])


def pick(arms: list[tuple[str, dict]], only: list[str] | None) -> list[tuple[str, dict]]:
    """The arms whose name starts with one of `only` (all without it); full and random always run."""
    if not only:
        return arms
    return [(n, kw) for n, kw in arms if n.startswith(("full", "random", *only))]


def pt_arms(seed: int) -> list[tuple[str, dict]]:
    from tokensel.modules import AdaEslmSelection, EslmSelection, FullSelection, RandomSelection

    return [
        ("full", {"selector": FullSelection()}),
        ("random k=0.6", {"selector": RandomSelection(k=0.6, seed=seed)}),
        ("eslm alpha=0.4 (loss)", {"selector": EslmSelection(alpha=0.4, score="loss")}),
        ("eslm alpha=0.4 (entropy)", {"selector": EslmSelection(alpha=0.4, score="entropy")}),
        ("ada-eslm (loss, start alpha 0.4)", {"selector": AdaEslmSelection(alpha=0.4)}),
    ]


def build_sft(args, seed: int, **kw):
    from tokensel.trainer.lm import LoRA, SelectiveLM

    base = {"model_config": TINY_LLAMA} if args.tiny else {"model": args.model}
    torch.manual_seed(seed)  # LoRA A init: identical for every arm of a seed
    return SelectiveLM(lora=LoRA(r=16, alpha=32, dropout=0.0), kernels="torch", **base, **kw)


def build_pt(args, seed: int, **kw):
    from tokensel.trainer.lm import SelectiveLM

    return SelectiveLM(model_config=gpt2_config(args, seed), tokenizer=None if args.tiny else "gpt2",
                       lora=None, kernels="torch", **kw)


# ---------------------------------------------------------------- training and scoring


def seeded_batches(dataset, collate, n_steps: int, batch: int, seed: int) -> list[dict]:
    """`n_steps` batches drawn without replacement in a seeded order (wrapping into a new order if needed)."""
    out, order = [], []
    g = torch.Generator().manual_seed(1000 + seed)
    while len(out) < n_steps:
        if len(order) < batch:
            order += torch.randperm(len(dataset), generator=g).tolist()
        out.append(collate([dataset[i] for i in order[:batch]]))
        order = order[batch:]
    return out


def train_interleaved(modules: list, data: list[dict], lr: float, wd: float, clip: float | None,
                      eval_every: int = 0, on_eval=None) -> tuple[list[list[float]], list[list[float]]]:
    """Step every module on the same batches, interleaved; `on_eval(step)` every `eval_every` steps."""
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
            for m in modules]
    for m in modules:
        m.train()
        m.total_steps = len(data)  # run length for schedules inside selectors (ssToken's warm-up)
    times: list[list[float]] = [[] for _ in modules]
    keeps: list[list[float]] = [[] for _ in modules]
    for i, batch in enumerate(data):
        step_t = []
        for k, (m, opt) in enumerate(zip(modules, opts)):
            m.manual_step = i  # no Trainer here: the step seeds random draws and schedules
            t0 = time.perf_counter()
            out = m.selective_step(batch)
            out["loss"].backward()
            if clip:
                torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            m.on_train_batch_end(out, batch, i)
            dt = time.perf_counter() - t0
            step_t.append(dt)
            if i > 0 or len(data) == 1:  # step 1 also pays one-off costs (allocations, lazy init)
                times[k].append(dt)
            keeps[k].append(out["keep_ratio"])
        if eval_every and on_eval is not None and (i + 1) % eval_every == 0:
            on_eval(i + 1)
            for m in modules:
                m.train()
        if (i + 1) % max(1, len(data) // 10) == 0 or i == 0:
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


@torch.no_grad()
def heldout_tail(module, batches: list[dict], alpha: float = 0.4) -> tuple[float, float]:
    """(mean CE over every held-out token, CVaR_alpha: the mean of the top (1 - alpha) share of them),
    the second being what ESLM's objective targets."""
    module.eval()
    losses = []
    for b in batches:
        loss, _, valid = module.token_stats(module.model, b, grad=False)
        losses.append(loss[valid].float())
    x = torch.sort(torch.cat(losses), descending=True).values
    k = max(1, math.ceil((1 - alpha) * x.numel() - 1e-9))
    return float(x.mean()), float(x[:k].mean())


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _norm(s: str) -> str | None:
    m = _NUM.search(s)
    if not m:
        return None
    try:
        f = float(m.group(0).replace(",", ""))
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
    """Greedy decoding (left-padded batches, chat template): (strict, lenient) exact-match rates and the texts."""
    tok, model = module.tokenizer, module.model
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
        L = max(len(x) for x in prompts)
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


def _row_of(sample: dict, rows: list[dict], tok) -> dict:
    """The JSONL row of a held-out sample, found by its prompt text."""
    text = tok.decode(sample["input_ids"], skip_special_tokens=True)
    hits = [r for r in rows if r["prompt"][:80] in text]
    if len(hits) > 1:  # problems can share an opening; the full prompt and the response's start decide
        hits = [r for r in hits if r["prompt"] in text and r["response"][:60] in text]
    if len(hits) != 1:
        raise RuntimeError(f"held-out sample maps to {len(hits)} JSONL rows")
    return hits[0]


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def _pct(xs: list[float]) -> str:
    if not xs:
        return "–"
    m = 100 * statistics.mean(xs)
    return f"{m:.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{m:.1f}"


# ---------------------------------------------------------------- SFT part


def _sft_data(args, tokenizer, part: str):
    from tokensel.trainer.data import SFTDataModule

    dm = SFTDataModule(max_length=args.seq, batch_size=args.batch, val_fraction=args.val_fraction, shuffle=False,
                       seed=0, max_samples=args.max_samples, reference_fraction=args.reference_fraction,
                       split_part=part)
    dm._tokenizer = tokenizer
    dm.setup()
    return dm


def train_reference(args, main_dm, ref_dm, out_dir: str) -> dict:
    """Rho-1 stage 1: full SFT on the curated split, merged and saved as a Hugging Face folder."""
    ref = build_sft(args, 0)
    data = seeded_batches(ref_dm.train_set, ref_dm._collate(), args.ref_steps, args.batch, 0)
    t0 = time.perf_counter()
    train_interleaved([ref], data, args.sft_lr, 0.0, 1.0)
    ref.export_hf(out_dir)
    val = [main_dm.val_set[i] for i in range(len(main_dm.val_set))]
    coll = main_dm._collate()
    loss = heldout_loss(ref, [coll(val[s:s + args.batch]) for s in range(0, len(val), args.batch)])
    return {"steps": args.ref_steps, "n": len(ref_dm.train_set), "s": time.perf_counter() - t0, "val_loss": loss}


def reference_val_loss(args, main_dm, ref_dir: str) -> float:
    from tokensel.trainer.lm import SelectiveLM

    m = SelectiveLM(model=ref_dir, kernels="torch")
    val = [main_dm.val_set[i] for i in range(len(main_dm.val_set))]
    coll = main_dm._collate()
    return heldout_loss(m, [coll(val[s:s + args.batch]) for s in range(0, len(val), args.batch)])


def write_caches(args, main_dm, ref_dir: str, out: Path) -> dict[str, str]:
    """Static Rho-1's two caches over the main split, written as `trainer predict` + `TokenStatsWriter` write
    them (same rows, hashes and fingerprint): the base model's and the reference model's per-token losses."""
    from tokensel.trainer.lm import LoRA, SelectiveLM
    from tokensel.trainer.token_cache import TokenStatsCache, _merge, _pack, run_fingerprint

    paths = {}
    loader = torch.utils.data.DataLoader(main_dm.train_set, batch_size=args.batch, shuffle=False,
                                         collate_fn=main_dm._collate())
    for name in ("base", "ref"):
        if name == "base":
            m = build_sft(args, 0)
        else:  # the reference export, wrapped like the policy (LoRA B = 0: the export's own losses)
            m = SelectiveLM(model=ref_dir, lora=LoRA(r=16, alpha=32, dropout=0.0), kernels="torch")
        m.eval()
        with torch.no_grad():
            preds = [m.predict_step(batch, i) for i, batch in enumerate(loader)]
        per_sample, hashes = _merge([_pack(preds)])
        paths[name] = str(out / f"{name}_losses.safetensors")
        TokenStatsCache.save(paths[name], per_sample, hashes, run_fingerprint(m, main_dm))
        del m
    return paths


def run_sft(args) -> tuple[str, dict]:
    from tokensel.offline import EMBEDDED_SFT
    from tokensel.trainer.lm import load_tokenizer

    tok = load_tokenizer(None) if args.tiny else build_sft(args, 0).tokenizer
    main_dm, ref_dm = _sft_data(args, tok, "main"), _sft_data(args, tok, "reference")
    work = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="tokensel-quality-"))
    ref_dir = str(work / "reference")
    if args.reuse:  # stage 1 of an earlier run with the same data settings (reference model + both caches)
        caches = {n: str(work / f"{n}_losses.safetensors") for n in ("base", "ref")}
        info = work / "reference.json"
        ref_info = (json.loads(info.read_text()) if info.exists() else {
            "steps": args.ref_steps, "s": float("nan"), "val_loss": reference_val_loss(args, main_dm, ref_dir)})
        print(f"SFT: reusing the reference model and caches in {work}", flush=True)
    else:
        print(f"SFT: training the reference model ({args.ref_steps} steps on {len(ref_dm.train_set)} samples)",
              flush=True)
        ref_info = train_reference(args, main_dm, ref_dm, ref_dir)
        (work / "reference.json").write_text(json.dumps(ref_info))
        caches = write_caches(args, main_dm, ref_dir, work)
    print(f"SFT: stage 1 (reference model, static Rho-1 caches) in {work}", flush=True)
    rows = [json.loads(ln) for ln in open(EMBEDDED_SFT, encoding="utf-8") if ln.strip()]
    val = [main_dm.val_set[i] for i in range(min(args.n_eval, len(main_dm.val_set)))]
    coll = main_dm._collate()
    val_batches = [coll(val[s:s + args.batch]) for s in range(0, len(val), args.batch)]
    problems = [_row_of(main_dm.val_set[i], rows, tok) for i in range(min(args.n_gen, len(main_dm.val_set)))]
    base = build_sft(args, 0)
    base_loss = heldout_loss(base, val_batches)
    base_acc = answer_accuracy(base, problems, args.max_new, args.gen_batch) if problems else (math.nan,) * 2 + ([],)
    del base
    print(f"SFT base: held-out loss {base_loss:.4f}, acc {base_acc[0]:.3f}/{base_acc[1]:.3f}", flush=True)
    results: dict[str, dict[str, list]] = {}
    for seed in args.seeds:
        named = pick(sft_arms(args, seed, ref_dir, caches), args.arms)
        modules = [build_sft(args, seed, **kw) for _, kw in named]
        data = seeded_batches(main_dm.train_set, coll, args.sft_steps, args.batch, seed)
        print(f"SFT seed {seed}: {args.sft_steps} steps x {len(modules)} arms (interleaved)", flush=True)
        times, keeps = train_interleaved(modules, data, args.sft_lr, 0.0, 1.0)
        for (name, _), m, t, k in zip(named, modules, times, keeps):
            r = results.setdefault(name, {"loss": [], "strict": [], "lenient": [], "t": [], "keep": [], "sample": []})
            r["loss"].append(heldout_loss(m, val_batches))
            acc = answer_accuracy(m, problems, args.max_new, args.gen_batch) if problems else (math.nan,) * 2 + ([],)
            r["strict"].append(acc[0])
            r["lenient"].append(acc[1])
            r["t"] += t
            r["keep"] += k
            r["sample"] = acc[2][:1]
            print(f"SFT seed {seed} {name}: held-out loss {r['loss'][-1]:.4f}, acc {acc[0]:.3f}/{acc[1]:.3f}",
                  flush=True)
        del modules
    return sft_table(results, base_loss, base_acc, len(problems)), {
        "n_train": len(main_dm.train_set), "n_ref": len(ref_dm.train_set), "n_val": len(main_dm.val_set),
        "n_eval": len(val), "n_gen": len(problems), "ref": ref_info, "results": results}


def sft_table(results: dict, base_loss: float, base_acc, n_gen: int) -> str:
    full = statistics.mean(results["full"]["loss"])
    rnd = statistics.mean(results["random k=0.6"]["loss"])
    full_t = statistics.median(results["full"]["t"]) if results["full"]["t"] else float("nan")
    lines = ["| arm | held-out loss (mean ± std over seeds) | Δ vs random | exact match % strict | "
             "exact match % lenient | s/step (median) | ÷ full | keep ratio |", "|---|---|---|---|---|---|---|---|",
             f"| base (no training) | {base_loss:.4f} | {base_loss - rnd:+.4f} | {100 * base_acc[0]:.1f} | "
             f"{100 * base_acc[1]:.1f} | – | – | – |"]
    for name, r in results.items():
        t = statistics.median(r["t"]) if r["t"] else float("nan")
        lines.append(f"| {name} | {_mean_std(r['loss'])} | {statistics.mean(r['loss']) - rnd:+.4f} | "
                     f"{_pct(r['strict'])} | {_pct(r['lenient'])} | {t:.2f} | {t / full_t:.2f} | "
                     f"{statistics.mean(r['keep']):.2f} |")
    lines.append("\nPer seed held-out loss: " + "; ".join(
        f"{n}: " + ", ".join(f"{x:.4f}" for x in r["loss"]) for n, r in results.items()))
    lines.append(f"\nPer seed exact match (strict, of {n_gen}): " + "; ".join(
        f"{n}: " + ", ".join(str(round(x * n_gen)) if x == x else "–" for x in r["strict"])
        for n, r in results.items()))
    lines.append(f"\nFull minus random held-out loss: {full - rnd:+.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- pretraining part


def run_pt(args) -> tuple[str, dict]:
    from tokensel.trainer.data import PretrainDataModule
    from tokensel.trainer.lm import load_tokenizer

    tok = load_tokenizer(None if args.tiny else "gpt2")
    dm = PretrainDataModule(train_files=[] if args.tiny else ["embedded:shakespeare"], max_length=args.pt_seq,
                            batch_size=args.pt_batch, val_fraction=args.pt_val_fraction, shuffle=False, seed=0,
                            tokenizer=None if args.tiny else "gpt2")
    dm._tokenizer = tok
    dm.setup()
    coll = dm._collate()
    val = [dm.val_set[i] for i in range(min(args.pt_n_eval, len(dm.val_set)))]
    val_batches = [coll(val[s:s + args.pt_batch]) for s in range(0, len(val), args.pt_batch)]
    results: dict[str, dict[str, list]] = {}
    curve: dict[tuple[str, int], list[tuple[float, float]]] = {}
    n_params = 0
    for seed in args.seeds:
        named = pick(pt_arms(seed), args.arms)
        modules = [build_pt(args, seed, **kw) for _, kw in named]
        n_params = sum(p.numel() for p in modules[0].model.parameters())
        init = heldout_tail(modules[0], val_batches)
        data = seeded_batches(dm.train_set, coll, args.pt_steps, args.pt_batch, seed)

        def on_eval(step, named=named, modules=modules):
            for (name, _), m in zip(named, modules):
                curve.setdefault((name, step), []).append(heldout_tail(m, val_batches))

        print(f"PT seed {seed}: {args.pt_steps} steps x {len(modules)} arms (interleaved)", flush=True)
        times, keeps = train_interleaved(modules, data, args.pt_lr, 0.1, 1.0, args.pt_eval_every, on_eval)
        r0 = results.setdefault("init (step 0)", {"loss": [], "tail": [], "t": [], "keep": []})
        r0["loss"].append(init[0])
        r0["tail"].append(init[1])
        for (name, _), m, t, k in zip(named, modules, times, keeps):
            r = results.setdefault(name, {"loss": [], "tail": [], "t": [], "keep": []})
            mean, tail = heldout_tail(m, val_batches)
            r["loss"].append(mean)
            r["tail"].append(tail)
            r["t"] += t
            r["keep"] += k
            print(f"PT seed {seed} {name}: held-out loss {mean:.4f}, CVaR0.4 {tail:.4f}", flush=True)
        del modules
    return pt_table(results, curve), {"n_train": len(dm.train_set), "n_val": len(dm.val_set), "n_eval": len(val),
                                      "n_params": n_params}


def pt_table(results: dict, curve: dict) -> str:
    rnd = statistics.mean(results["random k=0.6"]["loss"])
    rnd_tail = statistics.mean(results["random k=0.6"]["tail"])
    full_t = statistics.median(results["full"]["t"])
    lines = ["| arm | held-out loss, all tokens (mean ± std over seeds) | Δ vs random | held-out CVaR0.4 (top 60% "
             "of token losses) | Δ vs random | s/step (median) | ÷ full | keep ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        t = statistics.median(r["t"]) if r["t"] else float("nan")
        timing = "– | – | – |" if not r["t"] else f"{t:.3f} | {t / full_t:.2f} | {statistics.mean(r['keep']):.2f} |"
        lines.append(f"| {name} | {_mean_std(r['loss'])} | {statistics.mean(r['loss']) - rnd:+.4f} | "
                     f"{_mean_std(r['tail'])} | {statistics.mean(r['tail']) - rnd_tail:+.4f} | {timing}")
    lines.append("\nPer seed held-out loss: " + "; ".join(
        f"{n}: " + ", ".join(f"{x:.4f}" for x in r["loss"]) for n, r in results.items()))
    if curve:
        steps = sorted({s for _, s in curve})
        names = list(dict.fromkeys(n for n, _ in curve))
        lines += ["\nHeld-out loss during training (mean over seeds; CVaR0.4 in brackets):\n",
                  "| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
        for n in names:
            cells = [f"{statistics.mean(v[0] for v in curve[(n, s)]):.3f} "
                     f"({statistics.mean(v[1] for v in curve[(n, s)]):.3f})" for s in steps]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--tiny", action="store_true", help="from-config 2-layer models, tiny tokenizer (smoke test)")
    ap.add_argument("--parts", nargs="+", default=["pt", "sft"], choices=["pt", "sft"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=None, help="only the arms whose name starts so (+ full, random)")
    ap.add_argument("--sft-steps", type=int, default=24)
    ap.add_argument("--ref-steps", type=int, default=24, help="reference-model SFT steps on the curated split")
    ap.add_argument("--batch", type=int, default=8, help="SFT samples per step")
    ap.add_argument("--seq", type=int, default=256, help="SFT max_length")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="SFT held-out share (data seed 0)")
    ap.add_argument("--reference-fraction", type=float, default=0.3, help="curated reference split of the rest")
    ap.add_argument("--n-eval", type=int, default=1000, help="held-out SFT samples for the loss (all by default)")
    ap.add_argument("--n-gen", type=int, default=50, help="held-out problems for exact-match accuracy (0 = skip)")
    ap.add_argument("--gen-batch", type=int, default=25)
    ap.add_argument("--max-new", type=int, default=160)
    ap.add_argument("--sft-lr", type=float, default=3e-4)
    ap.add_argument("--max-samples", type=int, default=None, help="SFT: only the first N samples (smoke tests)")
    ap.add_argument("--pt-steps", type=int, default=300)
    ap.add_argument("--pt-batch", type=int, default=8)
    ap.add_argument("--pt-seq", type=int, default=128)
    ap.add_argument("--pt-hidden", type=int, default=128)
    ap.add_argument("--pt-layers", type=int, default=4)
    ap.add_argument("--pt-lr", type=float, default=6e-4)
    ap.add_argument("--pt-val-fraction", type=float, default=0.02)
    ap.add_argument("--pt-n-eval", type=int, default=128, help="held-out pretraining blocks for the loss")
    ap.add_argument("--pt-eval-every", type=int, default=0, help="also score every N steps (a learning curve)")
    ap.add_argument("--ablate", action="store_true", help="SFT: add ssToken's attention-only and REL-only arms")
    ap.add_argument("--reuse", default=None, help="folder of an earlier run's stage 1 (reference model, caches)")
    ap.add_argument("--out", default=str(RESULTS))
    return ap.parse_args(argv)


def header(args, argv, t_start: float, load0: float) -> str:
    import transformers

    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    return ("# Selection quality at equal optimizer steps (CPU, reduced scale)\n\n"
            f"- date: {date.today()}\n"
            f"- machine: {cpu_model()}, {torch.get_num_threads()} torch threads, no GPU; load average at start "
            f"{load0:.1f}\n"
            f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, "
            f"python {platform.python_version()}\n"
            f"- command: `python benchmarks/selection_quality.py {cmd}`\n"
            f"- seeds {args.seeds}; total wall time so far {time.perf_counter() - t_start:.0f} s; arms interleaved "
            "step by step; s/step = median over steps 2..N (selection + forward + backward + optimizer step)\n\n")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    sections: dict[str, str] = {}
    out = Path(args.out)

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(header(args, argv, t_start, load0) + "\n".join(sections[k] for k in ("sft", "pt")
                                                                       if k in sections))
        tmp.replace(out)
        print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)", flush=True)

    if "pt" in args.parts:
        t0 = time.perf_counter()
        table, r = run_pt(args)
        print(table)
        cfg = gpt2_config(args, 0)
        sections["pt"] = (
            f"## Pretraining: GPT-2-style model from scratch ({cfg['n_layer']} layers, n_embd {cfg['n_embd']}, "
            f"{cfg['n_head']} heads, vocab {cfg['vocab_size']}; {r['n_params'] / 1e6:.1f}M params incl. tied "
            "embeddings)\n\n"
            f"- data: {'embedded GSM text, tiny tokenizer' if args.tiny else 'embedded:shakespeare, GPT-2 BPE'}, "
            f"blocks of {args.pt_seq} tokens, {r['n_train']} train / {r['n_val']} held-out blocks; batch "
            f"{args.pt_batch} blocks, {args.pt_steps} AdamW steps (lr {args.pt_lr} constant, wd 0.1, clip 1.0); per "
            "seed the same init and batches for every arm\n"
            f"- held-out loss: mean CE over every token of {r['n_eval']} held-out blocks; CVaR0.4 = the mean of "
            "the highest 60% of those token losses (ESLM's objective at alpha 0.4)\n"
            f"- part wall time: {time.perf_counter() - t0:.0f} s\n\n{table}\n")
        write()
    if "sft" in args.parts:
        t0 = time.perf_counter()
        table, r = run_sft(args)
        print(table)
        what = "tiny 2-layer Llama (from config)" if args.tiny else f"{args.model} + LoRA r16 alpha32 dropout 0 (fp32)"
        ref = r["ref"]
        sections["sft"] = (
            f"## SFT: {what}\n\n"
            f"- data: embedded GSM-style set (gsm_symbolic_600) at max_length {args.seq}: {r['n_val']} held-out, "
            f"{r['n_ref']} curated reference split, {r['n_train']} main split (every arm trains on it); batch "
            f"{args.batch}, {args.sft_steps} AdamW steps (lr {args.sft_lr}, no decay, clip 1.0)\n"
            f"- reference model (Rho-1 stage 1, seed 0): full SFT, {ref['steps']} steps on the reference split, "
            f"merged; its held-out loss {ref['val_loss']:.4f} ({ref['s']:.0f} s)\n"
            f"- held-out loss: mean response CE over {r['n_eval']} held-out problems; exact match: greedy decoding "
            f"on {r['n_gen']} held-out problems (strict = number after `####`; lenient = else the last number)\n"
            f"- part wall time: {time.perf_counter() - t0:.0f} s\n\n{table}\n")
        write()


if __name__ == "__main__":
    main()
