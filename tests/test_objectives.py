"""The objectives (train/objectives.py) against hand-written formulas on a tiny PEFT model, in-process and fast:
DPO's reference is the model with its adapters off (honoured by shardtune's fused LoRA layers), cDPO's label
smoothing, ORPO's two NLL variants, packed batches equal padded ones, and micro-batch shares that add up to the
step's mean over pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from shardtune.config import Config, ObjectiveConfig, apply_overrides
from shardtune.data.formats import IGNORE_INDEX, RowFormatter, encode
from shardtune.data.loader import collate
from shardtune.kernels.fused_lora import FusedLinear
from shardtune.model import modeling
from shardtune.model.tokenizer import build_tiny_tokenizer, prepare_tokenizer
from shardtune.train.objectives import DPO, ORPO, SFT, log1mexp, objective_for

PAIRS = [
    {"prompt": "Sort the letters: c a b\n", "chosen": "a b c", "rejected": "a c b"},
    {"prompt": "Reverse the letters: a b c d\n", "chosen": "d c b a", "rejected": "d b c a"},
    {"prompt": "Sort: b a\n", "chosen": "a b", "rejected": "b a and more"},
]


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(build_tiny_tokenizer(), None, None)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    hf = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
    )
    base = LlamaForCausalLM(hf).float()
    cfg = apply_overrides(Config(), {"lora.r": "4"}, "test")
    peft = get_peft_model(base, modeling.lora_config(cfg))  # shardtune's fused LoRA layers
    with torch.no_grad():  # B = 0 at init: random, so that the policy differs from the reference
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    return peft


def batch_of(tok, packed=False):
    enc = encode(RowFormatter("preference", tok, "pairs"), PAIRS, max_len=128, append_eos=True)
    batch = collate(enc.sequences(list(range(len(PAIRS)))), tok.pad_token_id, packed)
    return batch


def hand_logps(model, batch, targets=None):
    """Per-sequence summed log-probs and counts by log_softmax + gather, padded batches."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"] if targets is None else targets
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    mask = (labels != IGNORE_INDEX).float()
    return (logp * mask).sum(-1), mask.sum(-1)


def test_fused_lora_layers_honour_disable_adapter(model, tok):
    batch = batch_of(tok)
    assert any(isinstance(m, FusedLinear) for m in model.modules())
    with torch.no_grad():
        on = model(input_ids=batch["input_ids"]).logits
        with model.disable_adapter():
            off = model(input_ids=batch["input_ids"]).logits
        base = model.get_base_model()
        bare = {n: p for n, p in base.named_parameters() if "lora_" not in n}
        assert bare  # the base's own weights
    assert not torch.allclose(on, off)
    # adapters off: the base layers alone (lora_B zeroed gives the same logits)
    saved = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
        zero = model(input_ids=batch["input_ids"]).logits
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    assert torch.allclose(off, zero, atol=1e-6)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # restored after


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dpo_is_the_sigmoid_loss_against_the_adapters_off(model, tok, smoothing):
    batch = batch_of(tok)
    beta = 0.3
    dpo = DPO(beta, smoothing, model.disable_adapter)
    sums = dpo.sums(model, batch)
    totals = dpo.counts(batch)
    m = dpo.metrics({k: v.item() for k, v in sums.items()}, totals)
    with torch.no_grad():
        pol, _ = hand_logps(model, batch)
        with model.disable_adapter():
            ref, _ = hand_logps(model, batch)
    n = len(PAIRS)
    cr, rr = beta * (pol[:n] - ref[:n]), beta * (pol[n:] - ref[n:])
    d = cr - rr
    e = smoothing
    loss = (-(1 - e) * F.logsigmoid(d) - e * F.logsigmoid(-d)).mean()
    assert totals == {"pairs": 3}
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert m["rewards/chosen"] == pytest.approx(cr.mean().item(), rel=1e-4)
    assert m["rewards/margins"] == pytest.approx(d.mean().item(), rel=1e-4)
    assert m["rewards/accuracies"] == pytest.approx((cr > rr).float().mean().item())
    assert m["logps/rejected"] == pytest.approx(pol[n:].mean().item(), rel=1e-5)
    assert dpo.share(sums, totals).requires_grad


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_orpo_is_nll_minus_beta_log_sigmoid_of_the_log_odds_ratio(model, tok, nll_on_prompt):
    batch = batch_of(tok)
    beta = 0.2
    orpo = ORPO(beta, nll_on_prompt)
    sums, totals = orpo.sums(model, batch), orpo.counts(batch)
    m = orpo.metrics({k: v.item() for k, v in sums.items()}, totals)
    n = len(PAIRS)
    with torch.no_grad():
        lp, count = hand_logps(model, batch)
        avg = lp / count
        if nll_on_prompt:
            full = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            targets = torch.full_like(full, IGNORE_INDEX)
            targets[:, :-1] = full[:, 1:]
            nll_sum, nll_count = hand_logps(model, batch, targets)
            nll = -nll_sum[:n].sum() / nll_count[:n].sum()
        else:
            nll = -lp[:n].sum() / count[:n].sum()
    c, r = avg[:n], avg[n:]
    log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    loss = nll - beta * F.logsigmoid(log_odds).mean()
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert m["nll_loss"] == pytest.approx(nll.item(), rel=1e-5)
    assert m["rewards/chosen"] == pytest.approx(beta * c.mean().item(), rel=1e-5)
    assert m["log_odds_chosen"] == pytest.approx(log_odds.mean().item(), rel=1e-4)
    share = orpo.share(sums, totals)
    assert share.item() == pytest.approx(loss.item(), rel=1e-5)


