"""ssToken on hand-made batches (REL polarity, min-max, attention score, gamma, warm-up, keep ratio, scope);
the single-layer recomputed attention equals that layer's eager attention while the model keeps SDPA; the
EMA history and the ESLM-KD distillation loss on a tiny model."""

import pytest
import torch

from tokensel.modules import SsTokenSelection, TokenStats
from tokensel.modules.attention_probe import AttentionProbe, prompt_positions
from tokensel.modules.sstoken import minmax_per_sample

TINY = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}


def _stats(step=50, total_steps=100):
    # row 0: 1 prompt token, 4 response tokens; row 1: 2 prompt tokens, 3 response tokens
    valid = torch.tensor([[False, True, True, True, True], [False, False, True, True, True]])
    his = torch.tensor([[0.0, 2, 2, 2, 2], [0, 0, 1, 1, 1]])
    loss = torch.tensor([[0.0, 1, 2, 3, 0.5], [0, 0, 1, 1, 1]])
    attn = torch.tensor([[0.0, 0.1, 0.0, 0.8, 0.2], [0, 0, 0.3, 0.1, 0.5]])
    return TokenStats(valid=valid, loss=loss, his_loss=his, attn_prompt=attn, step=step, total_steps=total_steps)


def test_rel_minmax_by_hand():
    st = _stats()
    # row 0 REL = his - loss = 1, 0, -1, 1.5 -> min-max: .8, .4, 0, 1 ; row 1 REL = 0 0 0 -> 0
    n = minmax_per_sample(SsTokenSelection().rel(st), st.valid)
    assert n[0, 1:].tolist() == pytest.approx([0.8, 0.4, 0.0, 1.0], abs=1e-6)
    assert n[1].tolist() == [0, 0, 0, 0, 0]


def test_sstoken_keeps_top_rho_per_sample_by_hand():
    # score = .5 N(REL) + .5 attn: row 0 = .45 .20 .40 .60 -> ceil(.6*4)=3 kept: .60 .45 .40
    #                              row 1 = .15 .05 .25     -> ceil(.6*3)=2 kept: .25 .15
    w = SsTokenSelection(rho=0.6, gamma=0.5)(_stats())
    assert w.tolist() == [[0, 1, 0, 1, 1], [0, 0, 1, 0, 1]]


def test_sstoken_batch_scope():
    # 7 valid -> ceil(4.2)=5 over .45 .20 .40 .60 | .15 .05 .25: all of row 0 and row 1's .25
    w = SsTokenSelection(rho=0.6, gamma=0.5, scope="batch")(_stats())
    assert w.tolist() == [[0, 1, 1, 1, 1], [0, 0, 0, 0, 1]]


def test_sstoken_rel_polarity_keeps_improved_tokens():
    # same current loss; the history was worse on token 1 (improved) and better on token 2 (got worse)
    st = TokenStats(valid=torch.tensor([[False, True, True]]), loss=torch.tensor([[0.0, 1, 1]]),
                    his_loss=torch.tensor([[0.0, 3, 0.5]]), attn_prompt=torch.zeros(1, 3))
    assert SsTokenSelection(rho=0.5, gamma=1.0, warmup_fraction=0.0)(st).tolist() == [[0, 1, 0]]
    # gamma = 1 (REL only) on the hand batch: row 0 N(REL) = .8 .4 0 1 -> top 2 = tokens 4, 1
    assert SsTokenSelection(rho=0.5, gamma=1.0)(_stats())[0].tolist() == [0, 1, 0, 0, 1]


def test_sstoken_attention_only_warmup_and_needs():
    # during warm-up gamma = 0: row 0 attn .1 0 .8 .2 -> top 3 = tokens 3, 4, 1
    sel = SsTokenSelection(rho=0.6, gamma=0.5, warmup_steps=10)
    assert sel(_stats(step=0))[0].tolist() == [0, 1, 0, 1, 1]
    assert sel(_stats(step=10))[0].tolist() == [0, 1, 0, 1, 1]  # after: the combined score (same set here)
    assert "attn_prompt" not in SsTokenSelection(gamma=1.0, warmup_fraction=0.0).needs  # REL only: no probe
    assert "attn_prompt" in SsTokenSelection(gamma=1.0).needs  # ... unless the (default) warm-up needs it
    assert "his_loss" not in SsTokenSelection(gamma=0.0).needs


