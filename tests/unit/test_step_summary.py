"""The step summary line reads the keep ratio of LM selectors and of the ViT dispatchers / gates."""

from types import SimpleNamespace

import torch

from tokensel.trainer.guard import _step_info


def test_step_info_reads_lm_and_vit_keep_keys():
    module = SimpleNamespace()
    lm = SimpleNamespace(callback_metrics={"train/loss": torch.tensor(1.5), "train/keep_ratio": torch.tensor(0.6)})
    vit = SimpleNamespace(callback_metrics={"train/loss": torch.tensor(0.7), "train/keep_rate": torch.tensor(0.25)})
    assert _step_info(lm, module) == (1.5, 0.6000000238418579)
    assert _step_info(vit, module) == (0.699999988079071, 0.25)
    assert _step_info(SimpleNamespace(callback_metrics={}), module) == (None, None)
