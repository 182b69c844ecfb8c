"""Q-Tuning through the spine: under the released-code rule the sample entropy spans prompt and answer (every
non-pad position from 1 on), computed from the model's full logits; the paper rule spans the answer only."""

import torch

from tokensel.modules import QTuningSelection
from tokensel.trainer.lm import SelectiveLM

TINY = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}


def _batch():
    ids = torch.randint(3, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100                      # 5 prompt tokens
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0                           # row 3 right-padded
    labels[3, 9:] = -100
    sample_index = torch.arange(4)[:, None].expand(4, 12).clone()
    sample_index[3, 9:] = -1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "sample_index": sample_index}


def _captured(rule):
    m = SelectiveLM(model_config=TINY, selector=QTuningSelection(rule=rule), kernels="torch")
    seen = {}
    orig = m.selector.triage
    m.selector.triage = lambda st: seen.setdefault("stats", st) and orig(st)
    batch = _batch()
    m.selective_step(batch)
    return m, batch, seen["stats"]


def test_code_rule_entropy_spans_prompt_and_answer():
    m, batch, st = _captured("code")
    span = st.extras["score_entropy_mask"]
    want_span = batch["attention_mask"].bool().clone()
    want_span[:, 0] = False
    assert torch.equal(span, want_span)
    with torch.no_grad():
        logits = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), -1)
    ent = -(logp.exp() * logp).sum(-1)          # entropy of the prediction made at t - 1, for position t
    want = torch.zeros_like(st.score_entropy)
    want[:, 1:] = ent[:, :-1]
    torch.testing.assert_close(st.score_entropy[span], want[span], rtol=1e-4, atol=1e-4)
    assert (st.score_loss[~st.valid] == 0).all()  # the loss stays on the answer tokens
    _, mean_ent, _ = QTuningSelection.sample_stats(st, span)
    torch.testing.assert_close(mean_ent, (want * span).sum(1) / span.sum(1), rtol=1e-4, atol=1e-4)


def test_paper_rule_entropy_spans_the_answer_only():
    _, _, st = _captured("paper")
    assert "score_entropy_mask" not in st.extras
    assert (st.score_entropy[:, :5] == 0).all() and (st.score_entropy[st.valid] > 0).all()