def test_warmup_on_and_off_give_different_masks():
    # row 0 at rho .5 (2 of 4): attention alone (.1 0 .8 .2) keeps tokens 3, 4; the combined score
    # (.45 .20 .40 .60) keeps tokens 4, 1. Default warm-up = the first 20% of a 100-step run.
    on, off = SsTokenSelection(rho=0.5), SsTokenSelection(rho=0.5, warmup_fraction=0.0)
    assert on(_stats(step=0))[0].tolist() == [0, 0, 0, 1, 1]
    assert on(_stats(step=19))[0].tolist() == [0, 0, 0, 1, 1]
    assert on(_stats(step=20))[0].tolist() == [0, 1, 0, 0, 1]
    assert off(_stats(step=0))[0].tolist() == [0, 1, 0, 0, 1]
    assert on.warmup_length(1000) == 200 and SsTokenSelection(warmup_steps=7).warmup_length(1000) == 7
    with pytest.raises(ValueError, match="run length"):
        on(_stats(step=0, total_steps=0))


def _tiny_llama(impl):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY)
    kind = cfg.pop("model_type")
    config = AutoConfig.for_model(kind, **cfg)
    config._attn_implementation = impl
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("layer", [-1, 0])
def test_recomputed_attention_equals_eager_attention(layer):
    sdpa, eager = _tiny_llama("sdpa"), _tiny_llama("eager")
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0                                    # right padding in row 1
    labels = ids.clone()
    labels[0, :4] = -100                               # prompt of row 0: 4 tokens
    labels[1, :3] = -100                               # prompt of row 1: 3 tokens
    labels[1, 8:] = -100                               # padding
    with torch.no_grad(), AttentionProbe(sdpa, layer) as probe:
        sdpa(input_ids=ids, attention_mask=mask)
        got = probe.attention()
        rows = probe.prompt_mass_rows(labels, mask)
        aligned = probe.prompt_mass(labels, mask)
        shifted = probe.prompt_mass(labels, mask, row="t-1")
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[layer].float()
    real = mask.bool()
    for b in range(2):  # every non-padding query row
        torch.testing.assert_close(got[b][:, real[b]][:, :, real[b]], want[b][:, real[b]][:, :, real[b]],
                                   rtol=1e-5, atol=1e-6)
    prompt = prompt_positions(labels, mask)
    assert prompt.tolist()[1] == [True] * 3 + [False] * 7 and prompt[0].sum() == 4
    want_rows = (want.mean(1) * prompt[:, None, :].float()).sum(-1)
    torch.testing.assert_close(rows[real], want_rows[real], rtol=1e-5, atol=1e-6)
    assert (rows[0, :4] - 1).abs().max() < 1e-5        # prompt queries only see the prompt
    torch.testing.assert_close(aligned, rows)          # default: position t <- query row t (paper, code)
    torch.testing.assert_close(shifted[:, 1:], rows[:, :-1])  # option "t-1": the predicting position's row
    # first response token of row 0 (position 4): row t reads the prompt and itself: 1 - A[4, 4] < 1;
    # row t-1 is the last prompt query, which can only see the prompt: exactly 1
    a = want.mean(1)
    assert aligned[0, 4].item() == pytest.approx(1 - a[0, 4, 4].item(), abs=1e-5) and aligned[0, 4] < 0.999
    assert shifted[0, 4].item() == pytest.approx(1.0, abs=1e-5)
    assert sdpa.config._attn_implementation == "sdpa"  # the model's own implementation is untouched


