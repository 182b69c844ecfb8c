"""LightningModules, DataModules, callbacks and export. Every class here is nameable by short
`class_path` in recipes."""

from tokensel.trainer.base_trainer import ExportOnFitEnd, TokenselTrainer
from tokensel.trainer.data import PretrainDataModule, SFTDataModule
from tokensel.trainer.dit import *  # noqa: F401,F403
from tokensel.trainer.generation import GenerationEval  # noqa: F401
from tokensel.trainer.lm import LoRA, SelectiveLM
from tokensel.trainer.report import SelectionReport  # noqa: F401
from tokensel.trainer.strategies import CPUDeepSpeedStrategy  # noqa: F401
from tokensel.trainer.throughput import Throughput  # noqa: F401
from tokensel.trainer.token_cache import TokenStatsCache, TokenStatsWriter
from tokensel.trainer.vision_data import *  # noqa: F401,F403
from tokensel.trainer.vit import *  # noqa: F401,F403

__all__ = ["TokenselTrainer", "ExportOnFitEnd", "SFTDataModule", "PretrainDataModule", "SelectiveLM", "LoRA",
           "TokenStatsCache", "TokenStatsWriter"]
