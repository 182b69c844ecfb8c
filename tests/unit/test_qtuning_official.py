"""Q-Tuning under `rule="code"` (the default): the rules of the authors' released code (Q-tuning/Q-tuning @ dd6eba5,
LLaMA-Factory/src/llamafactory/train/sft/trainer.py, the "wisely" plugin), pinned by hand-computed values:
strict quadrant inequalities, the bisection's stop / return rule, the top-up pool, K and its order, pruning of
"Q2-like" top-ups, the batch-level token budget (prompt tokens and dropped samples count), Eq. 7 neighbours
(prompt 1, padding 0), the packing refusal, random tie-breaks, the exact sample budget whenever it is
attainable, and `scope: global` over two processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tokensel.modules import QTuningSelection, TokenStats
from tokensel.modules.qtuning import Q1, Q2, Q3, Q4, bisect_quadrants, neighbour_score, quadrants


def _stats(token_ppl, ent, prompt=None, T=None, step=0):
    """Rows of answer-token PPLs (one list per sample) with a constant answer entropy per sample.
    `prompt[b]` prompt positions (0..prompt[b]-1) come first, then the answer, then padding up to T;
    `sample_ids` marks non-pad positions (-1 on padding), as the data module does. Default: 1 prompt position."""
    B = len(token_ppl)
    prompt = prompt or [1] * B
    T = T or max(p + len(r) for p, r in zip(prompt, token_ppl))
    loss, ent_t = torch.zeros(B, T), torch.zeros(B, T)
    valid = torch.zeros(B, T, dtype=torch.bool)
    ids = torch.full((B, T), -1)
    for b, (p, row) in enumerate(zip(prompt, token_ppl)):
        n = len(row)
        loss[b, p: p + n] = torch.log(torch.tensor(row, dtype=torch.float32))
        ent_t[b, p: p + n] = ent[b]
        valid[b, p: p + n] = True
        ids[b, : p + n] = b
    return TokenStats(valid=valid, score_loss=loss, score_entropy=ent_t, sample_ids=ids, step=step)


# 8 samples, 4 answer tokens each. Sample PPL / entropy (as in test_qtuning.py):
#   s0 PPL (10*40*20*80)^(1/4) = 28.3 (max), Ent 0.1 (min); s1 20 / 3.0; s2 1.1 (min) / 4.0 (max); s3 1.2 / 0.2;
#   s4-s7 PPL 5..8, Ent 1.0..2.5.
PPL8 = [[10, 40, 20, 80], [20] * 4, [1.1] * 4, [1.2] * 4, [5] * 4, [6] * 4, [7] * 4, [8] * 4]
ENT8 = [0.1, 3.0, 4.0, 0.2, 1.0, 1.5, 2.0, 2.5]

# 9 samples whose quadrant set stays {s0 (Q2), s1 (Q4)} at every alpha = beta in (0, 0.49] (PPL and Ent are
# positively correlated elsewhere), with s8 at the median PPL (90: high after min-max) and a low Ent, and s7 at
# the median Ent. s0's tokens 50 200 100 100 (geo-mean 100), s8's 30 270 90 90 (geo-mean 90).
PPL9 = [[50, 200, 100, 100], [1] * 4, [98] * 4, [2] * 4, [96] * 4, [3] * 4, [95] * 4, [4] * 4, [30, 270, 90, 90]]
ENT9 = [0.0, 10.0, 9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 0.5]


def test_code_quadrants_use_strict_upper_inequalities():
    # N = 5, alpha = beta = .25: the quantile positions 1 and 3 fall exactly on samples, so Q_.75(PPL) = 4,
    # Q_.25(PPL) = 2, Q_.75(Ent) = 4, Q_.25(Ent) = 2.
    ppl, ent = torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([5.0, 4, 3, 2, 1])
    # code: Q2 = PPL > 4 & Ent <= 2 -> s4 only; Q4 = PPL <= 2 & Ent > 4 -> s0 only
    assert quadrants(ppl, ent, 0.25, 0.25).tolist() == [Q4, 0, 0, 0, Q2]
    # paper: >= on the upper thresholds takes s3 into Q2 and s1 into Q4
    assert quadrants(ppl, ent, 0.25, 0.25, rule="paper").tolist() == [Q4, Q4, 0, Q2, Q2]


def test_code_bisection_stops_within_tolerance_and_returns_the_last_evaluated_split():
    st = _stats(PPL8, ENT8)
    ppl, ent, _ = QTuningSelection.sample_stats(st)
    # first evaluation alpha = beta = .245: positions 1.715 / 5.285 of 7 -> PPL lo {s2,s3}, hi {s0,s1};
    # Ent lo {s0,s3}, hi {s1,s2}: Q2 {s0}, Q4 {s2}, r = 2/8 = .25 = target -> stop there
    q, a, b = bisect_quadrants(ppl, ent, 0.25, 10)
    assert (a, b) == (0.245, 0.245)
    assert q.tolist() == [Q2, Q1, Q4, Q3, 0, 0, 0, 0]
    _, a_paper, _ = bisect_quadrants(ppl, ent, 0.25, 10, rule="paper")  # the paper rule keeps tightening
    assert a_paper < 0.245
    # never within tolerance (|Q2 u Q4| = 2 of 9 at every alpha, target 1.0): relax 10 times; the code returns
    # the 10th evaluated alpha = .49 - .49 / 2^10, the paper rule the unevaluated midpoint .49 - .49 / 2^11
    ppl9, ent9, _ = QTuningSelection.sample_stats(_stats(PPL9, ENT9))
    q, a, _ = bisect_quadrants(ppl9, ent9, 1.0, 10)
    assert a == pytest.approx(0.49 - 0.49 / 2 ** 10, abs=1e-12)
    assert q.tolist() == quadrants(ppl9, ent9, a, a).tolist()
    _, a_paper, _ = bisect_quadrants(ppl9, ent9, 1.0, 10, rule="paper")
    assert a_paper == pytest.approx(0.49 - 0.49 / 2 ** 11, abs=1e-12)


def test_code_top_up_pool_order_k_and_q2_like_pruning():
    st = _stats(PPL9, ENT9)
    ppl, ent, _ = QTuningSelection.sample_stats(st)
    sel = QTuningSelection(sample_ratio=0.5, token_ratio=0.7)
    # K = max(1, round(9 * .5)) = round(4.5) = 4 (Python rounds half to even, as the code does); the paper's ceil: 5
    assert sel.target_samples(9) == 4 and QTuningSelection(sample_ratio=0.5, rule="paper").target_samples(9) == 5
    q, keep, prune = sel.assign(ppl, ent)
    # Q2 u Q4 = {s0, s1} (r = 2/9 < .5 at every alpha: no stop); 2 more from ALL remaining samples by
    # |PPL^ - Ent^| (PPL^ = (p - 1) / 99, Ent^ = e / 10): s8 .849, s7 .270, s6 .250, s5 .180, s4 .160, s3 .090, s2 .080
    # -> s8 (unassigned) and s7 (unassigned), not the Q1 / Q3 samples s6 / s5 the paper's pool puts first
    assert keep.nonzero().squeeze(1).tolist() == [0, 1, 7, 8]
    assert q[[0, 1]].tolist() == [Q2, Q4] and q[[2, 4, 6]].tolist() == [Q1] * 3 and q[[3, 5]].tolist() == [Q3] * 2
    # "Q2-like" top-ups (PPL^ - Ent^ >= Ent^ - PPL^) are pruned with Q2: s8 (.899 vs .05) yes, s7 (.03 vs .3) no
    assert prune.nonzero().squeeze(1).tolist() == [0, 8]
    _, keep_p, _ = QTuningSelection(sample_ratio=0.5, rule="paper").assign(ppl, ent)
    assert keep_p.nonzero().squeeze(1).tolist() == [0, 1, 4, 5, 6]  # paper: Q1 u Q3 first, ceil -> 5
    # token budget: 9 rows x 4 answer tokens, no prompt beyond column 0 -> N = 36; keep round(36 * .5 * .7) =
    # round(12.6) = 13; the dropped rows hold 20, so 36 - 13 - 20 = 3 more go, by one flat ranking of
    # s_i = .5 PPL_i + .5 (PPL_{i-1} + PPL_{i+1}) over s0 and s8 (column 0 and past the row count 0):
    #   s0: 125 175 200 100     s8: 150 195 225 90  -> drop 225 (s8), 200 (s0), 195 (s8)
    tri = sel.triage(st)
    w = tri.token_weights
    assert w[0].tolist() == [0, 1, 1, 0, 1]
    assert w[8].tolist() == [0, 1, 0, 0, 1]   # the Q2-like top-up loses two, a per-sample rule would take one each
    assert w[1].tolist() == w[7].tolist() == [0, 1, 1, 1, 1]  # Q4 and the Q4-like top-up train whole
    assert w[[2, 3, 4, 5, 6]].sum() == 0
    assert tri.info["pruned"].nonzero().squeeze(1).tolist() == [0, 8]


def test_code_batch_token_budget_counts_prompt_tokens_and_dropped_samples():
    # the 8-sample set (kept: s0 Q2, s2 Q4 at alpha = .245) with prompts of 3 5 2 2 4 3 2 6 positions, then
    # 4 answer tokens, then padding (T = 10). Non-pad positions t >= 1 per row: 6 8 5 5 7 6 5 9 -> N = 51.
    prompt = [3, 5, 2, 2, 4, 3, 2, 6]
    st = _stats(PPL8, ENT8, prompt=prompt)
    tri = QTuningSelection(sample_ratio=0.25, token_ratio=0.8).triage(st)
    assert tri.keep_samples.nonzero().squeeze(1).tolist() == [0, 2]
    # keep round(51 * .25 * .8) = 10 tokens; drop 41, the dropped rows already remove 51 - 6 - 5 = 40 -> 1 more
    # (counting answer tokens only would give 32 - 6 - 24 = 2). s0 answer at t = 3..6 (PPL 10 40 20 80), t = 2 is
    # prompt (neighbour 1), t = 7 padding (0): s = 25.5 35 70 50 -> drop t = 5.
    w = tri.token_weights
    assert w[0].tolist() == [0, 0, 0, 1, 1, 0, 1, 0, 0, 0]
    assert w[2].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]  # Q4 whole
    assert w.sum() == 7 and w[[1, 3, 4, 5, 6, 7]].sum() == 0
    # the kept rows now hold 6 + 5 - 1 = 10 = round(N r_s r_t) non-pad positions
    # paper rule on the same batch: s0 keeps its lowest floor(.8 * 4) = 3 of s = 30 35 70 90 -> drops t = 6
    w_p = QTuningSelection(sample_ratio=0.25, token_ratio=0.8, rule="paper").triage(st).token_weights
    assert w_p[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    # token_ratio 1: nothing is pruned (the code's guard), whatever the budget says
    w1 = QTuningSelection(sample_ratio=0.25, token_ratio=1.0).triage(st).token_weights
    assert w1[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]


def test_code_neighbours_prompt_counts_one_padding_and_row_end_zero():
    # row: [prompt, prompt, a1 = 10, a2 = 40, pad]
    ppl = torch.tensor([[0.0, 0, 10, 40, 0]])
    valid = torch.tensor([[False, False, True, True, False]])
    context = torch.tensor([[False, True, True, True, False]])  # non-pad positions t >= 1
    s = neighbour_score(ppl, valid, 0.5, context=context)
    assert s[0, 2:4].tolist() == [0.5 * 10 + 0.5 * (1 + 40), 0.5 * 40 + 0.5 * (10 + 0)]  # 25.5, 25
    s = neighbour_score(ppl, valid, 0.5)  # no context known: the prompt counts as padding
    assert s[0, 2:4].tolist() == [0.5 * 10 + 0.5 * 40, 25.0]
    s = neighbour_score(ppl, valid, 0.5, rule="paper")  # paper reading: the token's own PPL
    assert s[0, 2:4].tolist() == [0.5 * 10 + 0.5 * (10 + 40), 0.5 * 40 + 0.5 * (10 + 40)]  # 30, 45
    # the last column of a full row has no right neighbour: 0
    s = neighbour_score(torch.tensor([[0.0, 4, 6]]), torch.tensor([[False, True, True]]), 0.5,
                        context=torch.tensor([[False, True, True]]))
    assert s[0, 1:].tolist() == [2 + 3, 3 + 2]


def test_packed_batch_is_refused():
    st = _stats(PPL8, ENT8)
    st.sample_ids[0, 3:] = 100  # row 0 now holds two samples
    for rule in ("code", "paper"):
        with pytest.raises(ValueError, match="packing: false"):
            QTuningSelection(rule=rule).triage(st)


def test_entropy_span_mask_from_the_spine_is_used():
    # the code averages the entropy over every non-pad position t >= 1; if the spine fills prompt positions it
    # says so with extras["score_entropy_mask"]
    st = _stats([[2.0, 2.0]], [1.0], prompt=[3])
    st.score_entropy[0, 1:3] = 4.0
    assert QTuningSelection.sample_stats(st)[1].tolist() == [1.0]
    st.extras["score_entropy_mask"] = st.sample_ids >= 0
    st.extras["score_entropy_mask"][:, 0] = False
    sel = QTuningSelection()
    tri = sel.triage(st)
    assert tri.info["entropy"].tolist() == [pytest.approx((4 + 4 + 1 + 1) / 4)]
    assert QTuningSelection(rule="paper").triage(st).info["entropy"].tolist() == [1.0]  # Eq. 5: answer only


def test_ties_break_at_random_not_by_position():
    # s0 (Q2, tokens PPL 100 x 4: s = 100 150 150 100) and s1 (Q4) are the quadrants; s2-s7 tie exactly on
    # |PPL^ - Ent^|, so the top-up (K = 4) picks 2 of 6 tied samples. Token budget: N = 32, keep
    # round(32 * .5 * .94) = 15, the dropped rows remove 16 -> 1 more: one of s0's two tied 150s (t = 2 or 3).
    ppl = [[100] * 4, [1] * 4] + [[5] * 4] * 6
    ent = [0.0, 10.0] + [3.0] * 6
    picks, dropped = set(), set()
    for step in range(12):
        tri = QTuningSelection(sample_ratio=0.5, token_ratio=0.94).triage(_stats(ppl, ent, step=step))
        again = QTuningSelection(sample_ratio=0.5, token_ratio=0.94).triage(_stats(ppl, ent, step=step))
        assert torch.equal(tri.keep_samples, again.keep_samples)  # seeded: the same step draws the same
        assert torch.equal(tri.token_weights, again.token_weights)
        keep = tri.keep_samples.nonzero().squeeze(1).tolist()
        assert keep[:2] == [0, 1] and len(keep) == 4
        picks.add(tuple(keep))
        gone = (tri.token_weights[0, 1:] == 0).nonzero().squeeze(1).add(1).tolist()
        assert gone in ([2], [3])
        dropped.add(gone[0])
    assert len(picks) > 2  # not always the lowest indices (position order picked (0, 1, 2, 3) every time)
    assert dropped == {2, 3}


def _counts(ppl, ent):
    """|Q2 u Q4| on each plateau of alpha = beta in (0, 0.49] (the count changes only at alpha = j / (n - 1))."""
    n, out = ppl.numel(), []
    for j in range(n):
        lo, hi = j / (n - 1), min((j + 1) / (n - 1), 0.49)
        if lo >= 0.49:
            break
        q = quadrants(ppl, ent, (lo + hi) / 2, (lo + hi) / 2)
        out.append(int(((q == Q2) | (q == Q4)).sum()))
    return out


@pytest.mark.parametrize("B", [8, 16, 32])
@pytest.mark.parametrize("r", [0.125, 0.25, 0.5])
def test_code_sample_budget_is_met_exactly_whenever_attainable(B, r):
    # random PPL / entropy draws (no ties). |Q2 u Q4| grows monotonically with alpha = beta, so when some
    # alpha gives exactly K the code's bisection stops there (|r - target| < .01 means exactly K for B < 100):
    # the quadrant set itself is the budget, no top-up. When no alpha reaches K the top-up fills exactly K.
    # Only when the count jumps over K may it overshoot (never undershoot). The paper rule's unevaluated final
    # midpoint often falls below the plateau and tops up from Q1 u Q3 instead.
    g = torch.Generator().manual_seed(1000 * B + int(r * 1000))
    sel = QTuningSelection(sample_ratio=r)
    k = max(1, round(B * r))
    exact = 0
    for _ in range(40):
        ppl = torch.rand(B, generator=g, dtype=torch.float64) * 10 + 1
        ent = torch.rand(B, generator=g, dtype=torch.float64)
        counts = _counts(ppl, ent)
        q, keep, _ = sel.assign(ppl, ent)
        if k in counts:
            exact += 1
            assert int(((q == Q2) | (q == Q4)).sum()) == k and int(keep.sum()) == k
        elif max(counts) < k:
            assert int(keep.sum()) == k
        else:
            assert int(keep.sum()) >= k
    assert exact >= 10


GLOBAL_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from tokensel.modules import QTuningSelection, TokenStats

    def stats(rows, rank=0):
        g = torch.Generator().manual_seed(9)
        B, T = 10, 8
        loss = torch.rand(B, T, generator=g) * 3
        ent = torch.rand(B, T, generator=g) * 2
        valid = torch.zeros(B, T, dtype=torch.bool)
        valid[:, 2:] = True  # position 1 is prompt
        ids = torch.arange(B)[:, None].expand(B, T).clone()
        ids[::2, 7] = -1  # even rows end one position early (padding)
        valid &= ids >= 0
        return TokenStats(valid=valid[rows], score_loss=(loss * valid)[rows], score_entropy=(ent * valid)[rows],
                          sample_ids=ids[rows], step=3, rank=rank)

    def sel():
        return QTuningSelection(sample_ratio=0.4, token_ratio=0.8, scope="global")

    def dump(tri, st):
        nonpad = st.sample_ids >= 0
        nonpad[:, 0] = False
        pruned = (st.valid & tri.keep_samples[:, None]).float() - tri.token_weights
        return {"keep": tri.keep_samples.tolist(), "w": tri.token_weights.tolist(),
                "pruned": pruned.sum(1).tolist(), "nonpad": (nonpad.sum(1) * tri.keep_samples).tolist()}

    def run(rank, port, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        st = stats(slice(0, 5) if rank == 0 else slice(5, 10), rank)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(dump(sel().triage(st), st), f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        port, out = int(sys.argv[1]), sys.argv[2]
        mp.spawn(run, args=(port, out), nprocs=2)
        st = stats(slice(0, 10))
        parts = [json.load(open(f"{out}.{r}")) for r in (0, 1)]
        print(json.dumps({"one": dump(sel().triage(st), st),
                          "two": {k: parts[0][k] + parts[1][k] for k in parts[0]}}))
""")


@pytest.mark.distributed
def test_global_scope_two_processes_equal_one_process_holding_both(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "qt_global.py"
    script.write_text(GLOBAL_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(port), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=240, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["two"] == res["one"]  # same samples kept, same tokens pruned (budget and ranking over both ranks)
    one = res["one"]
    kept = [i for i, k in enumerate(one["keep"]) if k]
    assert len(kept) >= 4 and min(kept) < 5 <= max(kept)  # K = round(10 * .4) = 4, kept on both ranks
    pruned_rows = [i for i, n in enumerate(one["pruned"]) if n > 0]
    assert min(pruned_rows) < 5 <= max(pruned_rows)  # one flat token ranking over both ranks' pruned samples
    # non-pad positions t >= 1: 5 rows x 6 + 5 rows x 7 = 65; the kept rows end at round(65 * .4 * .8) = 21
    assert sum(one["nonpad"]) - sum(one["pruned"]) == 21
