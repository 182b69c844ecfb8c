"""SPA: packing layout, pack -> block-diagonal attention -> unpack == per-image attention, packed block ==
masked dense block, gate gradients, score fusion and selection labels."""

import pytest
import torch
from transformers import ViTConfig
from transformers.models.vit.modeling_vit import ViTLayer

from tokensel.kernels.pack import pack_layout, pack_tokens, unpack_tokens
from tokensel.modules.dynamic_tuning import BottleneckAdapter, vit_attention
from tokensel.modules.spa import (
    SpaGate,
    default_row_len,
    patch_labels,
    selection_label_loss,
    spa_block,
    topk_keep,
    upsample_scores,
)
from tokensel.trainer.vit import TokenselViTConfig, TokenselViTForImageClassification

C = 32


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


def test_gate_init_keeps_a_pretrained_residual_stream_under_topk_and_half_under_threshold():
    torch.manual_seed(0)
    x = torch.randn(4, 1 + 64, 32)
    topk, thr = SpaGate(32, selection="topk", keep_rate=0.5), SpaGate(32, selection="threshold")
    # top-k ranks, so the bias only scales the soft gate: ~0.9 of each token enters the block at step 0
    assert torch.sigmoid(topk.scores(x)).min() > 0.85
    assert topk(x)[0][:, 1:].mean().item() == 0.5
    # a threshold gate starts near sigmoid(0) = 0.5 and keeps about half
    assert 0.3 < thr(x)[0][:, 1:].mean().item() < 0.7
