"""Every architecture through one set of checks: B=0 equals base, only adapters train, loss drops."""

from __future__ import annotations

import pytest
import torch

import surgeon
from tests.conftest import ARCHS, batch, make_base

SHAPES = [(1, 1), (1, 7), (3, 17)]


def make_peft(name: str, **overrides):
    base = make_base(name)
    _, targets, task = ARCHS[name]
    config = surgeon.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task, **overrides)
    return base, surgeon.get_peft_model(base, config)


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    name = request.param
    reference = make_base(name).eval()  # an untouched twin with the same weights
    base, model = make_peft(name, lora_dropout=0.1)
    return name, reference, model


def test_zero_b_equals_base_exactly(arch):
    name, reference, model = arch
    model.eval()
    for b, s in SHAPES:
        inputs = {k: v for k, v in batch(name, b, s, pad_left=min(2, s - 1)).items() if k != "labels"}
        with torch.no_grad():
            ours, theirs = model(**inputs).logits, reference(**inputs).logits
        assert ours.shape == theirs.shape
        assert torch.equal(ours, theirs), f"{name} {b}x{s}: max diff {(ours - theirs).abs().max()}"


def test_output_class_and_loss_match_base(arch):
    name, reference, model = arch
    model.eval()
    inputs = batch(name)
    with torch.no_grad():
        ours, theirs = model(**inputs), reference(**inputs)
    assert type(ours) is type(theirs)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-6)


def test_gradients_only_on_adapters(arch):
    name, _, model = arch
    model.train()
    model(**batch(name)).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("surgeon_lora" in n or "surgeon_saved" in n) for n in trainable), trainable
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    model.zero_grad(set_to_none=True)


def test_dropout_follows_train_and_eval(arch):
    name, _, model = arch
    inputs = {k: v for k, v in batch(name).items() if k != "labels"}
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        a = model(**inputs).logits
        torch.manual_seed(1)
        b = model(**inputs).logits
        model.eval()
        c, d = model(**inputs).logits, model(**inputs).logits
    assert torch.equal(c, d)
    if name in ("gpt2", "opt", "bert"):  # configs with dropout > 0
        assert not torch.equal(a, b)


@pytest.mark.parametrize("name", list(ARCHS))
def test_a_few_steps_lower_the_loss(name):
    _, model = make_peft(name)
    inputs = batch(name, b=4, s=12)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
