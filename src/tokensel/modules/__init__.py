"""Selectors and selective blocks. Importing this package registers every selector, so recipes can
name them by short class name (`class_path: Rho1Selection`)."""

from tokensel.modules.base import KNOWN_STATS, TokenSelector, TokenStats, Triage, topk_mask
from tokensel.modules.basic import FullSelection, RandomSelection
from tokensel.modules.dynamic_tuning import BottleneckAdapter, DynamicTuningDispatcher, MoEAdapter  # noqa: F401
from tokensel.modules.eslm import AdaEslmSelection, EslmSelection
from tokensel.modules.llsa import LLSAttention  # noqa: F401
from tokensel.modules.qtuning import QTuningSelection
from tokensel.modules.rho1 import Rho1Selection, StaticRho1Selection
from tokensel.modules.spa import SpaGate  # noqa: F401
from tokensel.modules.sstoken import SsTokenSelection

__all__ = [
    "KNOWN_STATS", "TokenSelector", "TokenStats", "Triage", "topk_mask",
    "FullSelection", "RandomSelection", "Rho1Selection", "StaticRho1Selection",
    "SsTokenSelection", "EslmSelection", "AdaEslmSelection", "QTuningSelection",
]
