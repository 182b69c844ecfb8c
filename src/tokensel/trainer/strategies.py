"""Distributed strategies: a DeepSpeed strategy that also runs on the CPU (gloo), and helpers.

Lightning's `DeepSpeedStrategy` refuses the CPU accelerator ("only supported on CUDA GPUs"). DeepSpeed itself
runs on the CPU (its CPU accelerator, gloo), so `CPUDeepSpeedStrategy` skips the three CUDA-only steps when,
and only when, the accelerator is the CPU; on CUDA every method defers to Lightning's `DeepSpeedStrategy`
unchanged. Recipes pick it with one line:

    trainer fit --config recipes/rho1.yaml --config configs/deepspeed/zero2.yaml

and `strategy: deepspeed_stage_2` (any Lightning DeepSpeed alias) is swapped for it automatically by
`TokenselTrainer` when the accelerator resolves to the CPU. Registered names: `deepspeed_cpu`,
`deepspeed_cpu_stage_{1,2,3}`.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry

# DeepSpeed warns "Setting accelerator to CPU" on every import without this; it picks the CPU anyway.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's `DeepSpeedStrategy`, usable with `accelerator: cpu` (gloo process group).

    Takes every argument of `lightning.pytorch.strategies.DeepSpeedStrategy` (`stage`, `config` = a
    DeepSpeed JSON/dict, `offload_optimizer`, ...). On the CPU the process-group backend defaults to gloo.
    """

    strategy_name = "deepspeed_cpu"

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # skip "only supported on CUDA GPUs"

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        # skip _validate_device_index_selection: CPU devices have no index
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        if self._process_group_backend is None and self._on_cpu():
            return "gloo"
        return super()._get_process_group_backend()

    def init_deepspeed(self) -> None:
        if not self._on_cpu():
            return super().init_deepspeed()
        import deepspeed

        orig = deepspeed.initialize

        def patched(*a, args=None, **kw):  # Lightning passes device_rank=None on CPU; DeepSpeed needs an int
            if args is not None and getattr(args, "device_rank", 0) is None:
                args.device_rank = self.local_rank
            return orig(*a, args=args, **kw)

        deepspeed.initialize = patched
        try:
            super().init_deepspeed()
        finally:
            deepspeed.initialize = orig

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register("deepspeed_cpu", cls, description="DeepSpeed that also runs on the CPU (gloo)")
        for stage in (1, 2, 3):
            strategy_registry.register(f"deepspeed_cpu_stage_{stage}", cls,
                                       description=f"DeepSpeed ZeRO-{stage}, CPU-capable", stage=stage)


if "deepspeed_cpu" not in StrategyRegistry:
    CPUDeepSpeedStrategy.register_strategies(StrategyRegistry)

_DS_ALIASES = {"deepspeed": {}, "deepspeed_stage_1": {"stage": 1}, "deepspeed_stage_2": {"stage": 2},
               "deepspeed_stage_2_offload": {"stage": 2, "offload_optimizer": True},
               "deepspeed_stage_3": {"stage": 3},
               "deepspeed_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True}}


def accelerator_is_cpu(accelerator) -> bool:
    """True when the Trainer's `accelerator` argument resolves to the CPU."""
    if isinstance(accelerator, CPUAccelerator) or accelerator == "cpu":
        return True
    return accelerator in (None, "auto") and not torch.cuda.is_available()


def cpu_strategy_for(strategy, accelerator):
    """Replace a Lightning DeepSpeed strategy (alias string or plain `DeepSpeedStrategy` instance) by
    `CPUDeepSpeedStrategy` when the accelerator is the CPU; anything else is returned unchanged."""
    if not accelerator_is_cpu(accelerator):
        return strategy
    if isinstance(strategy, str) and strategy in _DS_ALIASES:
        return CPUDeepSpeedStrategy(**_DS_ALIASES[strategy])
    if type(strategy) is DeepSpeedStrategy:
        strategy.__class__ = CPUDeepSpeedStrategy  # same state, CPU-capable methods
    return strategy


def is_zero3_partitioned(param) -> bool:
    """A parameter that DeepSpeed ZeRO-3 has partitioned (its full value lives across ranks)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


def call_in_module(module, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, run as `module`'s forward when ZeRO-3 has partitioned its parameters.

    DeepSpeed gathers a module's parameters in hooks around its `__call__` and again before its backward.
    A fused op that uses a module's weight directly (the LM head in `linear_cross_entropy`) must therefore
    run inside that module's call; `GatheredParameters` alone would free the weight before backward, which
    needs it. Without ZeRO-3 this is a plain call.
    """
    if module is None or not any(is_zero3_partitioned(p) for p in module.parameters(recurse=False)):
        return fn(*args, **kwargs)
    module.forward = lambda *a, **kw: fn(*a, **kw)  # instance attribute shadows the class's forward
    try:
        return module(*args, **kwargs)
    finally:
        del module.forward


def deepspeed_checkpoint_world_size(path) -> int | None:
    """Data-parallel world size a DeepSpeed checkpoint folder was written with (None: not such a folder)."""
    from pathlib import Path

    root = Path(path)
    if not root.is_dir():
        return None
    shards = list(root.glob("**/*_optim_states.pt"))
    return len(shards) or None


def check_resume(ckpt_path, strategy, world_size: int) -> None:
    """Refuse, with what to do instead, a resume the checkpoint format cannot honour.

    * DDP / single-process `.ckpt` files hold full weights and optimizer state: any world size works (the data
      sampler re-shards the remaining samples of the epoch).
    * A DeepSpeed ZeRO folder holds per-rank shards: it resumes only with the world size that wrote it, and only
      under DeepSpeed.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from tokensel.errors import TokenselError

    if ckpt_path is None:
        return
    saved = deepspeed_checkpoint_world_size(ckpt_path)
    is_ds = isinstance(strategy, DeepSpeedStrategy)
    if saved is not None and not is_ds:
        raise TokenselError(
            f"--ckpt_path {ckpt_path} is a DeepSpeed ZeRO checkpoint folder but this run does not use DeepSpeed. "
            "Resume with the same configs/deepspeed/*.yaml, or consolidate it into a plain checkpoint first: "
            f"`python -m lightning.pytorch.utilities.deepspeed {ckpt_path} consolidated.ckpt` and start from its "
            "weights (optimizer state is not carried over)")
    if saved is not None and saved != world_size:
        raise TokenselError(
            f"--ckpt_path {ckpt_path} was written by {saved} DeepSpeed ranks but this run has {world_size} "
            f"(num_nodes x devices). ZeRO shards cannot be re-split: resume with {saved} processes in total, or "
            f"consolidate (`python -m lightning.pytorch.utilities.deepspeed {ckpt_path} consolidated.ckpt`) and "
            "start a new run from those weights")
    if saved is None and is_ds and ckpt_path is not None and str(ckpt_path).endswith(".ckpt"):
        from pathlib import Path

        if Path(ckpt_path).is_file():
            raise TokenselError(
                f"--ckpt_path {ckpt_path} is a plain (DDP / single-process) checkpoint file; DeepSpeed resumes only "
                "from its own checkpoint folders. Resume without configs/deepspeed/*.yaml (any world size works), "
                "or start the DeepSpeed run from the weights (trainer export, then model.model: <export folder>)")
