"""Selection report: an HTML page of sample texts with the kept tokens highlighted (score as a tint), plus
PNG plots of the keep ratio and score histograms over training. Written every `every_n_steps` optimizer
steps and at the end of training, so a person sees at a glance what the selector does.

Reads `SelectiveLM.last_selection` (input ids, labels-valid mask, weights and the selector's score of the
last micro-batch) and `last_step_info["keep_ratio"]`; any module exposing those works. With `GenerationEval` on,
the last validation's decoded samples and exact match are shown too. When a TensorBoard or Weights & Biases
logger is on, the plots and the page are also logged there (`selection/*`).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class SelectionReport(Callback):
    """Write `<out_dir>/report.html`, `keep_ratio.png` and `score_hist.png`.

    Args:
        out_dir: folder; default `<trainer.default_root_dir>/selection_report`.
        every_n_steps: write the report every N optimizer steps (and always at the end of training).
        n_samples: sample texts shown from the last micro-batch.
        max_scores: scores of kept / dropped tokens remembered per recorded step (histograms).
    """

    def __init__(self, out_dir: str | None = None, every_n_steps: int = 50, n_samples: int = 4,
                 max_scores: int = 4096) -> None:
        super().__init__()
        self.out_dir, self.every_n_steps = out_dir, every_n_steps
        self.n_samples, self.max_scores = n_samples, max_scores
        self.history: list[dict] = []
        self.last: dict | None = None
        self.generations: dict | None = None  # set by GenerationEval: {stage, step, exact_match, rows, ...}
        self._written_at = -1

    def _dir(self, trainer) -> Path:
        d = Path(self.out_dir or os.path.join(trainer.default_root_dir or ".", "selection_report"))
        d.mkdir(parents=True, exist_ok=True)
        return d

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        info = getattr(pl_module, "last_step_info", None) or {}
        sel = getattr(pl_module, "last_selection", None)
        rec = {"step": int(trainer.global_step), "keep_ratio": float(info.get("keep_ratio", float("nan")))}
        if sel is not None:
            w, valid, score = sel["weights"], sel["valid"].bool(), sel["score"]
            kept = score[valid & (w > 0)].float().flatten().cpu()
            dropped = score[valid & (w <= 0)].float().flatten().cpu()
            rec["kept"], rec["dropped"] = kept[: self.max_scores].tolist(), dropped[: self.max_scores].tolist()
            self.last = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in sel.items()}
        self.history.append(rec)
        step = int(trainer.global_step)
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._written_at:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"history": [{"step": r["step"], "keep_ratio": r["keep_ratio"]} for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))

    # ------------------------------------------------------------------ writing

    def write(self, trainer, pl_module) -> Path:
        if getattr(trainer, "global_rank", 0) != 0:
            return self._dir(trainer)
        d = self._dir(trainer)
        self._written_at = int(trainer.global_step)
        self._plots(d)
        tok = getattr(pl_module, "tokenizer", None)
        selector = type(getattr(pl_module, "selector", None)).__name__
        (d / "report.html").write_text(self.render_html(tok, selector), encoding="utf-8")
        (d / "history.json").write_text(json.dumps([{"step": r["step"], "keep_ratio": r["keep_ratio"]}
                                                    for r in self.history]))
        self.log_to_loggers(trainer, d)
        return d

    def log_to_loggers(self, trainer, d: Path) -> None:
        """The plots and the HTML page to the TensorBoard / Weights & Biases loggers that are on (none needs
        importing unless it is the run's logger)."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = int(trainer.global_step)
        pngs = [p for p in (d / "keep_ratio.png", d / "score_hist.png") if p.exists()]
        page = (d / "report.html").read_text(encoding="utf-8")
        for logger in getattr(trainer, "loggers", None) or []:
            if isinstance(logger, TensorBoardLogger):
                import matplotlib.image

                exp = logger.experiment
                for p in pngs:
                    exp.add_image(f"selection/{p.stem}", matplotlib.image.imread(p)[..., :3], step,
                                  dataformats="HWC")
                exp.add_text("selection/report", page, step)
            elif isinstance(logger, WandbLogger):
                import wandb

                # through log_metrics: W&B's x-axis is Lightning's trainer/global_step there
                logger.log_metrics({**{f"selection/{p.stem}": wandb.Image(str(p)) for p in pngs},
                                    "selection/report": wandb.Html(page)}, step=step)

    def _plots(self, d: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.history]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(steps, [r["keep_ratio"] for r in self.history], marker=".")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("kept / labelled tokens")
        ax.set_ylim(0, 1.05)
        ax.set_title("keep ratio")
        fig.tight_layout()
        fig.savefig(d / "keep_ratio.png", dpi=100)
        plt.close(fig)
        recs = [r for r in self.history if "kept" in r]
        picks = [recs[0], recs[-1]] if len(recs) > 1 else recs
        fig, axes = plt.subplots(1, max(1, len(picks)), figsize=(4 * max(1, len(picks)), 3), squeeze=False)
        for ax, r in zip(axes[0], picks):
            allv = r["kept"] + r["dropped"]
            bins = 30 if allv else 1
            rng = (min(allv), max(allv) + 1e-6) if allv else (0, 1)
            ax.hist(r["kept"], bins=bins, range=rng, alpha=0.7, label="kept", color="tab:green")
            ax.hist(r["dropped"], bins=bins, range=rng, alpha=0.7, label="dropped", color="tab:gray")
            ax.set_title(f"selector score, step {r['step']}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(d / "score_hist.png", dpi=100)
        plt.close(fig)

    def render_html(self, tokenizer, selector_name: str = "") -> str:
        ratio = self.history[-1]["keep_ratio"] if self.history else float("nan")
        parts = ["<!doctype html><html><head><meta charset='utf-8'><title>selection report</title><style>",
                 "body{font-family:sans-serif;max-width:1000px;margin:auto}",
                 ".s{font-family:monospace;white-space:pre-wrap;border:1px solid #ccc;padding:8px;margin:8px 0}",
                 ".p{color:#999}.k{border-bottom:2px solid #080;font-weight:bold}.d{color:#555}",
                 "</style></head><body>",
                 f"<h1>Selection report: {html.escape(selector_name)}</h1>",
                 f"<p>step {self.history[-1]['step'] if self.history else 0}, last keep ratio {ratio:.3f}. "
                 "Grey = prompt / unlabelled; <b style='border-bottom:2px solid #080'>underlined bold</b> = kept "
                 "(trained); plain = dropped. Background tint = selector score (darker = higher, per sample).</p>",
                 "<img src='keep_ratio.png'> <img src='score_hist.png'>"]
        last = self.last
        if last is not None:
            ids, valid, w, score = last["input_ids"], last["valid"].bool(), last["weights"], last["score"].float()
            for b in range(min(self.n_samples, ids.shape[0])):
                sv = score[b][valid[b]]
                lo, hi = (float(sv.min()), float(sv.max())) if sv.numel() else (0.0, 1.0)
                spans = []
                for t in range(ids.shape[1]):
                    text = _token_text(tokenizer, int(ids[b, t]))
                    if not valid[b, t]:
                        spans.append(f"<span class='p'>{html.escape(text)}</span>")
                        continue
                    a = (float(score[b, t]) - lo) / (hi - lo + 1e-12)
                    cls = "k" if w[b, t] > 0 else "d"
                    spans.append(f"<span class='{cls}' style='background:rgba(255,140,0,{0.1 + 0.6 * a:.2f})' "
                                 f"title='score {float(score[b, t]):.4g}'>{html.escape(text)}</span>")
                kept = int(((w[b] > 0) & valid[b]).sum())
                parts.append(f"<h3>sample {b}: {kept}/{int(valid[b].sum())} tokens kept</h3>"
                             f"<div class='s'>{''.join(spans)}</div>")
        parts += self._generation_html()
        parts.append("</body></html>")
        return "\n".join(parts)

    def _generation_html(self) -> list[str]:
        g = self.generations
        if not g:
            return []
        out = [f"<h2>Generations ({html.escape(g['stage'])}, step {g['step']}): exact match "
               f"{g['exact_match']:.3f} ({html.escape(g.get('answer', ''))} answers)</h2>"]
        for i, r in enumerate(g["rows"]):
            mark = "correct" if r["correct"] else "wrong"
            out.append(f"<h3>prompt {i}: {mark} (answer {html.escape(str(r['answer']))}, reference "
                       f"{html.escape(str(r['reference_answer']))})</h3>"
                       f"<div class='s'><span class='p'>{html.escape(r.get('prompt', ''))}</span>"
                       f"<span class='k'>{html.escape(r.get('output', ''))}</span></div>")
        return out


def _token_text(tokenizer, tid: int) -> str:
    if tokenizer is None:
        return f"[{tid}]"
    try:
        return tokenizer.decode([tid])
    except Exception:  # noqa: BLE001 - an id outside the tokenizer (tiny models): show the number
        return f"[{tid}]"
