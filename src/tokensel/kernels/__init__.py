"""Kernel back-ends behind one switch.

`TOKENSEL_KERNELS=auto|triton|torch` (or the `kernels=` field of a module) picks the implementation:
`auto` uses Triton on CUDA tensors and the pure-torch reference elsewhere, and says once which it chose.
Triton modules are imported lazily so the package imports without triton installed.
"""

from __future__ import annotations

import logging
import os

from tokensel.kernels.reference import linear_cross_entropy as linear_cross_entropy_torch

BACKENDS = ("auto", "triton", "torch")
log = logging.getLogger(__name__)
_announced: set[tuple[str, str]] = set()


def resolve_backend(requested: str | None, device_type: str, op: str = "linear_cross_entropy") -> str:
    """Return "triton" or "torch" for an op on a device, honouring the env switch over the config field."""
    choice = os.environ.get("TOKENSEL_KERNELS") or requested or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"TOKENSEL_KERNELS / kernels={choice!r} is not one of {BACKENDS}")
    if choice == "auto":
        from tokensel._optional import TRITON_AVAILABLE

        choice = "triton" if device_type == "cuda" and TRITON_AVAILABLE else "torch"
        if (op, choice) not in _announced:
            _announced.add((op, choice))
            log.info("tokensel kernels: %s uses the %s implementation (TOKENSEL_KERNELS=auto, device %s)",
                     op, choice, device_type)
    return choice


def linear_cross_entropy(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None, backend=None,
                         **kwargs):
    """Per-token (loss, entropy, lse) of `hidden @ weight.T` against `targets`; see `reference.linear_cross_entropy`."""
    if resolve_backend(backend, hidden.device.type) == "triton":
        try:
            from tokensel.kernels.fused_linear_ce import fused_linear_cross_entropy
        except ImportError as e:  # the Triton op is optional until it lands / when triton is absent
            raise RuntimeError(f"TOKENSEL_KERNELS=triton but the Triton op is unavailable ({e}); "
                               "install tokensel[kernels] or set TOKENSEL_KERNELS=torch") from e
        return fused_linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                          softcap=softcap, **kwargs)
    return linear_cross_entropy_torch(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                      softcap=softcap, **kwargs)


__all__ = ["linear_cross_entropy", "linear_cross_entropy_torch", "resolve_backend", "BACKENDS"]
