"""Selection-aware losses."""

from tokensel.losses.token_loss import NORMALISERS, weighted_token_loss

__all__ = ["weighted_token_loss", "NORMALISERS"]
