"""`trainer` / `tokensel` / `python -m tokensel`: LightningCLI with fit, validate, test, predict and export.

    trainer fit --config recipes/sstoken.yaml
    trainer fit --config recipes/rho1.yaml --model.selector.init_args.k 0.7
    trainer export --config recipes/rho1.yaml --ckpt_path checkpoints/rho1/last.ckpt --out exported/rho1

Models and data modules are chosen by `class_path` (subclass mode), so every LightningModule /
LightningDataModule in `tokensel.trainer` can be named by its short class name; selectors, losses and
kernel back-ends are typed by their base classes and resolve the same way.
"""

from __future__ import annotations

import os
import sys

# Quiet, offline-friendly defaults before heavy imports: the machines have no hub access, and
# transformers/datasets otherwise spend seconds retrying the network.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

import tokensel  # noqa: E402,F401  (registers every selector / module for short class names)
from tokensel.errors import TokenselError  # noqa: E402
from tokensel.trainer.base_trainer import TokenselTrainer  # noqa: E402


class TokenselCLI(LightningCLI):
    """LightningCLI plus the `export` subcommand (a method of `TokenselTrainer`)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        subs = dict(LightningCLI.subcommands())
        subs["export"] = {"model", "datamodule"}
        return subs

    def add_arguments_to_parser(self, parser) -> None:
        # One place for run naming: checkpoints/<run_name>/ holds checkpoints, logs and the config.
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Run folder under checkpoints/ (default: the recipe file's stem).")

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
