"""Packing keeps samples apart through the model, for every attention implementation packing accepts: a packed
batch's per-token losses equal the padded batch's, a late token changes nothing before it nor any other sample,
padding rows stay finite, and the ssToken attention probe sees the same prompt mass packed as alone.
Implementations that take no 4-D mask are refused with a one-line message."""

from types import SimpleNamespace

import pytest
import torch

from tokensel.errors import ConfigError
from tokensel.modules.attention_probe import AttentionProbe
from tokensel.trainer.data import IGNORE, packed_collate, pad_collate

TINY = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
PAD = 0


def _flex_available() -> bool:
    from transformers.utils import is_torch_flex_attn_available

    return is_torch_flex_attn_available()


FLEX = pytest.param("flex_attention", marks=pytest.mark.skipif(not _flex_available(), reason="no flex attention"))
IMPLS = ["sdpa", "eager", FLEX]  # forward checks (flex compiles its kernel on first use: ~15 s on CPU)
# torch has no flex-attention backward on CPU
GRAD_IMPLS = ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and _flex_available()), reason="flex attention backward needs a GPU"))]


def _samples():
    """Four SFT samples (prompt unlabelled, response labelled), lengths 7, 5, 9, 4."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i, (n, prompt) in enumerate([(7, 3), (5, 2), (9, 4), (4, 2)]):
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:], "sample_index": i})
    return out


def _packed(samples):
    # rows [0, 1] (12 tokens) and [2, 3] (13 tokens): row 0 ends in one padding position
    return packed_collate(PAD, 64)([[samples[0], samples[1]], [samples[2], samples[3]]])


def _model(impl):
    from tokensel.trainer.lm import SelectiveLM

    m = SelectiveLM(model_config=TINY, attn_implementation=impl, kernels="torch")
    assert m.model.config._attn_implementation == impl
    return m.eval()


def _run(m, batch):
    """(per-token loss [B, T], valid, last hidden state [B, T, H]) through `SelectiveLM.token_stats`."""
    from tokensel.trainer.lm import backbone_and_head

    seen = {}
    backbone = backbone_and_head(m.model)[0]
    h = backbone.register_forward_hook(lambda mod, a, out: seen.update(hidden=out.last_hidden_state))
    try:
        with torch.no_grad():
            loss, _, valid = m.token_stats(m.model, batch, grad=False)
    finally:
        h.remove()
    return loss, valid, seen["hidden"]


def _per_sample(batch, values):
    """{sample: values at its positions, in token order}."""
    out = {}
    for s in batch["sample_index"].unique().tolist():
        if s < 0:
            continue
        where = batch["sample_index"] == s
        order = batch["token_index"][where].argsort()
        out[s] = values[where][order]
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_loss_equals_padded_loss(impl):
    m, samples = _model(impl), _samples()
    packed, padded = _packed(samples), pad_collate(PAD)(samples)
    p_loss, p_valid, p_hidden = _run(m, packed)
    u_loss, u_valid, u_hidden = _run(m, padded)
    assert torch.isfinite(p_hidden).all() and torch.isfinite(p_loss).all()  # padding rows: no NaN
    pl, ul = _per_sample(packed, p_loss), _per_sample(padded, u_loss)
    pv, uv = _per_sample(packed, p_valid), _per_sample(padded, u_valid)
    ph, uh = _per_sample(packed, p_hidden), _per_sample(padded, u_hidden)
    for s in range(len(samples)):
        assert pv[s].tolist() == uv[s].tolist()
        torch.testing.assert_close(pl[s], ul[s], atol=1e-5, rtol=0)  # every token's loss
        torch.testing.assert_close(ph[s], uh[s], atol=1e-5, rtol=0)
        # the per-sample loss (mean over the sample's labelled tokens)
        assert float(pl[s][pv[s]].mean()) == pytest.approx(float(ul[s][uv[s]].mean()), abs=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["end_of_first_sample", "end_of_row"])
def test_late_token_changes_nothing_before_it_nor_other_samples(impl, where):
    m, samples = _model(impl), _samples()
    base = _packed(samples)
    t = len(samples[0]["input_ids"]) - 1 if where == "end_of_first_sample" else int(base["attention_mask"][0].sum()) - 1
    changed = {k: v.clone() for k, v in base.items()}
    new = 5 if int(base["input_ids"][0, t]) != 5 else 6
    changed["input_ids"][0, t] = new
    if changed["labels"][0, t] != IGNORE:
        changed["labels"][0, t] = new
    loss0, _, hid0 = _run(m, base)
    loss1, _, hid1 = _run(m, changed)
    assert (hid1[0, t] - hid0[0, t]).abs().max() > 1e-3  # the change is seen at its own position
    # no earlier position of the row moves: neither hidden state nor loss (loss at t has the new label)
    torch.testing.assert_close(hid1[0, :t], hid0[0, :t], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss1[0, :t], loss0[0, :t], atol=1e-5, rtol=0)
    # no other packed sample moves: the rest of the row (a different sample) and the other row
    same = base["sample_index"][0] == base["sample_index"][0, t]
    other = ~same & (base["sample_index"][0] >= 0)
    torch.testing.assert_close(hid1[0][other], hid0[0][other], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss1[0][other], loss0[0][other], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss1[1], loss0[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_probe_prompt_mass_packed_equals_alone(impl):
    """ssToken's attention probe (last layer): the second sample of a packed row gets the same prompt-mass rows
    as when it is alone in its batch."""
    m, samples = _model(impl), _samples()
    packed, alone = _packed(samples), pad_collate(PAD)([samples[1]])
    rows = {}
    for name, batch in (("packed", packed), ("alone", alone)):
        with AttentionProbe(m.model) as probe:
            _run(m, batch)
            rows[name] = probe.prompt_mass_rows(batch["labels"], batch.get("attention_mask"),
                                                batch["sample_index"])
            assert torch.isfinite(probe.attention()).all()  # padding rows included
    seg = packed["sample_index"][0] == 1
    n = len(samples[1]["input_ids"])
    assert int(seg.sum()) == n
    torch.testing.assert_close(rows["packed"][0][seg], rows["alone"][0, :n], atol=1e-5, rtol=0)
    assert (rows["alone"][0, :2] - 1).abs().max() < 1e-5  # prompt queries see only the prompt


@pytest.mark.parametrize("impl", GRAD_IMPLS)
def test_packed_backward_is_finite(impl):
    m, samples = _model(impl), _samples()
    if torch.cuda.is_available():
        m = m.cuda()
    batch = {k: v.to(m.device) for k, v in _packed(samples).items()}
    loss, _, valid = m.token_stats(m.model, batch, grad=True)
    (loss[valid].mean()).backward()
    grads = [p.grad for p in m.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_mask_form_per_implementation():
    from tokensel.trainer.data import model_attention_mask

    batch = _packed(_samples())
    bool_mask = batch["attention_mask_4d"]

    def backbone(impl, dtype=torch.float32):
        emb = SimpleNamespace(weight=torch.zeros(1, dtype=dtype))
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl), get_input_embeddings=lambda: emb)

    assert model_attention_mask(batch, backbone("sdpa")) is bool_mask
    if _flex_available():
        from torch.nn.attention.flex_attention import BlockMask, create_mask

        bm = model_attention_mask(batch, backbone("flex_attention"))
        assert isinstance(bm, BlockMask)
        assert torch.equal(create_mask(bm.mask_mod, *bool_mask.shape, device="cpu"), bool_mask)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        add = model_attention_mask(batch, backbone("eager", dtype))
        assert add.dtype == dtype and add.shape == bool_mask.shape
        assert (add[bool_mask] == 0).all() and (add[~bool_mask] == torch.finfo(dtype).min).all()
    padded = pad_collate(PAD)(_samples())
    assert model_attention_mask(padded, backbone("eager")) is padded["attention_mask"]  # unpacked: 2-D as is
    for impl in ("flash_attention_2", "flash_attention_3", "paged|sdpa", None):
        with pytest.raises(ConfigError, match=r"model\.init_args\.attn_implementation.*packing=false") as e:
            model_attention_mask(batch, backbone(impl))
        assert "\n" not in str(e.value)
        assert model_attention_mask(padded, backbone(impl)) is padded["attention_mask"]
