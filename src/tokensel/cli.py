"""`trainer` / `tokensel` / `python -m tokensel`: LightningCLI with fit, validate, test, predict and export, and
`eval` (lm-evaluation-harness on an export, `tokensel.trainer.harness`).

    trainer fit --config recipes/sstoken.yaml
    trainer fit --config recipes/rho1.yaml --model.selector.init_args.k 0.7
    trainer export --config recipes/rho1.yaml --ckpt_path last --out exported/rho1
    trainer eval exported/rho1 --tasks gsm8k --limit 200

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
    Also Lightning's "Checkpoint directory ... exists and is not empty": the run folder holds the CSV logs,
    the run's config and both checkpoint callbacks, so it fired on every run; a fresh fit into a folder that
    holds checkpoints is refused before it starts (`configure_run_dirs`), and a resume continues its own."""
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


def _innermost_class_error(message: str) -> tuple[str, str] | None:
    """(class name, its message) of the deepest `- ClassName: message` that a class's own check raised inside
    jsonargparse's nested Union dump (e.g. `RandomSelection: k=1.5 must lie in [0, 1]`), else None."""
    found = re.findall(r"Errors:\s*-\s*([A-Z]\w*): (.*?)\s+-\s+Expected a <class 'NoneType'>", message, re.S)
    return (found[-1][0], " ".join(found[-1][1].split())) if found else None


def _class_key_path(config, class_name: str) -> str | None:
    """The dotted key of the first `class_path` in `config` (a jsonargparse Namespace) naming `class_name`."""
    try:
        leaves = config.items() if hasattr(config, "items") else []
        for k, v in leaves:
            if str(k).endswith("class_path") and isinstance(v, str) and v.rpartition(".")[2] == class_name:
                return str(k).removesuffix(".class_path")
    except (TypeError, AttributeError):
        return None
    return None


def summarise_parse_error(message: str) -> str:
    """One line from jsonargparse's nested error dump: the innermost key, what was wrong, the valid choices."""
    keys = re.findall(r'Parser key "([^"]+)"', message) + re.findall(r"NestedArg\(key='([^']+)'", message)
    inner = [k for k in keys if k not in ("model", "data", "trainer", "optimizer", "lr_scheduler")]
    key = (inner or keys or [None])[0]
    keys = list(dict.fromkeys(keys))  # the nesting, outermost first: model, selector, k
    full = ".init_args.".join(keys) if "class_path" in message else ".".join(keys)
    where = f"key '{full or key}'" if key else "config"
    prims = re.findall(r"Expected a <class '(float|int|bool)'>", message)
    if prims and (vals := re.findall(r"Given value: (?!NestedArg)(.*)", message)):
        # a numeric key given a word: say the type, not "unknown class" (jsonargparse also tried an import path)
        return (f"{where}: got {vals[0].strip()!r}; expected a value of type "
                f"{' or '.join(dict.fromkeys(prims))}")
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


def _empty_mapping_paths(node, prefix: str = ""):
    """Dotted paths of the empty mappings (`key: {}`) in a raw YAML / command-line value."""
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and not v:
                yield path
            else:
                yield from _empty_mapping_paths(v, path + ".")


def _unknown_empty_mapping(argv: list, parsed) -> str | None:
    """The first `key: {}` in the --config files or --key {} arguments whose key the parsed config lacks:
    jsonargparse silently drops an empty mapping under an unknown key (every other unknown key is refused)."""
    import yaml

    raw: list[tuple[str, object]] = []
    argv = [str(a) for a in argv]
    for i, a in enumerate(argv):
        flag, eq, val = a.partition("=")
        if not flag.startswith("--") or (not eq and i + 1 >= len(argv)):
            continue
        val = val if eq else argv[i + 1]
        if flag == "--config":
            try:
                raw.append(("", yaml.safe_load(open(val, encoding="utf-8"))))
            except (OSError, yaml.YAMLError, UnicodeDecodeError):
                continue  # the parser has already judged the file
        elif val.strip() == "{}":
            raw.append(("", {flag[2:]: {}}))
    for prefix, node in raw:
        for path in _empty_mapping_paths(node, prefix):
            try:
                known = path in parsed
            except (TypeError, KeyError, AttributeError):
                known = True
            if not known:
                return path
    return None


