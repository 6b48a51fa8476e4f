"""T5 (encoder-decoder), best effort: capture, B=0 equals base, and PEFT's loss curve with labels only."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from transformers import T5Config, T5ForConditionalGeneration

import surgeon

CONFIG = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
              pad_token_id=0, dropout_rate=0.0)


def t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(**CONFIG))


def test_t5_zero_b_equals_base_and_loss_equals_peft():
    ours = surgeon.get_peft_model(t5(), surgeon.LoraConfig(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    theirs = peft.get_peft_model(t5(), peft.LoraConfig(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    ids, dec = torch.randint(1, 96, (2, 7)), torch.randint(1, 96, (2, 5))
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids, decoder_input_ids=dec).logits, t5().eval()(input_ids=ids, decoder_input_ids=dec).logits)
        own = ours.state_dict(keep_vars=True)
        for key, value in get_peft_model_state_dict(theirs).items():
            own[key].copy_(value)
    labels = torch.randint(1, 96, (2, 5))
    curves = []
    for model in (ours, theirs):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for _ in range(4):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[0] == pytest.approx(curves[1], abs=1e-5)
