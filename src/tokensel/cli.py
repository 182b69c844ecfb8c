"""`trainer` / `tokensel` / `python -m tokensel`: LightningCLI with fit, validate, test, predict and export.

    trainer fit --config recipes/sstoken.yaml
    trainer fit --config recipes/rho1.yaml --model.selector.init_args.k 0.7
    trainer export --config recipes/rho1.yaml --ckpt_path checkpoints/rho1/last.ckpt --out exported/rho1

Models and data modules are chosen by `class_path` (subclass mode), so every LightningModule /
LightningDataModule in `tokensel.trainer` can be named by its short class name; selectors, losses and
kernel back-ends are typed by their base classes and resolve the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re
import sys
import warnings

# Quiet, offline-friendly defaults before heavy imports: the machines have no hub access, and
# transformers/datasets otherwise spend seconds retrying the network.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _DropMessages(logging.Filter):
    """Drop log records containing any of `parts` (third-party chatter a cluster log does not need)."""

    def __init__(self, *parts: str) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(p in msg for p in self.parts)


def quiet_third_party() -> None:
    """Silence the litlogger tip, torch's LeafSpec deprecation (raised inside Lightning), transformers'
    checkpointing rename notice and DeepSpeed's CPU-accelerator warning. Our own messages are untouched.
    Also Lightning's "Checkpoint directory ... exists and is not empty": the run folder holds the CSV logs
    and both checkpoint callbacks, so it fired on every fresh run; a rerun never overwrites an earlier
    run's checkpoints (Lightning versions the names) and `last` / `best` resolve to the newest file."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropMessages("litlogger"))
    logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU", "Setting ds_accelerator"))


quiet_third_party()

from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

import tokensel  # noqa: E402,F401  (registers every selector / module for short class names)
from tokensel.errors import ConfigError, TokenselError  # noqa: E402
from tokensel.trainer.base_trainer import TokenselTrainer  # noqa: E402


def _known_subclasses(base_path: str) -> list[str]:
    """Short names of every imported subclass of the class at `base_path` (what a recipe may name)."""
    mod, _, name = base_path.rpartition(".")
    try:
        base = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):  # ValueError: an empty module name
        return []
    seen, todo = set(), list(base.__subclasses__())
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo += c.__subclasses__()
    return sorted({c.__name__ for c in seen if not c.__name__.startswith("_")})


def _inner_tokensel_error(message: str) -> str | None:
    """A tokensel error (`model.key=value: ...`) that jsonargparse listed among its Union-subtype attempts."""
    m = re.search(r"Errors:\s*-\s*((?:model|data|trainer)\.[\w.]+=.*?)\s+-\s+Expected a <class 'NoneType'>",
                  message, re.S)
    return " ".join(m.group(1).split()) if m else None


def summarise_parse_error(message: str) -> str:
    """One line from jsonargparse's nested error dump: the innermost key, what was wrong, the valid choices."""
    keys = re.findall(r'Parser key "([^"]+)"', message) + re.findall(r"NestedArg\(key='([^']+)'", message)
    inner = [k for k in keys if k not in ("model", "data", "trainer", "optimizer", "lr_scheduler")]
    key = (inner or keys or [None])[0]
    where = f"key '{key}'" if key else "config"
    if m := re.search(r"Expected a dot import path string: (\S+)", message) or re.search(
            r"Import path (\S+) does not", message):
        bases = re.findall(r"Subtypes: \[<class '([\w.]+)'>", message)
        known = _known_subclasses(bases[-1]) if bases else []
        return f"{where}: unknown class {m.group(1)!r}; known: {', '.join(known) or '(none imported)'}"
    if m := re.search(r"Option '([^']+)' is not accepted", message):
        cls = re.findall(r"class_path '([\w.]+)'", message)
        owner = f" of {cls[-1]}" if cls else ""
        return f"unknown key '{m.group(1)}'{owner}; run with --help (or --print_config) to list the valid keys"
    if m := re.search(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)", message):
        return f"{where}: got {m.group(2).strip()!r}; expected one of {m.group(1)}"
    if m := re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)", message):
        return f"{where}: got {m.group(2).strip()!r}; expected a value of type {m.group(1)}"
    if inner_error := _inner_tokensel_error(message):
        return inner_error
    lines = [ln.strip(" -") for ln in message.splitlines() if ln.strip() and not ln.strip().startswith("[")]
    return " ".join(lines)[:400]


class TokenselCLI(LightningCLI):
    """LightningCLI plus the `export` subcommand (a method of `TokenselTrainer`)."""

    @staticmethod
    def configure_optimizers(lightning_module: LightningModule, optimizer, lr_scheduler=None):
        """As LightningCLI's, but schedulers step every optimizer step, not every epoch: recipes count in
        steps (`total_iters`, warm-up) and a fine-tuning run is often shorter than one epoch."""
        if lr_scheduler is None:
            return optimizer
        from torch.optim.lr_scheduler import ReduceLROnPlateau

        if isinstance(lr_scheduler, ReduceLROnPlateau):
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": lr_scheduler, "monitor": lr_scheduler.monitor}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse as LightningCLI does, but turn a failure's usage dump into one line (key, problem, choices)."""
        buf = io.StringIO()
        try:
            with contextlib.redirect_stderr(buf):
                super().parse_arguments(parser, args)
        except SystemExit as e:
            text = buf.getvalue()
            if e.code in (0, None) or "error:" not in text:
                sys.stderr.write(text)
                raise
            sys.stderr.write(f"error: {summarise_parse_error(text.split('error:', 1)[1])}\n")
            raise SystemExit(2) from None
        sys.stderr.write(buf.getvalue())

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        subs = dict(LightningCLI.subcommands())
        subs["export"] = {"model", "datamodule"}
        return subs

    def add_arguments_to_parser(self, parser) -> None:
        # One place for run naming: checkpoints/<run_name>/ holds checkpoints, logs and the config.
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Run folder under checkpoints/ (default: the recipe file's stem).")

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; a value the parser accepted but a class rejects (a negative
        learning rate, a null where a number is needed) becomes one `ConfigError` line, not a traceback."""
        try:
            super().instantiate_classes()
        except TokenselError:
            raise
        except (ValueError, TypeError) as e:
            if inner := _inner_tokensel_error(str(e)):
                raise ConfigError(inner) from None
            first = " ".join(str(e).split())[:400]
            raise ConfigError(f"config: {type(e).__name__}: {first}; check the values set in the recipe / "
                              "command line (--print_config shows them)") from None

    def before_instantiate_classes(self) -> None:
        from tokensel.trainer.base_trainer import configure_run_dirs

        configure_run_dirs(self.config, self.subcommand, sys.argv)


def cli_main(args: list[str] | None = None, run: bool = True) -> TokenselCLI:
    """Build (and by default run) the CLI; `args` replaces `sys.argv[1:]` (tests use this)."""
    return TokenselCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=TokenselTrainer,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "yaml"},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point: clear one-line errors for bad input, non-zero exit, no traceback."""
    try:
        cli_main(args)
    except TokenselError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