def test_sstoken_step_keeps_sdpa_and_uses_base_history():
    from tokensel.trainer.lm import LoRA, SelectiveLM

    m = SelectiveLM(model_config=TINY, selector=SsTokenSelection(warmup_fraction=0.0),
                    lora=LoRA(r=4, alpha=8, dropout=0.0), history="base")
    ids = torch.randint(3, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    calls = []
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    F.scaled_dot_product_attention = spy
    try:
        out = m.selective_step(batch)
    finally:
        F.scaled_dot_product_attention = orig
    assert len(calls) >= 4                             # 2 layers x (history pass + trained pass) through SDPA
    assert m.model.config._attn_implementation == "sdpa"
    w = m.last_selection["weights"]
    assert w.sum(1).tolist() == [5, 5, 5]              # ceil(.6 * 7 labelled tokens (positions 5..11)) = 5
    out["loss"].backward()


def test_ema_history_swaps_updates_and_restores(monkeypatch):
    from tokensel.trainer.lm import LoRA, SelectiveLM

    m = SelectiveLM(model_config=TINY, selector=SsTokenSelection(), lora=LoRA(r=4, alpha=8, dropout=0.0),
                    history="ema", ema_decay=0.5)
    name, p = next((n, p) for n, p in m.model.named_parameters() if p.requires_grad and "lora_B" in n)
    ema0 = m._ema_state()[name].clone()                # starts at the initial adapter (B = 0: the base model)
    with torch.no_grad():
        p.add_(1.0)                                    # an "optimizer step"
    monkeypatch.setattr(SelectiveLM, "global_step", property(lambda self: 1))
    m.on_train_batch_end(None, None, 0)
    torch.testing.assert_close(m._ema[name], 0.5 * ema0 + 0.5 * p.detach())
    m.on_train_batch_end(None, None, 0)                # same step (accumulation): no second update
    torch.testing.assert_close(m._ema[name], 0.5 * ema0 + 0.5 * p.detach())
    before = p.detach().clone()
    with m._ema_weights():
        torch.testing.assert_close(p.detach(), m._ema[name])
    torch.testing.assert_close(p.detach(), before)     # restored
    ckpt = {"state_dict": {}}
    m.on_save_checkpoint(ckpt)
    m2 = SelectiveLM(model_config=TINY, selector=SsTokenSelection(), lora=LoRA(r=4, alpha=8, dropout=0.0),
                     history="ema", ema_decay=0.5)
    m2.on_load_checkpoint(ckpt)
    torch.testing.assert_close(m2._ema[name], m._ema[name])


def test_distillation_loss_kl_and_selection():
    from tokensel.losses.distill import Distill, token_kl
    from tokensel.modules import EslmSelection
    from tokensel.trainer.lm import SelectiveLM

    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(7, 8, generator=g), torch.randn(7, 6, generator=g)
    ws, wt = torch.randn(50, 8, generator=g), torch.randn(50, 6, generator=g)
    kl = token_kl(hs, ws, ht, wt, temperature=2.0, chunk_size=3)
    lp_t, lp_s = torch.log_softmax(ht @ wt.T / 2, -1), torch.log_softmax(hs @ ws.T / 2, -1)
    torch.testing.assert_close(kl, (lp_t.exp() * (lp_t - lp_s)).sum(-1) * 4)
    m = SelectiveLM(model_config=TINY, selector=EslmSelection(alpha=0.5), distill=Distill(teacher="initial", alpha=1.0))
    ids = torch.randint(3, 1000, (2, 10), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    out = m.selective_step(batch)
    assert float(out["loss"]) == pytest.approx(0.0, abs=1e-5)  # student == teacher at the start: KL = 0
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    out = m.selective_step(batch)
    assert float(out["loss"]) > 0
    out["loss"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())


def test_base_history_is_the_model_without_adapters_and_changes_the_mask():
    """With a non-zero LoRA B the adapted model differs from the base: the history must be the base
    (adapters off), and using the adapted model as its own history (REL = 0) must select differently."""
    import copy

    from tokensel.trainer.lm import LoRA, SelectiveLM

    m = SelectiveLM(model_config=TINY, selector=SsTokenSelection(rho=0.5, warmup_fraction=0.0),
                    lora=LoRA(r=4, alpha=8, dropout=0.0), history="base")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ids = torch.randint(3, 1000, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    seen = {}
    orig = m.selector.select
    m.selector.select = lambda st: seen.setdefault("stats", st) and orig(st)
    m.selective_step(batch)
    st = seen["stats"]
    base = copy.deepcopy(m.model).unload()             # the same weights with every adapter removed
    want_his = m.token_stats(base, batch, grad=False)[0]
    torch.testing.assert_close(st.his_loss, want_his, rtol=1e-5, atol=1e-6)
    assert (st.his_loss - st.loss)[st.valid].abs().max() > 1e-3   # the adapters changed the losses
    right = m.selector(st)
    wrong = m.selector(TokenStats(valid=st.valid, loss=st.loss, his_loss=st.loss, attn_prompt=st.attn_prompt))
    assert not torch.equal(right, wrong)               # a self-history would select other tokens
    torch.testing.assert_close(m.last_selection["weights"], right)
