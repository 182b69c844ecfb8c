"""Per-token knowledge distillation for selective training (ESLM-KD).

ESLM's KD variant (arXiv 2505.19893) is described only as "integrates with knowledge distillation"; the
exact loss is NOT FOUND. Ours: per-token forward KL from the frozen teacher to the student over the
vocabulary at temperature tau, `KL(p_T || p_S) * tau^2` (Hinton scaling), mixed with the hard-label CE:
    l_i = alpha * KD_i + (1 - alpha) * CE_i
The selector then chooses tokens by its score (for ESLM the per-token *trained* loss l_i, so the objective
is still a CVaR of what is trained) and the step averages l_i over the kept tokens.

Computed chunk by chunk over rows so the `[rows, vocab]` logits exist only for one chunk at a time
(student logits keep their graph for the backward; teacher logits are no-grad).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Distill:
    """Distillation settings for `SelectiveLM(distill=...)`.

    Attributes:
        teacher: a model folder / hub id loaded frozen (like `reference_model`); "initial" = a frozen copy of
            the starting weights (for tests).
        alpha: weight of the KD term; 1 - alpha weighs the hard-label CE.
        temperature: softmax temperature tau for both distributions (loss scaled by tau^2).
        chunk_size: rows per chunk.
    """

    teacher: str = "initial"
    alpha: float = 0.5
    temperature: float = 1.0
    chunk_size: int = 1024


def token_kl(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
             temperature: float = 1.0, chunk_size: int = 1024, student_bias: Tensor | None = None,
             teacher_bias: Tensor | None = None) -> Tensor:
    """Per-row forward KL(p_teacher || p_student) * tau^2 `[N]` from hidden rows `[N, H]` and head weights.

    The student and teacher may have different hidden sizes; their vocabularies must match.
    """
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"distillation needs one vocabulary: student has {student_weight.shape[0]} rows in its "
                         f"LM head, teacher {teacher_weight.shape[0]}")
    out = []
    tau = float(temperature)
    for s in range(0, student_hidden.shape[0], chunk_size):
        zs = F.linear(student_hidden[s:s + chunk_size], student_weight, student_bias).float() / tau
        with torch.no_grad():
            zt = F.linear(teacher_hidden[s:s + chunk_size], teacher_weight, teacher_bias).float() / tau
            log_pt = F.log_softmax(zt, -1)
        log_ps = F.log_softmax(zs, -1)
        out.append((log_pt.exp() * (log_pt - log_ps)).sum(-1) * tau * tau)
    if not out:
        return student_hidden.new_zeros(0)
    return torch.cat(out)
