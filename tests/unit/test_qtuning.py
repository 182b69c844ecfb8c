"""Q-Tuning on a hand-made batch: quadrant assignment (direction of both axes), which samples survive the
triage, the neighbour-smoothed token pruning inside Q2 and Q4 kept whole under the paper-text rule
(`rule="paper"`), scope; and, on a tiny model, that dropped samples never reach the trained forward.
The released-code rule (the default) is pinned in test_qtuning_official.py."""

import math

import pytest
import torch

from tokensel.modules import QTuningSelection, TokenStats
from tokensel.modules.qtuning import Q1, Q2, Q3, Q4, neighbour_score, quadrants

# 8 samples x 5 positions (position 0 unlabelled). Sample PPL / mean entropy:
#   s0: PPL (10*40*20*80)^(1/4) = 28.3 (max), Ent 0.1 (min)     -> high error, low uncertainty  = Q2
#   s1: PPL 20 (2nd), Ent 3.0 (2nd)                             -> high error, high uncertainty = Q1
#   s2: PPL 1.1 (min), Ent 4.0 (max)                            -> low error, high uncertainty  = Q4
#   s3: PPL 1.2 (2nd lowest), Ent 0.2 (2nd lowest)              -> low error, low uncertainty   = Q3
#   s4-s7: PPL 5..8, Ent 1.0..2.5: the middle bands, no quadrant
TOKEN_PPL = [[10, 40, 20, 80], [20] * 4, [1.1] * 4, [1.2] * 4, [5] * 4, [6] * 4, [7] * 4, [8] * 4]
ENT = [0.1, 3.0, 4.0, 0.2, 1.0, 1.5, 2.0, 2.5]


def _batch():
    loss = torch.zeros(8, 5)
    loss[:, 1:] = torch.log(torch.tensor(TOKEN_PPL, dtype=torch.float32))
    ent = torch.zeros(8, 5)
    ent[:, 1:] = torch.tensor(ENT)[:, None]
    valid = torch.ones(8, 5, dtype=torch.bool)
    valid[:, 0] = False
    return TokenStats(valid=valid, score_loss=loss, score_entropy=ent)


def test_quadrant_directions_by_hand():
    st = _batch()
    ppl, ent, has = QTuningSelection.sample_stats(st)
    assert ppl[0] == pytest.approx((10 * 40 * 20 * 80) ** 0.25, rel=1e-5) and has.all()
    # alpha = beta = .2: quantile positions 1.4 / 5.6 of 7 -> the top two and bottom two on each axis
    q = quadrants(ppl, ent, 0.2, 0.2)
    assert q.tolist() == [Q2, Q1, Q4, Q3, 0, 0, 0, 0]


def test_triage_drops_q1_q3_keeps_q4_whole_and_prunes_q2():
    sel = QTuningSelection(sample_ratio=0.25, token_ratio=0.5, lam=0.5, rule="paper")
    tri = sel.triage(_batch())
    assert tri.keep_samples.tolist() == [True, False, True, False, False, False, False, False]
    # Q2 (s0) token PPL 10 40 20 80; s_i = .5 PPL_i + .5 (PPL_{i-1} + PPL_{i+1}), missing neighbour = own PPL:
    #   30, 35, 70, 90 -> keep the lowest floor(.5 * 4) = 2 -> the first two answer tokens
    assert tri.token_weights[0].tolist() == [0, 1, 1, 0, 0]
    assert tri.token_weights[2].tolist() == [0, 1, 1, 1, 1]  # Q4: every answer token
    assert tri.token_weights[[1, 3, 4, 5, 6, 7]].sum() == 0  # dropped samples: nothing
    s = neighbour_score(torch.tensor([[0.0, 10, 40, 20, 80]]), _batch().valid[:1], rule="paper")
    assert s[0, 1:].tolist() == [30, 35, 70, 90]


def test_lambda_zero_ranks_by_own_ppl_and_reversed_neighbour_effect():
    st = _batch()
    st.score_loss[0, 1:] = torch.log(torch.tensor([10.0, 80, 20, 40]))
    tri = QTuningSelection(sample_ratio=0.25, token_ratio=0.5, lam=0.0, rule="paper").triage(st)
    assert tri.token_weights[0].tolist() == [0, 1, 0, 1, 0]  # own PPL 10 and 20 are the lowest


def test_top_up_when_quadrants_are_short():
    # sample_ratio .75 of 8 = 6; bisection alone reaches r >= .75 only if the quadrants cover 6 samples;
    # whatever it gives, the budget is met (top-up by |PPL^ - Ent^|; the exact order is pinned in
    # test_qtuning_official.py), under both rules
    for rule in ("code", "paper"):
        tri = QTuningSelection(sample_ratio=0.75, token_ratio=0.5, rule=rule).triage(_batch())
        assert int(tri.keep_samples.sum()) >= 6


def test_sample_scope_and_unknown_rule_are_rejected():
    with pytest.raises(ValueError, match="sample"):
        QTuningSelection(scope="sample")
    with pytest.raises(ValueError, match="rule"):
        QTuningSelection(rule="both")


def test_dropped_samples_are_absent_from_the_trained_forward():
    from tokensel.trainer.lm import SelectiveLM

    cfg = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
    m = SelectiveLM(model_config=cfg, selector=QTuningSelection(sample_ratio=0.25, token_ratio=0.5))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (8, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    seen = []
    emb = m.model.get_input_embeddings()
    h = emb.register_forward_hook(lambda mod, inp, out: seen.append((torch.is_grad_enabled(), inp[0].shape[0])))
    out = m.selective_step(batch)
    h.remove()
    kept = int(m.selector._keep.sum())  # bisection may overshoot the budget (no trimming), never undershoot
    assert math.ceil(0.25 * 8) <= kept < 8
    assert seen[0] == (False, 8)                   # the no-grad scoring pass sees the whole batch
    assert [s for s in seen if s[0]] == [(True, kept)]  # the trained forward sees only the kept samples
    assert out["forward_tokens"] == kept * 12
    assert out["samples_kept"] == kept / 8
    out["loss"].backward()