class TokenselCLI(LightningCLI):
    """LightningCLI plus the `export` subcommand (a method of `TokenselTrainer`)."""

    @staticmethod
    def configure_optimizers(lightning_module: LightningModule, optimizer, lr_scheduler=None):
        """As LightningCLI's, but schedulers step every optimizer step, not every epoch (a fine-tuning run is
        often shorter than one epoch), and a scheduler sized from the run (`WarmupDecay`: anything with
        `set_total_steps`) gets the run's length, `trainer.estimated_stepping_batches` (max_steps, or epochs
        x batches / accumulation), so no recipe states it."""
        if lr_scheduler is None:
            return optimizer
        from torch.optim.lr_scheduler import ReduceLROnPlateau

        if hasattr(lr_scheduler, "set_total_steps"):
            lr_scheduler.set_total_steps(lightning_module.trainer.estimated_stepping_batches)

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
        sub = self.config.get("subcommand") if hasattr(self.config, "get") else None
        parsed = self.config.get(sub) if sub else self.config
        if bad := _unknown_empty_mapping(args if isinstance(args, list) else sys.argv[1:], parsed):
            sys.stderr.write(f"error: unknown key '{bad.rpartition('.')[2]}' (at {bad}): jsonargparse drops an "
                             "empty mapping under a key it does not know, so it is probably a typo; run with --help "
                             "(or --print_config) to list the valid keys\n")
            raise SystemExit(2)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        subs = dict(LightningCLI.subcommands())
        subs["export"] = {"model", "datamodule"}
        return subs

    def add_arguments_to_parser(self, parser) -> None:
        # One place for run naming: the run folder holds checkpoints, logs and the config (configure_run_dirs).
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Run folder under checkpoints/ (default: <recipe stem>/<hash of the resolved "
                                 "config>, so each sweep value gets its own folder and a rerun finds its own).")

    def _parse_ckpt_path(self) -> None:
        """Lightning reads a `--ckpt_path` file's hyperparameters here, before anything else: check the file
        first, so a truncated or foreign file is one line, not a traceback from torch.load."""
        sub = self.config.get("subcommand") if hasattr(self.config, "get") else None
        path = self.config[sub].get("ckpt_path") if sub and sub in self.config else None
        if isinstance(path, str) and path not in ("last", "best"):
            from tokensel.trainer.ckpt_check import check_recipe, read_checkpoint

            check_recipe(path, read_checkpoint(path), self.config[sub])
        super()._parse_ckpt_path()

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
            if found := _innermost_class_error(str(e)):  # a nested class's own check: its message alone
                cls, msg = found
                sub = self.config.get(self.subcommand) if self.subcommand else self.config
                path = _class_key_path(sub, cls)
                raise ConfigError(f"{path} ({cls}): {msg}" if path else f"{cls}: {msg}") from None
            first = " ".join(str(e).split())[:400]
            raise ConfigError(f"config: {type(e).__name__}: {first}; check the values set in the recipe / "
                              "command line (--print_config shows them)") from None

    def before_instantiate_classes(self) -> None:
        from tokensel.trainer.base_trainer import configure_run_dirs

        if self.subcommand == "fit":
            _check_warmup_fits(self.config["fit"])
        configure_run_dirs(self.config, self.subcommand, sys.argv)

    def after_instantiate_classes(self) -> None:
        """Hand the trainer the resolved config (`run_config`: written to the run folder when fitting and
        into every export as `tokensel_config.yaml`), and give a data module that records no hyperparameters
        of its own its settings under `data`, so hparams.yaml and every logger show them."""
        import yaml

        cfg = self.config.get(str(self.subcommand), self.config)
        text = self._parser(self.subcommand).dump(cfg, skip_none=False)
        self.trainer.run_config = text
        dm = getattr(self, "datamodule", None)
        if dm is not None and not dm.hparams:
            data = (yaml.safe_load(text) or {}).get("data") or {}
            if isinstance(data, dict) and data:
                flat = {"class_path": data.get("class_path"), **(data.get("init_args") or {})}
                from tokensel.trainer.base_trainer import log_hparams

                log_hparams(dm, {"data": flat})


def _check_warmup_fits(cfg) -> None:
    """A `WarmupDecay` warm-up of at least `trainer.max_steps` optimizer steps, refused before the run folder is
    made (the scheduler itself learns the run's length only when fit starts, after the config is written there).
    A run bounded by epochs alone is checked when its length is known."""
    sched, trainer = cfg.get("lr_scheduler"), cfg.get("trainer")
    if sched is None or trainer is None or not str(sched.get("class_path", "")).endswith("WarmupDecay"):
        return
    init = sched.get("init_args") or {}
    steps, max_steps = init.get("warmup_steps") or 0, trainer.get("max_steps")
    if (isinstance(max_steps, int) and max_steps > 0 and init.get("warmup_ratio") is None
            and not init.get("warmup_overlap") and isinstance(steps, int) and steps >= max_steps):
        raise ConfigError(f"lr_scheduler.init_args.warmup_steps={steps} is not shorter than the run "
                          f"(trainer.max_steps={max_steps}); lower it, or use warmup_ratio so it scales with "
                          "trainer.max_steps")


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
    argv = sys.argv[1:] if args is None else [str(a) for a in args]
    if argv[:1] == ["eval"]:  # lm-evaluation-harness on an export folder: not a config-driven Lightning verb
        from tokensel.trainer.harness import main as eval_main

        return eval_main(argv[1:])
    try:
        cli = cli_main(args)
    except TokenselError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, TypeError) as e:
        if not _raised_by_lightning_setup(e):
            raise
        # a trainer setting Lightning accepts at construction but rejects when the run starts
        print(f"error: trainer: {' '.join(str(e).split())[:400]}", file=sys.stderr)
        raise SystemExit(2) from None
    from tokensel.trainer.preempt import PREEMPTED_EXIT, preempted

    if preempted(getattr(cli, "trainer", None)):  # stopped by SIGTERM / SIGUSR1 after writing last.ckpt
        raise SystemExit(PREEMPTED_EXIT)


def _raised_by_lightning_setup(e: BaseException) -> bool:
    """True when the innermost frame of `e` is Lightning's own run-time validation of trainer settings (the
    fit loop's data setup, the trainer's connectors and configuration validator): a bad value, not a bug."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_code.co_filename.replace("\\", "/") if tb is not None else ""
    return "lightning/pytorch/" in name and any(
        part in name for part in ("/loops/", "/trainer/connectors/", "/trainer/configuration_validator"))


if __name__ == "__main__":
    main()
