"""SPA: packing layout, pack -> block-diagonal attention -> unpack == per-image attention, packed block ==
masked dense block, gate gradients, score fusion (only across grid changes, with the previous gate's own
logits), the soft-gate scale at init, the selection-label loss and the keep-rate loss, by hand."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import ViTConfig
from transformers.models.vit.modeling_vit import ViTLayer

from tokensel.kernels.pack import pack_layout, pack_tokens, unpack_tokens
from tokensel.modules.dynamic_tuning import BottleneckAdapter, vit_attention
from tokensel.modules.spa import (
    SpaGate,
    default_row_len,
    keep_rate_loss,
    patch_labels,
    selection_label_loss,
    spa_block,
    topk_keep,
    upsample_scores,
)
from tokensel.trainer.vit import TokenselViTConfig, TokenselViTForImageClassification, ViTClassifier

C = 32
CUT = math.log(0.9 / 0.1)  # logit of the default threshold 0.9
TINY4 = dict(hidden_size=C, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=28,
             patch_size=7, num_channels=1)  # 16 patches; SPA gates in blocks 1, 2, 3


def layer() -> ViTLayer:
    torch.manual_seed(0)
    return ViTLayer(ViTConfig(hidden_size=C, num_attention_heads=4, intermediate_size=64)).eval()


def random_keep(b=5, t=17, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, t, generator=g) < torch.linspace(0.2, 0.9, b)[:, None]  # different counts per image
    keep[:, 0] = True
    return keep


def test_layout_never_splits_an_image_and_pads_with_minus_one():
    keep = random_keep()
    lay = pack_layout(keep, row_len=20)
    counts = keep.sum(1)
    assert lay.row_len == max(20, int(counts.max()))
    for b in range(keep.shape[0]):
        rows = (lay.segment == b).any(1).nonzero().squeeze(1)
        assert rows.numel() == 1 and int((lay.segment == b).sum()) == int(counts[b])
    assert torch.equal(lay.index >= 0, lay.segment.reshape(-1) >= 0)
    assert sorted(lay.index[lay.index >= 0].tolist()) == keep.reshape(-1).nonzero().squeeze(1).tolist()
    assert lay.rows < keep.shape[0]  # several images share rows


def test_pack_attention_unpack_equals_per_image_attention():
    lyr, keep = layer(), random_keep()
    x = torch.randn(*keep.shape, C)
    packed, lay = pack_tokens(x, keep, row_len=24)
    with torch.no_grad():
        y = vit_attention(lyr, packed, lay.attention_mask())
        out = unpack_tokens(y, lay, torch.zeros_like(x))
        for b in range(x.shape[0]):
            sel = keep[b]
            ref = vit_attention(lyr, x[b, sel][None])[0]
            torch.testing.assert_close(out[b, sel], ref, atol=1e-5, rtol=1e-5)
            assert torch.all(out[b, ~sel] == 0)


def test_unpack_is_inverse_of_pack_and_gradients_flow():
    keep = random_keep(seed=1)
    x = torch.randn(*keep.shape, C, requires_grad=True)
    packed, lay = pack_tokens(x, keep)
    base = torch.randn(*keep.shape, C, requires_grad=True)
    out = unpack_tokens(packed * 2, lay, base)
    torch.testing.assert_close(out[keep], 2 * x[keep])
    torch.testing.assert_close(out[~keep], base[~keep])
    out.sum().backward()
    assert torch.equal(x.grad[keep], torch.full_like(x.grad[keep], 2.0)) and torch.all(x.grad[~keep] == 0)
    assert torch.all(base.grad[keep] == 0) and torch.all(base.grad[~keep] == 1)


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_packed_block_equals_masked_dense_block(selection):
    lyr = layer()
    gate = SpaGate(C, selection=selection, keep_rate=0.4)
    adapter = BottleneckAdapter(C, 8)
    with torch.no_grad():
        gate.proj.weight.normal_(0, 0.5)
        adapter.up.weight.normal_()
    adapter.eval()
    x, prev = torch.randn(4, 17, C), torch.randn(4, 16)
    with torch.no_grad():
        row = default_row_len(17, 0.4, selection)
        packed, keep, s, rows = spa_block(lyr, x, gate, adapter, prev, mode="skip", row_len=row)
        masked, keep2, s2, _ = spa_block(lyr, x, gate, adapter, prev, mode="mask")
    assert torch.equal(keep, keep2) and 0 < rows
    assert 0.05 < keep[:, 1:].mean() < 0.95
    torch.testing.assert_close(packed, masked, atol=1e-5, rtol=1e-5)
    kept = keep > 0.5
    assert torch.equal(packed[~kept], x[~kept])  # unselected tokens pass through unchanged
    if selection == "topk":
        assert torch.all(keep[:, 1:].sum(1) == 7)  # ceil(0.4 * 16)


def test_gate_learns_from_task_and_label_losses():
    lyr = layer()
    gate = SpaGate(C, selection="threshold")
    x = torch.randn(3, 17, C)
    out, keep, s, _ = spa_block(lyr, x, gate, None, None, mode="train")
    out.square().mean().backward()  # task-like loss: soft gate + straight-through reach the gate
    assert gate.proj.weight.grad.abs().sum() > 0
    gate.zero_grad()
    labels = (torch.rand(3, 16) > 0.5).float()
    selection_label_loss([gate.scores(x)], labels, weight=1.0).backward()
    assert gate.proj.weight.grad.abs().sum() > 0


def test_score_fusion_topk_and_labels():
    gate = SpaGate(C, fuse_previous=True)
    x, prev = torch.randn(2, 17, C), torch.full((2, 4), 3.0)  # a coarser 2x2 previous grid
    s = gate.scores(x, prev)
    assert s.shape == (2, 16) and torch.all(s >= 3.0)
    assert torch.equal(upsample_scores(torch.arange(4.0)[None], 16).view(4, 4),
                       torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]))
    assert topk_keep(torch.tensor([[0.1, 0.9, 0.5, 0.3]]), 0.5).tolist() == [[False, True, True, False]]
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 1, 5] = 1  # one ink pixel in patch (0, 1) of a 2x2 grid of 4x4 patches
    assert patch_labels(mask, 4).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_spa_model_packs_rows_and_skip_equals_mask():
    torch.manual_seed(0)
    cfg = TokenselViTConfig(hidden_size=C, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                            image_size=28, patch_size=4, num_channels=1, num_labels=5, selector="spa",
                            adapter_bottleneck=8, spa_selection="threshold", spa_row_len=100)
    model = TokenselViTForImageClassification(cfg).eval()
    assert sorted(model.gates.keys()) == ["1", "2"]  # depth // 3 onwards
    with torch.no_grad():
        for g in model.gates.values():
            g.proj.weight.normal_(0, 0.5)
        x = torch.randn(6, 1, 28, 28)
        skip, mask = model(x, mode="skip"), model(x, mode="mask")
    assert all(0 < r <= 3 for r in skip.packed_rows)  # rows of 100 slots hold two or more images
    torch.testing.assert_close(skip.logits, mask.logits, atol=1e-5, rtol=1e-5)


def test_gate_init_keeps_about_half_under_threshold_and_a_fixed_count_under_topk():
    torch.manual_seed(0)
    x = torch.randn(4, 1 + 64, 32)
    topk, thr = SpaGate(32, selection="topk", keep_rate=0.5), SpaGate(32, selection="threshold")
    # top-k ranks, so the bias only scales the soft gate: ~0.9 of each token enters the block at step 0
    assert torch.sigmoid(topk.scores(x)).min() > 0.85
    assert topk(x)[0][:, 1:].mean().item() == 0.5
    # a threshold gate starts at its cut logit(0.9): about half kept
    assert 0.3 < thr(x)[0][:, 1:].mean().item() < 0.7


# ---------------------------------------------------------------- fusion --------------------------------


def _own_logit_recorder(model):
    """Forward hooks on every gate's Linear: the input tokens and the gate's own logits, recomputed by hand."""
    seen = {}

    def hook(name):
        def fn(mod, args, out):
            inp = args[0]
            seen[name] = (inp @ mod.weight.T + mod.bias).squeeze(-1)  # [B, N], from the block's input tokens
        return fn

    for name, g in model.gates.items():
        g.proj.register_forward_hook(hook(name))
    return seen


def test_plain_vit_gates_select_on_their_own_logits_independently_of_earlier_gates():
    # Block 1's gate keeps every token with a huge bias. Chained max-fusion (the old code) made blocks 2 and 3
    # inherit that score and keep everything; the paper fuses only across stages, and a plain ViT has none.
    torch.manual_seed(0)
    cfg = TokenselViTConfig(**TINY4, num_labels=5, selector="spa", spa_selection="threshold", spa_threshold=0.9,
                            spa_fuse_previous=True)
    model = TokenselViTForImageClassification(cfg).eval()
    assert sorted(model.gates) == ["1", "2", "3"]
    with torch.no_grad():
        for g in model.gates.values():
            g.proj.weight.normal_(0, 0.3)
        model.gates["1"].proj.bias.fill_(10.0)
    own = _own_logit_recorder(model)
    with torch.no_grad():
        out = model(torch.randn(6, 1, 28, 28), mode="skip")
    assert out.keep_masks[0][:, 1:].min() == 1  # block 1 keeps everything
    for j, name in enumerate(["1", "2", "3"]):
        torch.testing.assert_close(out.selector_logits[j], own[name])  # the gate's own logits are reported
        assert torch.equal(out.keep_masks[j][:, 1:], (own[name] > CUT).float())  # and alone decide
    for j in (1, 2):
        assert 0.1 < out.keep_masks[j][:, 1:].mean().item() < 0.9  # blocks 2-3 select: not all kept


def test_fusion_across_a_grid_change_uses_the_previous_gates_own_logits():
    gate = SpaGate(C, selection="threshold", threshold=0.9, fuse_previous=True)
    with torch.no_grad():
        gate.proj.weight.zero_()
        gate.proj.bias.zero_()  # own logits: 0 on every one of the 16 patches
    x = torch.randn(2, 17, C)
    prev = torch.tensor([[-1.0, 2.0, -3.0, 4.0]]).expand(2, 4)  # the previous gate's own logits on a 2x2 grid
    want = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 4, 4]]).flatten()
    assert torch.equal(gate.scores(x, prev), want.expand(2, 16))  # max(own, nearest-upsampled prev)
    keep, s, own = gate(x, prev)
    assert torch.equal(own, torch.zeros(2, 16)) and torch.equal(s, want.expand(2, 16))
    assert torch.equal(keep[:, 1:], (want > CUT).float().expand(2, 16))  # only the 4.0 quarter beats logit(0.9)
    # same grid (a plain ViT's next block): no fusion, whatever prev says
    assert torch.equal(gate.scores(x, torch.full((2, 16), 5.0)), torch.zeros(2, 16))
    # fusion switched off: own logits even across a grid change
    gate.fuse_previous = False
    assert torch.equal(gate.scores(x, prev), torch.zeros(2, 16))
    # spa_block selects on the fused scores but reports the own logits (what the next gate and the labels read)
    gate.fuse_previous = True
    with torch.no_grad():
        _, k2, reported, _ = spa_block(layer(), x, gate, None, prev, mode="mask")
    assert torch.equal(k2, keep) and torch.equal(reported, own)


# ---------------------------------------------------------------- soft gate -----------------------------


def test_threshold_gate_at_init_scales_kept_tokens_by_about_the_threshold_not_one_half():
    # r_g = sigmoid(s) * r: what multiplies a kept token is sigmoid(s). The threshold gate's bias starts at
    # logit(threshold) = logit(0.9), so a frozen backbone sees its tokens x0.9, not x0.5 (sigmoid(0)).
    torch.manual_seed(0)
    model = TokenselViTForImageClassification(TokenselViTConfig(**TINY4, num_labels=5, selector="spa")).eval()
    seen = {}
    lyr = model.vit.layers[1]  # the first SPA block
    lyr.layernorm_before.register_forward_hook(lambda mod, args, out: seen.setdefault("in", args[0]))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        tokens = model.vit.layers[0](model.vit.embeddings(x))  # the block-1 input, as the dense block 0 gives it
        tokens = tokens[0] if isinstance(tokens, tuple) else tokens
        out = model(x, mode="mask")  # mask mode: the block sees the whole [B, T, C] gated tensor
    keep = out.keep_masks[0] > 0.5
    ratio = seen["in"] / tokens
    torch.testing.assert_close(ratio[:, 0], torch.ones_like(ratio[:, 0]))  # CLS unscaled
    factor = ratio[:, 1:].mean(-1)  # per token: the gate scale sigmoid(s)
    torch.testing.assert_close(ratio[:, 1:], factor[..., None].expand_as(ratio[:, 1:]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(factor, torch.sigmoid(out.selector_logits[0]), atol=1e-5, rtol=1e-5)
    assert 0.88 < factor.min() and factor.max() < 0.92  # ~0.9 everywhere at init
    assert torch.all(factor[keep[:, 1:]] > 0.9)  # kept <=> sigmoid(s) > 0.9: no kept token is scaled below it
    assert 0.2 < keep[:, 1:].float().mean() < 0.8
    assert model.config.spa_selection == "threshold" and model.config.spa_threshold == 0.9  # the defaults


# ---------------------------------------------------------------- losses --------------------------------


def test_selection_label_loss_by_hand():
    # alpha * sum over blocks of the token-mean BCE-with-logits. Labels y = [1, 0].
    s1 = torch.tensor([[0.0, math.log(3.0)]])  # sigmoid = 1/2, 3/4 -> BCE ln 2, ln 4
    s2 = torch.tensor([[math.log(3.0), 0.0]])  # sigmoid = 3/4, 1/2 -> BCE ln 4/3, ln 2
    y = torch.tensor([[1.0, 0.0]])
    want = 0.01 * ((math.log(2) + math.log(4)) / 2 + (math.log(4 / 3) + math.log(2)) / 2)
    assert selection_label_loss([s1, s2], y, 0.01).item() == pytest.approx(want, rel=1e-6)
    assert selection_label_loss([], y).item() == 0.0


def tiny_spa(**kw) -> ViTClassifier:
    torch.manual_seed(0)
    return ViTClassifier(method="spa", backbone=None, vit_config=TINY4, num_labels=5, finetune="full",
                         adapter_bottleneck=0, pictures=0, **kw)


def test_trainer_label_loss_is_bce_of_each_gates_own_logits():
    module = tiny_spa(label_weight=0.5, spa_threshold=0.9)
    with torch.no_grad():
        for g in module.model.gates.values():
            g.proj.weight.normal_(0, 0.3)
        module.model.gates["1"].proj.bias.fill_(10.0)  # would dominate blocks 2-3 under chained fusion
    own = _own_logit_recorder(module.model)
    x, mask = torch.randn(4, 1, 28, 28), torch.zeros(4, 1, 28, 28)
    mask[:, :, 3:10, 2:20] = 1  # touches patch rows 0-1, columns 0-2 of the 4x4 grid of 7x7 patches
    out = module.model(x, mode="train")
    logs = {}
    loss = module._spa_losses({"pixel_values": x, "mask": mask}, out, logs)
    y = torch.zeros(4, 4, 4)
    y[:, 0:2, 0:3] = 1
    y = y.flatten(1)
    want = 0.0
    for name in ("1", "2", "3"):
        p = torch.sigmoid(own[name].detach())
        want += -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    torch.testing.assert_close(loss.detach(), 0.5 * want, atol=1e-5, rtol=1e-5)
    assert "train/label_loss" in logs and "train/rate_loss" not in logs  # labels on: no rate loss


def test_keep_rate_loss_by_hand_and_where_it_applies():
    m1 = torch.tensor([[1.0, 1, 0, 1, 1]])  # CLS + 4 patches: 3 kept
    m2 = torch.tensor([[1.0, 0, 0, 0, 1]])  # 1 kept
    assert keep_rate_loss([m1, m2], 0.25, 2.0).item() == pytest.approx(2.0 * (4 / 8 - 0.25) ** 2)
    module = tiny_spa(label_weight=0.0, keep_rate=0.25, spa_rate_weight=3.0)
    logs = {}
    loss = module._spa_losses({}, SimpleNamespace(keep_masks=(m1, m2), logits=torch.zeros(1, 5)), logs)
    assert loss.item() == pytest.approx(3.0 * 0.25 ** 2) and logs["train/rate_loss"] is loss
    off = tiny_spa(label_weight=0.0, spa_rate_weight=0.0)
    assert off._spa_losses({}, SimpleNamespace(keep_masks=(m1,), logits=torch.zeros(1, 5)), {}).item() == 0.0


def test_rate_loss_pulls_threshold_keep_rate_to_the_target_without_labels():
    # Only the gates train, only on the rate loss (labels off). The loss constrains the training keep rate,
    # whose expectation is mean sigmoid(s - logit(threshold)) (logistic noise); it starts at ~1/2.
    module = tiny_spa(label_weight=0.0, keep_rate=0.2, spa_rate_weight=2.0, spa_threshold=0.9)
    model = module.model
    x = torch.randn(16, 1, 28, 28)

    def expected_keep() -> float:
        with torch.no_grad():
            out = model.eval()(x, mode="skip")
        return torch.stack([torch.sigmoid(s - CUT).mean() for s in out.selector_logits]).mean().item()

    before = expected_keep()
    opt = torch.optim.Adam(model.gates.parameters(), lr=0.05)
    torch.manual_seed(1)
    for _ in range(40):
        out = model.train()(x, mode="train")
        loss = module._spa_losses({}, out, {})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = expected_keep()
    assert 0.4 < before < 0.6
    assert abs(after - 0.2) < 0.05  # measured 0.197
    measured = torch.stack([m[:, 1:].detach().mean() for m in out.keep_masks]).mean().item()
    assert abs(measured - 0.2) < 0.08  # the last step's Gumbel decisions
