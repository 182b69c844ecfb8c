"""Generation during validation: greedy-decode a fixed set of held-out prompts and score the final answers.

`GenerationEval` takes the first `n_prompts` validation samples; a sample's prompt is its unlabelled prefix (the
tokens before its first labelled token) and its reference is its first labelled span (the response). At each
validation (and at `trainer test`) it greedy-decodes the prompts, logs `val/exact_match` (`test/exact_match`) =
share of prompts whose final answer equals the reference's, writes every decoded sample to
`<run folder>/generations/<stage>_step<N>.jsonl`, and hands them to the selection report (if one is on).

Final answers (`answer`):
    gsm          the number after the last `####` (GSM8K / the embedded GSM-style set end responses with
                 `#### 28080`); an output without `####` has no answer (strict, as trained).
    last_number  the last number in the text (lenient: a model that never learnt `####`).
    text         the whole text, whitespace collapsed.
Numbers compare by value: `28,080`, `28080.00` and `28080` are equal. A reference without an answer (a
response cut short by `data.max_length`, or no `####` in "gsm" mode) is left out of the score.

    trainer:
      callbacks:
        - class_path: tokensel.trainer.generation.GenerationEval
          init_args: {n_prompts: 8, max_new_tokens: 128}
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback

from tokensel.errors import ConfigError

IGNORE = -100
ANSWER_MODES = ("gsm", "last_number", "text")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalise_number(s: str) -> str:
    s = s.replace(",", "").rstrip(".")
    try:
        d = Decimal(s).normalize()
    except InvalidOperation:
        return s
    out = format(d, "f")
    return "0" if out in ("-0", "0") else out


def final_answer(text: str, mode: str = "gsm") -> str | None:
    """The final answer in `text` (see the module docstring), or None when there is none."""
    if mode == "gsm":
        if "####" not in text:
            return None
        tail = text.rsplit("####", 1)[1]
        m = _NUMBER.search(tail)
        if m:
            return _normalise_number(m.group())
        first = tail.strip().splitlines()[0].strip() if tail.strip() else ""
        return first or None
    if mode == "last_number":
        nums = _NUMBER.findall(text)
        return _normalise_number(nums[-1]) if nums else None
    if mode == "text":
        return " ".join(text.split()) or None
    raise ConfigError(f"GenerationEval answer={mode!r}: use one of {', '.join(ANSWER_MODES)}")


def exact_match(outputs: list[str], references: list[str], mode: str = "gsm") -> tuple[float, list[dict]]:
    """Share of outputs whose final answer equals the reference's; references without an answer are left out.
    Returns (accuracy, one row per sample: answer, reference answer, correct)."""
    rows, hits, n = [], 0, 0
    for out, ref in zip(outputs, references, strict=True):
        want = final_answer(ref, mode)  # None: no answer to compare with (e.g. a response cut by max_length)
        got = final_answer(out, mode)
        ok = want is not None and got == want
        if want is not None:
            n += 1
            hits += ok
        rows.append({"answer": got, "reference_answer": want, "correct": bool(ok)})
    return (hits / n if n else float("nan")), rows


def prompt_and_reference(input_ids, labels) -> tuple[list[int], list[int]] | None:
    """(prompt ids = the tokens before the first labelled one, reference ids = the first labelled span), or
    None for a sample without a labelled token or without a prompt."""
    ids, lab = [int(x) for x in input_ids], [int(x) for x in labels]
    first = next((i for i, y in enumerate(lab) if y != IGNORE), None)
    if first is None or first == 0:
        return None
    end = next((i for i in range(first, len(lab)) if lab[i] == IGNORE), len(lab))
    return ids[:first], ids[first:end]


class GenerationEval(Callback):
    """Greedy decoding of fixed held-out prompts at each validation, scored by final-answer exact match.

    Args:
        n_prompts: the first this many validation samples (with a prompt and a labelled response).
        max_new_tokens: decoding budget per prompt.
        answer: how final answers are read: "gsm" | "last_number" | "text" (module docstring).
        batch_size: prompts decoded together (left-padded).
        every_n_validations: decode at every this many validations (1 = each); `trainer test` always decodes.
        out_dir: folder for the JSONL files; default `<trainer.default_root_dir>/generations`.
    """

    def __init__(self, n_prompts: int = 8, max_new_tokens: int = 128,
                 answer: Literal["gsm", "last_number", "text"] = "gsm", batch_size: int = 8,
                 every_n_validations: int = 1, out_dir: str | None = None) -> None:
        if answer not in ANSWER_MODES:
            raise ConfigError(f"GenerationEval answer={answer!r}: use one of {', '.join(ANSWER_MODES)}")
        for key, v in (("n_prompts", n_prompts), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                       ("every_n_validations", every_n_validations)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"GenerationEval {key}={v!r}: must be a positive integer")
        self.n_prompts, self.max_new_tokens, self.answer = n_prompts, max_new_tokens, answer
        self.batch_size, self.every_n_validations, self.out_dir = batch_size, every_n_validations, out_dir
        self._samples: list[tuple[list[int], list[int]]] | None = None
        self._validations = 0
        self.last: dict | None = None

    # ------------------------------------------------------------------ prompts

    def samples_from(self, dataset) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, reference ids) of the first `n_prompts` usable samples of `dataset` (packed sets: their
        unpacked view)."""
        view = getattr(dataset, "base", dataset)
        out = []
        for i in range(len(view)):
            item = view[i]
            pr = prompt_and_reference(item["input_ids"], item["labels"])
            if pr is not None:
                out.append(pr)
            if len(out) == self.n_prompts:
                break
        return out

    # ------------------------------------------------------------------ decoding and scoring

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: list[list[int]], device, synced_gpus: bool = False) -> list[str]:
        """Greedy continuations (decoded, special tokens dropped) of `prompts`, `batch_size` at a time."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        texts = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = prompts[s:s + self.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, p in enumerate(chunk):  # left padding: every continuation starts at column `width`
                ids[b, width - len(p):] = torch.tensor(p)
                mask[b, width - len(p):] = 1
            kwargs = {"synced_gpus": True} if synced_gpus else {}
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 num_beams=1, max_new_tokens=self.max_new_tokens, pad_token_id=pad,
                                 eos_token_id=eos, temperature=None, top_p=None, top_k=None, **kwargs)
            texts += tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
        return texts

    def evaluate(self, model, tokenizer, samples, device, synced_gpus: bool = False) -> tuple[float, list[dict]]:
        """Decode `samples` ((prompt ids, reference ids) pairs) and score them: (exact match, one row each)."""
        outputs = self.generate(model, tokenizer, [p for p, _ in samples], device, synced_gpus)
        refs = tokenizer.batch_decode([r for _, r in samples], skip_special_tokens=True)
        acc, rows = exact_match(outputs, refs, self.answer)
        prompts = tokenizer.batch_decode([p for p, _ in samples], skip_special_tokens=True)
        for row, p, o, r in zip(rows, prompts, outputs, refs, strict=True):
            row.update(prompt=p, output=o, reference=r)
        return acc, rows

    # ------------------------------------------------------------------ hooks

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations == 0:
            self._run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, "test")

    def _run(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        zero3 = isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3
        if not trainer.is_global_zero and not zero3:  # ZeRO-3: every rank takes part (sharded weights)
            return
        model, tokenizer = getattr(pl_module, "model", None), getattr(pl_module, "tokenizer", None)
        if model is None or tokenizer is None or not hasattr(model, "generate"):
            raise ConfigError(f"GenerationEval: {type(pl_module).__name__} has no generating `model` and "
                              "`tokenizer`; use it with SelectiveLM, or drop it from trainer.callbacks")
        if self._samples is None:
            dm = trainer.datamodule
            val = getattr(dm, "val_set", None) if dm is not None else None
            self._samples = self.samples_from(val) if val is not None else []
            if not self._samples:
                raise ConfigError("GenerationEval: the validation set has no sample with a prompt and a labelled "
                                  "response; give data.val_files (or data.val_fraction > 0) or drop the callback")
        acc, rows = self.evaluate(model, tokenizer, self._samples, pl_module.device, synced_gpus=zero3)
        step = int(trainer.global_step)
        if trainer.is_global_zero:
            pl_module.log(f"{stage}/exact_match", float(acc), rank_zero_only=True)
            folder = Path(self.out_dir or Path(trainer.default_root_dir or ".") / "generations")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stage}_step{step:07d}.jsonl"
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            tmp.replace(path)
            self.last = {"stage": stage, "step": step, "exact_match": float(acc), "answer": self.answer,
                         "rows": rows, "path": str(path)}
            from tokensel.trainer.report import SelectionReport

            for cb in trainer.callbacks:
                if isinstance(cb, SelectionReport):
                    cb.generations = self.last
