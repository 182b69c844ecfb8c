"""ESLM / Ada-ESLM on hand-made batches: VaR kept sets by hand, high-risk direction, scope, the CVaR identity,
and the documented Ada-ESLM alpha rule."""

import pytest
import torch

from tokensel.losses import weighted_token_loss
from tokensel.modules import AdaEslmSelection, EslmSelection, TokenStats
from tokensel.modules.eslm import var_threshold


def _st(loss, valid=None, entropy=None, step=0):
    loss = torch.tensor(loss)
    valid = torch.ones_like(loss, dtype=torch.bool) if valid is None else torch.tensor(valid)
    return TokenStats(valid=valid, loss=loss, entropy=None if entropy is None else torch.tensor(entropy), step=step)


def test_eslm_keeps_high_loss_tokens_at_or_above_batch_var():
    # 8 losses sorted: .1 .2 .3 .5 | 1.0 2.0 3.0 4.0 ; alpha=.5 -> VaR = sorted[4] = 1.0 -> keep >= 1.0
    st = _st([[0.1, 2.0, 0.5, 3.0], [1.0, 0.2, 4.0, 0.3]])
    assert EslmSelection(alpha=0.5)(st).tolist() == [[0, 1, 0, 1], [1, 0, 1, 0]]
    # direction: the low-loss half is never kept
    assert EslmSelection(alpha=0.75)(st).tolist() == [[0, 0, 0, 1], [0, 0, 1, 0]]


def test_eslm_ties_at_threshold_are_all_kept_and_invalid_never():
    st = _st([[1.0, 1.0, 1.0, 0.0]], valid=[[True, True, True, True]])
    assert EslmSelection(alpha=0.5)(st).tolist() == [[1, 1, 1, 0]]  # VaR = sorted[2] = 1.0
    st = _st([[9.0, 1.0, 2.0, 3.0]], valid=[[False, True, True, True]])
    assert EslmSelection(alpha=0.5)(st).tolist() == [[0, 0, 1, 1]]  # 9.0 is not a labelled token


def test_eslm_batch_vs_sample_scope():
    st = _st([[0.1, 2.0, 0.5, 3.0], [0.01, 0.02, 0.03, 0.04]])
    # batch: sorted .01 .02 .03 .04 .1 .5 2 3 -> VaR = .1: all of row 0, none of row 1
    assert EslmSelection(alpha=0.5, scope="batch")(st).tolist() == [[1, 1, 1, 1], [0, 0, 0, 0]]
    # sample: row 0 VaR = 2.0, row 1 VaR = .03
    assert EslmSelection(alpha=0.5, scope="sample")(st).tolist() == [[0, 1, 0, 1], [0, 0, 1, 1]]


def test_eslm_entropy_score_keeps_uncertain_tokens():
    st = _st([[5.0, 0.1, 0.1, 5.0]], entropy=[[0.1, 3.0, 2.0, 0.2]])
    assert EslmSelection(alpha=0.5, score="entropy")(st).tolist() == [[0, 1, 1, 0]]


@pytest.mark.parametrize("alpha", [0.5, 0.75, 0.9])
def test_eslm_loss_is_cvar(alpha):
    # mean over kept = empirical CVaR_alpha = min_c c + E[(L - c)+] / (1 - alpha) (Rockafellar-Uryasev),
    # (1 - alpha) * n integer so the tail is exactly the kept set
    L = torch.rand(4, 10, generator=torch.Generator().manual_seed(0)) * 5
    valid = torch.ones_like(L, dtype=torch.bool)
    w = EslmSelection(alpha=alpha)(TokenStats(valid=valid, loss=L))
    assert int(w.sum()) == round((1 - alpha) * L.numel())
    trained, _ = weighted_token_loss(L, w, valid, "selected")
    flat = L.flatten().double()
    ru = min(float(c + torch.clamp(flat - c, min=0).mean() / (1 - alpha)) for c in flat)
    assert float(trained) == pytest.approx(ru, rel=1e-6)
    assert float(trained) == pytest.approx(float(flat.sort().values[-w.sum().int():].mean()), rel=1e-6)


def test_var_threshold_keeps_ceil_one_minus_alpha():
    s = torch.arange(10.0)
    for a in (0.0, 0.3, 0.55, 0.99):
        assert int((s >= var_threshold(s, a)).sum()) == 10 - int(a * 10 + 1e-9)  # = ceil((1 - a) * 10)


def test_ada_eslm_mass_rule_by_hand():
    # scores 4 3 2 1 (total 10), target .7: the top 2 carry 7 -> tail 2 of 4 -> alpha_hat = .5
    assert AdaEslmSelection.mass_alpha(torch.tensor([1.0, 4.0, 2.0, 3.0]), 0.7) == 0.5
    # concentrated risk -> high alpha (few tokens); uniform -> low alpha (many tokens)
    assert AdaEslmSelection.mass_alpha(torch.tensor([10.0, 0.1, 0.1, 0.1]), 0.8) == 0.75
    assert AdaEslmSelection.mass_alpha(torch.ones(4), 0.8) == 0.0
    sel = AdaEslmSelection(alpha=0.4, target_mass=0.7, beta=0.5, alpha_min=0.0, alpha_max=0.9)
    st = _st([[1.0, 4.0, 2.0, 3.0]], step=1)
    w = sel(st)
    assert float(sel.alpha_state) == pytest.approx(0.45)  # .5 * .4 + .5 * .5
    assert w.tolist() == [[0, 1, 1, 1]]  # VaR = sorted[floor(.45 * 4)] = sorted[1] = 2.0 -> keep 2, 3, 4
    sel(st)  # same step (gradient accumulation): no second update
    assert float(sel.alpha_state) == pytest.approx(0.45)
    st.step = 2
    sel(st)
    assert float(sel.alpha_state) == pytest.approx(0.475)
    clipped = AdaEslmSelection(alpha=0.4, target_mass=0.7, beta=0.0, alpha_min=0.6, alpha_max=0.9)
    clipped(_st([[1.0, 4.0, 2.0, 3.0]], step=1))
    assert float(clipped.alpha_state) == pytest.approx(0.6)
    assert "alpha_state" in sel.state_dict()  # checkpointed, so a resumed run continues the schedule


def test_sample_scope_quantile_per_original_sample_in_packed_rows():
    # one packed row: sample 4 (losses 1 2 3 4) and sample 5 (10 20 30 40); alpha .5 per sample keeps
    # each sample's upper half, not the row's (which would be all of sample 5)
    valid = torch.tensor([[False, True, True, True, True, True, True, True, True]])
    ids = torch.tensor([[4, 4, 4, 4, 4, 5, 5, 5, 5]])
    loss = torch.tensor([[0.0, 1, 2, 3, 4, 10, 20, 30, 40]])
    st = TokenStats(valid=valid, loss=loss, sample_ids=ids)
    assert EslmSelection(alpha=0.5, scope="sample")(st).tolist() == [[0, 0, 0, 1, 1, 0, 0, 1, 1]]
    unpacked = TokenStats(valid=valid, loss=loss)  # no sample ids: the row is one group
    assert EslmSelection(alpha=0.5, scope="sample")(unpacked).tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]]
