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


def _random_mask(seed=0, step=0, micro=0, rank=0, scope="batch"):
    valid = torch.ones(4, 32, dtype=torch.bool)
    return RandomSelection(k=0.5, seed=seed, scope=scope)(
        TokenStats(valid=valid, step=step, micro=micro, rank=rank))


def test_random_streams_are_independent_per_rank_micro_batch_and_seed():
    base = _random_mask()
    assert torch.equal(base, _random_mask())                      # deterministic (a resume draws the same)
    for other in (_random_mask(rank=1), _random_mask(micro=1), _random_mask(step=1)):
        assert not torch.equal(base, other)
    # seed s at step t is not seed s + 1 at step t - 1 (the old `seed + step` stream was a shifted copy)
    assert not torch.equal(_random_mask(seed=0, step=1), _random_mask(seed=1, step=0))
    # overlap of two independent 50% masks is ~25% of the tokens, far from a copy (100%)
    overlap = float((base * _random_mask(rank=1)).sum() / base.numel())
    assert 0.15 < overlap < 0.35
    # global scope: every rank draws the same stream (one ranking over the global batch)
    assert torch.equal(_random_mask(rank=0, scope="global"), _random_mask(rank=1, scope="global"))


def test_topk_ties_break_at_random_not_by_position():
    # every excess loss equal (e.g. a reference equal to the model): the kept half must not be the first
    # half of the batch, and must change with the step (seeded, so each step is reproducible)
    valid = torch.ones(2, 10, dtype=torch.bool)
    zeros = torch.zeros(2, 10)
    masks = [Rho1Selection(k=0.5)(TokenStats(valid=valid, loss=zeros, ref_loss=zeros, step=s)) for s in range(4)]
    first_half = torch.zeros(2, 10)
    first_half[0] = 1
    assert all(m.sum() == 10 for m in masks)
    assert not any(torch.equal(m, first_half) for m in masks)
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 4
    again = Rho1Selection(k=0.5)(TokenStats(valid=valid, loss=zeros, ref_loss=zeros, step=2))
    assert torch.equal(again, masks[2])


def test_sample_scope_ranks_per_original_sample_in_packed_rows():
    # one packed row holding sample 7 (positions 1-4) and sample 9 (positions 6-9): sample scope keeps
    # ceil(.5 * 4) = 2 of each, even though sample 9's scores are all higher
    valid = torch.tensor([[False, True, True, True, True, False, True, True, True, True]])
    ids = torch.tensor([[7, 7, 7, 7, 7, 9, 9, 9, 9, 9]])
    loss = torch.tensor([[0.0, 1, 2, 3, 4, 0, 10, 11, 12, 13]])
    st = TokenStats(valid=valid, loss=loss, ref_loss=torch.zeros_like(loss), sample_ids=ids)
    assert Rho1Selection(k=0.5, scope="sample")(st).tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 1, 1]]
    assert Rho1Selection(k=0.5, scope="batch")(st).tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]]


def test_static_rho1_ranks_by_cached_base_minus_reference_loss():
    # the live loss must not matter: only base - ref (2.0, -1.0, 0.5, 3.0) -> top 2 = tokens 3, 0
    from tokensel.modules import StaticRho1Selection

    st = TokenStats(valid=torch.ones(1, 4, dtype=torch.bool), loss=torch.tensor([[9.0, 9.0, 0.0, 0.0]]),
                    base_loss=torch.tensor([[3.0, 1.0, 2.0, 4.0]]), ref_loss=torch.tensor([[1.0, 2.0, 1.5, 1.0]]))
    assert StaticRho1Selection(k=0.5)(st).tolist() == [[1, 0, 0, 1]]
    assert StaticRho1Selection.needs == {"base_loss", "ref_loss"}
