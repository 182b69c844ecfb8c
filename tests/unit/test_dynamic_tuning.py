"""Dynamic Tuning: Gumbel-sigmoid straight-through, dispatcher gradients, hard skipping == masked
computation, the MLP really runs on kept tokens only, adapters, the rate loss reaching its target, the eval
block against an independent oracle built from the HF layer's weights, and the tau anneal."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import ViTForImageClassification

from tokensel.modules.dynamic_tuning import (
    BottleneckAdapter,
    DynamicTuningDispatcher,
    MoEAdapter,
    activation_rate_loss,
    dense_block,
    dynamic_tuning_block,
    gumbel_sigmoid,
    self_distillation_loss,
)
from tokensel.trainer.vit import TokenselViTConfig, TokenselViTForImageClassification, to_plain_vit

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=28,
            patch_size=4, num_channels=1, num_labels=5)


def tiny_model(selector="dynamic_tuning", **kw) -> TokenselViTForImageClassification:
    torch.manual_seed(0)
    model = TokenselViTForImageClassification(TokenselViTConfig(**TINY, selector=selector, adapter_bottleneck=8,
                                                                **kw))
    with torch.no_grad():  # non-trivial selections and adapters (the inits give ~50% keep and zero adapters)
        for name, p in model.named_parameters():
            if name.startswith(("dispatchers", "gates", "adapters")):
                p.normal_(0, 0.5) if name.endswith("weight") else p.zero_()
    return model


def test_gumbel_sigmoid_is_hard_with_soft_gradient():
    logits = torch.randn(64, 10, requires_grad=True)
    m = gumbel_sigmoid(logits, tau=5.0)
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    (m * torch.arange(10.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gumbel_sigmoid_keep_probability_is_sigmoid_of_logit():
    # logistic noise + threshold 0.5: P(keep) = P(l + noise > 0) = sigmoid(l), whatever tau is
    g = torch.Generator().manual_seed(0)
    for tau in (5.0, 0.5):
        m = gumbel_sigmoid(torch.full((40000,), 1.0), tau=tau, generator=g)
        assert abs(m.mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.015


def test_straight_through_gradient_reaches_the_dispatcher():
    model = tiny_model().train()
    x = torch.randn(4, 1, 28, 28)
    out = model(x, mode="train")
    out.logits.square().sum().backward()
    # the last block's patch tokens never reach the CLS-token head, so its dispatcher gets no task gradient
    for d in model.dispatchers[:-1]:
        assert d.proj.weight.grad is not None and d.proj.weight.grad.abs().sum() > 0
    assert all(torch.all(m[:, 0] == 1) for m in out.keep_masks)  # CLS always kept


def test_dispatcher_eval_is_threshold_of_sigmoid():
    d = DynamicTuningDispatcher(16, threshold=0.5).eval()
    x = torch.randn(3, 9, 16)
    m, logits = d(x, stochastic=False)
    assert torch.equal(m[:, 1:], (logits > 0).float()) and torch.all(m[:, 0] == 1)


def _undecided_dispatcher(calibrate: bool) -> DynamicTuningDispatcher:
    # logits 0.5 + N(0, 0.1^2) for every token: training keeps ~sigmoid(0.5) = 62%, the plain rule ~100%
    d = DynamicTuningDispatcher(16, calibrate=calibrate)
    with torch.no_grad():
        d.proj.weight.normal_(0, 0.1 / 4)
        d.proj.bias.fill_(0.5)
    return d


def test_calibrated_dispatcher_keeps_at_inference_what_it_keeps_in_training():
    torch.manual_seed(0)
    x = torch.randn(8, 65, 16)
    for calibrate in (False, True):
        d = _undecided_dispatcher(calibrate).train()
        train_keep = torch.stack([d(x, stochastic=True)[0][:, 1:].mean() for _ in range(100)]).mean().item()
        assert abs(train_keep - 0.62) < 0.02
        d.eval()
        m, logits = d(x, stochastic=False)
        eval_keep = m[:, 1:].mean().item()
        if calibrate:  # the offset is the quantile of the logits at the training keep rate
            assert abs(eval_keep - 0.62) < 0.03, eval_keep
            assert torch.equal(m[:, 1:], (logits > d.offset).float())
        else:  # the paper's rule: logit > 0, offset never moves
            assert eval_keep > 0.99 and d.offset.item() == 0.0


def test_calibration_offset_travels_with_the_exported_model(tmp_path):
    model = tiny_model(dispatcher_calibrate=True).train()
    x = torch.randn(4, 1, 28, 28)
    for _ in range(3):
        model(x, mode="train")
    offsets = torch.stack([d.offset for d in model.dispatchers])
    assert offsets.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = TokenselViTForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(torch.stack([d.offset for d in loaded.dispatchers]), offsets)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits)


def test_hard_skip_equals_masked_computation():
    model = tiny_model().eval()
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        masked, skipped = model(x, mode="mask"), model(x, mode="skip")
    rates = [m[:, 1:].mean().item() for m in skipped.keep_masks]
    assert all(0.05 < r < 0.95 for r in rates), rates  # the test exercises real skipping
    torch.testing.assert_close(skipped.logits, masked.logits, atol=1e-6, rtol=1e-6)
    for a, b in zip(masked.keep_masks, skipped.keep_masks):
        assert torch.equal(a, b)


def test_hard_skip_under_autograd_matches_masked_values_and_gradients():
    # inference adds in place; with autograd the out-of-place add must give the masked path's gradients
    x = torch.randn(4, 1, 28, 28)
    grads = []
    for mode in ("mask", "skip"):
        model = tiny_model().eval()
        out = model(x, mode=mode)
        out.logits.square().sum().backward()
        grads.append((out.logits.detach(), model.vit.layers[1].mlp.fc1.weight.grad.clone(),
                      model.adapters[2].down.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[0][1].abs().sum() > 0


def test_skip_runs_the_mlp_on_kept_tokens_only():
    model = tiny_model().eval()
    rows = []
    hooks = [layer.mlp.fc1.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
             for layer in model.vit.layers]
    with torch.no_grad():
        out = model(torch.randn(5, 1, 28, 28), mode="skip")
    for h in hooks:
        h.remove()
    assert rows == [int(m.sum()) for m in out.keep_masks]  # gathered rows = kept tokens (incl. CLS)
    assert sum(rows) < 5 * model.num_tokens * len(rows)


def test_block_modes_and_complete_pass():
    model = tiny_model().eval()
    layer, disp, ad = model.vit.layers[0], model.dispatchers[0], model.adapters[0]
    x = torch.randn(2, model.num_tokens, 32)
    full, ones, _ = dynamic_tuning_block(layer, x, disp, ad, mode="complete")
    assert torch.all(ones == 1)
    torch.testing.assert_close(full, dense_block(layer, x, ad))
    with pytest.raises(ValueError, match="mode"):
        dynamic_tuning_block(layer, x, disp, ad, mode="bogus")


def test_dense_path_matches_transformers_vit():
    model = TokenselViTForImageClassification(TokenselViTConfig(**TINY)).eval()
    plain = to_plain_vit(model)
    assert isinstance(plain, ViTForImageClassification)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain(x).logits, atol=1e-5, rtol=1e-5)


def test_adapters_start_at_zero_and_moe_with_one_expert_is_a_bottleneck():
    x = torch.randn(2, 7, 16)
    assert torch.all(BottleneckAdapter(16, 4)(x) == 0) and torch.all(MoEAdapter(16, 4, 3)(x) == 0)
    moe, plain = MoEAdapter(16, 4, num_experts=1, dropout=0.0), BottleneckAdapter(16, 4, dropout=0.0)
    with torch.no_grad():
        plain.down.weight.copy_(moe.down_weight[0])
        moe.up_weight.normal_()
        plain.up.weight.copy_(moe.up_weight[0])
    torch.testing.assert_close(moe(x), plain(x))


def test_moe_adapter_routes_per_image():
    moe = MoEAdapter(16, 4, num_experts=4, dropout=0.0)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_()
    x = torch.randn(3, 7, 16)
    alone = torch.cat([moe(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(moe(x), alone)  # routing depends on each image only


def test_losses():
    masks = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert activation_rate_loss(masks, 0.5, 2.0).item() == pytest.approx(2.0 * 0.25 ** 2)
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    kl = self_distillation_loss(s, t)
    kl.backward()
    assert kl.item() >= 0 and t.grad is None  # the teacher is detached


def test_rate_loss_drives_keep_rate_to_target():
    """Tiny run: frozen random backbone, CE + rate loss (weight 2, as the paper) from ~50% to r = 0.25."""
    from tokensel.trainer.vision_data import synthetic_images

    torch.manual_seed(0)
    model = TokenselViTForImageClassification(TokenselViTConfig(**TINY, selector="dynamic_tuning",
                                                                adapter_bottleneck=8)).train()
    model.vit.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = synthetic_images(256, 28, 5, seed=0)
    x = (data.images.float() / 255 - 0.5) / 0.5
    target, rates = 0.25, []
    for _ in range(80):
        idx = torch.randint(0, 256, (32,))
        out = model(x[idx], mode="train")
        masks = torch.stack([m[:, 1:] for m in out.keep_masks], 1)
        loss = torch.nn.functional.cross_entropy(out.logits, data.labels[idx]) + activation_rate_loss(masks, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rates.append(masks.mean().item())
    assert rates[0] > 0.4
    assert abs(sum(rates[-10:]) / 10 - target) < 0.05, rates[-10:]


def test_moe_adapter_model_save_and_reload(tmp_path):
    from transformers import AutoModelForImageClassification

    model = tiny_model(adapter_experts=4).eval()
    assert isinstance(model.adapters[0], MoEAdapter)
    model.save_pretrained(tmp_path)
    again = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x, mode="mask").logits, atol=1e-5, rtol=1e-5)


def test_folders_and_checkpoints_without_the_keep_offset_load_with_offset_zero(tmp_path):
    # exports and checkpoints written before the calibration buffer existed
    from safetensors.torch import load_file, save_file

    from tokensel.trainer.vit import ViTClassifier

    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.endswith(".offset")}, weights,
              metadata={"format": "pt"})
    loaded = TokenselViTForImageClassification.from_pretrained(tmp_path).eval()
    assert all(d.offset.item() == 0.0 for d in loaded.dispatchers)
    module = ViTClassifier(method="dynamic_tuning", backbone=None, vit_config=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
        patch_size=7, num_channels=1), pictures=0)
    state = {k: v for k, v in module.state_dict().items() if not k.endswith(".offset")}
    ckpt = {"state_dict": state}
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=True)


# ---------------------------------------------------------------- independent oracle -------------------
# The paper's block, rebuilt from the Hugging Face ViTLayer's weights with plain tensor ops (none of
# dynamic_tuning.py's helpers): h = x + Attn(LN1(x)); out = h + Adapter(h) + 1[logit > 0] * MLP(LN2(h)),
# the dispatcher reading h[:, 1:] (after attention), CLS always kept.


def _oracle_attention(att, z):
    b, t, c = z.shape
    heads = att.num_attention_heads
    d = c // heads

    def split(lin):
        return (z @ lin.weight.T + lin.bias).view(b, t, heads, d).transpose(1, 2)  # [B, H, T, d]

    q, k, v = split(att.q_proj), split(att.k_proj), split(att.v_proj)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    o = (p @ v).transpose(1, 2).reshape(b, t, c)
    return o @ att.o_proj.weight.T + att.o_proj.bias


def _oracle_block(lyr, dispatcher, adapter, x):
    ln1, ln2 = lyr.layernorm_before, lyr.layernorm_after
    h = x + _oracle_attention(lyr.attention, F.layer_norm(x, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps))
    z = F.layer_norm(h, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)
    mlp = F.gelu(z @ lyr.mlp.fc1.weight.T + lyr.mlp.fc1.bias) @ lyr.mlp.fc2.weight.T + lyr.mlp.fc2.bias
    logit = (h[:, 1:] @ dispatcher.proj.weight.T + dispatcher.proj.bias).squeeze(-1)  # post-attention, no CLS
    keep = torch.cat([torch.ones(x.shape[0], 1), (logit > 0).float()], 1)  # CLS always kept
    ad = adapter.scale * (F.relu(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T
                          + adapter.up.bias)  # on h itself (un-normalised), every token; dropout off in eval
    return h + ad + keep[..., None] * mlp, keep, logit


@pytest.mark.parametrize("mode", ["skip", "mask"])
def test_eval_block_equals_the_paper_formula_rebuilt_from_the_hf_layer(mode):
    model = tiny_model().eval()
    assert model.config.hidden_act == "gelu"
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        out = model(x, mode=mode)
        h = model.vit.embeddings(x)
        for i, lyr in enumerate(model.vit.layers):
            h, keep, logit = _oracle_block(lyr, model.dispatchers[i], model.adapters[i], h)
            assert torch.equal(out.keep_masks[i], keep), i
            torch.testing.assert_close(out.selector_logits[i], logit, atol=1e-5, rtol=1e-5)
            assert 0.1 < keep[:, 1:].mean() < 0.9  # a non-trivial selection, so the MLP gating is exercised
        ref = model.classifier(F.layer_norm(h, model.vit.layernorm.normalized_shape, model.vit.layernorm.weight,
                                            model.vit.layernorm.bias, model.vit.layernorm.eps)[:, 0])
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)


def test_single_block_equals_the_oracle_and_differs_from_wrong_placements():
    model = tiny_model().eval()
    lyr, disp, ad = model.vit.layers[0], model.dispatchers[0], model.adapters[0]
    x = torch.randn(3, 17, 32)
    with torch.no_grad():
        want, keep, _ = _oracle_block(lyr, disp, ad, x)
        got, m, _ = dynamic_tuning_block(lyr, x, disp, ad, mode="skip")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(m, keep)
        # the oracle is sharp: the adapter on LN2(h) instead of h would not match
        h = x + _oracle_attention(lyr.attention, lyr.layernorm_before(x))
        moved = want - ad(h) + ad(lyr.layernorm_after(h))
        assert (moved - got).abs().max() > 1e-3


def test_tau_anneals_exponentially_to_tau_end():
    from types import SimpleNamespace

    from tokensel.trainer.vit import ViTClassifier

    module = ViTClassifier(method="dynamic_tuning", backbone=None, num_labels=5, finetune="full", pictures=0,
                           adapter_bottleneck=4, tau=5.0, tau_end=0.1,
                           vit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, image_size=28, patch_size=7, num_channels=1))
    for step, want in [(0, 5.0), (5, 5.0 * 0.02 ** 0.5), (10, 0.1), (20, 0.1)]:  # tau * (end / tau)^(step / total)
        module.trainer = SimpleNamespace(estimated_stepping_batches=10, global_step=step)
        module._anneal_tau()
        assert all(d.tau == pytest.approx(want, rel=1e-9) for d in module.model.dispatchers), step