def test_log1mexp_is_accurate_on_both_sides():
    x = torch.tensor([-1e-6, -0.5, -0.7, -5.0, -40.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-9)


@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_packed_pairs_give_the_padded_sums(model, tok, name):
    """With data.packing the pair's sequences lie end to end in one row: the same per-sequence sums."""
    obj = objective_for(ObjectiveConfig(name=name, nll_on_prompt=True), reference=model.disable_adapter)
    padded, packed = batch_of(tok), batch_of(tok, packed=True)
    assert obj.counts(padded) == obj.counts(packed)
    a = {k: v.item() for k, v in obj.sums(model, padded).items()}
    b = {k: v.item() for k, v in obj.sums(model, packed).items()}
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6) for k in a)


def test_micro_batch_shares_add_up_to_the_steps_mean(model, tok):
    """The step divides each micro-batch's sum by the step's count: two micro-batches give the one batch's
    loss and gradient (the mean over all pairs, not a mean of means)."""
    enc = encode(RowFormatter("preference", tok, "pairs"), PAIRS, max_len=128, append_eos=True)
    for obj in (DPO(0.5, 0.0, model.disable_adapter), ORPO(0.5)):
        parts = [collate(enc.sequences(rows), tok.pad_token_id) for rows in ([0], [1, 2])]
        whole = collate(enc.sequences([0, 1, 2]), tok.pad_token_id)
        totals = {k: sum(obj.counts(b)[k] for b in parts) for k in obj.counts(whole)}
        assert totals == obj.counts(whole)
        split = sum(obj.share(obj.sums(model, b), totals) for b in parts)
        one = obj.share(obj.sums(model, whole), totals)
        assert split.item() == pytest.approx(one.item(), rel=1e-5)


def test_sft_is_the_token_mean(model, tok):
    sft = SFT()
    enc = encode(
        RowFormatter("prompt_completion", tok, "x"), [{"prompt": "a", "completion": "b c"}], 64, True
    )
    batch = collate(enc.sequences([0]), tok.pad_token_id)
    sums, totals = sft.sums(model, batch), sft.counts(batch)
    assert totals == {"label_tokens": int((batch["labels"] != IGNORE_INDEX).sum())}
    m = sft.metrics({"loss": sums["loss"].item()}, totals, eval=True)
    assert m["eval_loss"] == pytest.approx(sums["loss"].item() / totals["label_tokens"])
