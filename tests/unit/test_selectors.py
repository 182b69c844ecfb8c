"""Selectors on hand-made batches: kept sets computed by hand, direction of every score, ratios, scope."""

import pytest
import torch

from tokensel.modules import FullSelection, RandomSelection, Rho1Selection, TokenStats, topk_mask


def _stats(loss, ref=None, valid=None):
    loss = torch.tensor(loss)
    valid = torch.ones_like(loss, dtype=torch.bool) if valid is None else torch.tensor(valid)
    return TokenStats(valid=valid, loss=loss, ref_loss=None if ref is None else torch.tensor(ref))


def test_rho1_keeps_top_excess_loss_batch_scope():
    # excess = loss - ref:
    #   row0: [2.0-0.5, 1.0-0.9, 3.0-3.0, 0.5-0.1] = [1.5, 0.1, 0.0, 0.4]
    #   row1: [1.0-2.0, 4.0-1.0, 0.2-0.1, 0.9-0.0] = [-1.0, 3.0, 0.1, 0.9]   (last token not valid)
    # valid tokens: 7; k=0.6 -> ceil(4.2) = 5 kept: 3.0, 1.5, 0.4, 0.1 (row0 col1), 0.1 (row1 col2)
    # tie at 0.1 both kept; dropped: 0.0 (row0 col2), -1.0 (row1 col0); (0.9 at row1 col3 is invalid)
    st = _stats([[2.0, 1.0, 3.0, 0.5], [1.0, 4.0, 0.2, 0.9]],
                ref=[[0.5, 0.9, 3.0, 0.1], [2.0, 1.0, 0.1, 0.0]],
                valid=[[True, True, True, True], [True, True, True, False]])
    w = Rho1Selection(k=0.6)(st)
    assert w.tolist() == [[1, 1, 0, 1], [0, 1, 1, 0]]


def test_rho1_sign_prefers_current_worse_than_reference():
    # the same losses, reference swapped: the token the reference finds easy (low ref loss) is kept
    st = _stats([[1.0, 1.0]], ref=[[0.1, 2.0]])
    assert Rho1Selection(k=0.5)(st).tolist() == [[1.0, 0.0]]


def test_rho1_sample_scope_ranks_within_rows():
    st = _stats([[5.0, 4.0, 1.0, 0.0], [0.3, 0.2, 0.1, 0.0]], ref=[[0.0] * 4, [0.0] * 4])
    assert Rho1Selection(k=0.5, scope="sample")(st).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    # batch scope: top 4 of [5, 4, 1, 0, .3, .2, .1, 0] = 5, 4, 1, .3
    assert Rho1Selection(k=0.5, scope="batch")(st).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_rho1_missing_reference_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs \\['ref_loss'\\]"):
        Rho1Selection()(_stats([[1.0]]))


@pytest.mark.parametrize("k", [0.0, 0.3, 0.6, 1.0])
def test_random_keeps_the_ratio_and_only_valid_tokens(k):
    valid = torch.rand(8, 50, generator=torch.Generator().manual_seed(1)) > 0.3
    st = TokenStats(valid=valid, loss=torch.zeros(8, 50), step=3)
    w = RandomSelection(k=k, seed=7)(st)
    n = int(valid.sum())
    assert int(w.sum()) == min(n, int(torch.tensor(k * n).ceil()))
    assert (w[~valid] == 0).all()
    assert torch.equal(w, RandomSelection(k=k, seed=7)(st))  # seeded: same step, same mask
    st.step = 4
    if 0 < k < 1:
        assert not torch.equal(w, RandomSelection(k=k, seed=7)(st))  # a new mask each step


def test_random_sample_scope_ratio_per_row():
    valid = torch.ones(3, 10, dtype=torch.bool)
    w = RandomSelection(k=0.3, scope="sample")(TokenStats(valid=valid, loss=torch.zeros(3, 10)))
    assert w.sum(1).tolist() == [3, 3, 3]


def test_full_keeps_exactly_the_valid_tokens():
    valid = torch.tensor([[False, True, True, False]])
    assert FullSelection()(TokenStats(valid=valid)).tolist() == [[0, 1, 1, 0]]


def test_topk_rejects_bad_ratio_and_scope():
    with pytest.raises(ValueError):
        topk_mask(torch.zeros(1, 2), torch.ones(1, 2), 1.5)
    with pytest.raises(ValueError, match="scope"):
        RandomSelection(scope="everything")


def test_a_selector_without_select_fails_at_construction():
    from tokensel.modules.base import TokenSelector

    class NoSelect(TokenSelector):
        pass

    with pytest.raises(TypeError, match="select"):
        NoSelect()
