"""The exact rewrites on by default (surgeon/model/forward.py): causal attention without a mask when nothing
is padded, and the loss with the head applied in chunks. Each is checked against the plain graph
(``model.fast_paths = False``): the loss within 1e-5 and every adapter gradient within 1e-6 (fp32), on
several architectures, with and without padding, at two shapes."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.loss.loss_utils import ForCausalLMLoss

import surgeon
from surgeon.capturing.dropout import AttentionDropout
from surgeon.errors import AdapterError
from surgeon.model import chunked_loss
from surgeon.model.chunked_loss import chunked_causal_lm_loss
from surgeon.passes.attention import causal_attention
from surgeon.passes.head import Head

from conftest import ARCHS, V, batch, make_base

CAUSAL_ARCHS = ["gpt2", "llama", "qwen2", "opt", "phi3"]


def _model(name: str, **lora):
    torch.manual_seed(0)
    model = surgeon.get_peft_model(make_base(name), surgeon.LoraConfig(
        task_type=ARCHS[name][2], target_modules=lora.pop("target_modules", ARCHS[name][1]), init_lora_weights=False, **lora))
    return model.train()


def _loss_and_grads(model, inputs, fast: bool):
    model.fast_paths = fast
    torch.manual_seed(7)  # same dropout masks in both runs
    out = model(**inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, params)


def _causal_sites(graph) -> int:
    count = 0
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.kwargs.get("is_causal"):
            count += 1
        elif node.op == "call_module" and isinstance(graph.get_submodule(node.target), AttentionDropout):
            count += graph.get_submodule(node.target).is_causal
    return count


@pytest.mark.parametrize("name", CAUSAL_ARCHS + ["bert"])
@pytest.mark.parametrize("pad_left,b,s", [(0, 2, 9), (3, 2, 9), (0, 3, 17), (5, 3, 17)])
def test_fast_paths_equal_the_plain_graph(name, pad_left, b, s):
    model = _model(name)
    inputs = batch(name, b=b, s=s, pad_left=pad_left)
    inputs["labels"] = inputs["labels"].clone()
    if ARCHS[name][2] == "CAUSAL_LM":
        inputs["labels"][1, :2] = -100  # ignored positions
    plain, plain_grads = _loss_and_grads(model, inputs, fast=False)
    fast, fast_grads = _loss_and_grads(model, inputs, fast=True)
    assert abs(plain.loss.item() - fast.loss.item()) <= 1e-5
    assert max((a - c).abs().max().item() for a, c in zip(plain_grads, fast_grads)) <= 1e-6
    if name == "bert":  # a bidirectional mask: the causal pass refuses, no head is cut, logits are returned
        assert all(_causal_sites(g) == 0 and h is None for g, h in model.graphs.derived.values())
        assert len(model.graphs.derived) == (pad_left == 0) and fast.logits is not None
    else:
        ((_, causal, _), (graph, head)), = model.graphs.derived.items()
        assert causal == (pad_left == 0)
        assert _causal_sites(graph) == (2 if causal else 0)  # one per layer, so the rewrite really ran
        assert head is not None and fast.logits is None and plain.logits is not None


def test_logits_when_asked_and_in_eval():
    model = _model("llama")
    inputs = batch("llama")
    plain = model(**inputs, skip_logits=False)
    assert plain.logits is not None and plain.logits.shape == (2, 9, V)
    model.fast_paths = False
    reference = model(**inputs)
    model.fast_paths = True
    torch.testing.assert_close(plain.logits, reference.logits, atol=1e-5, rtol=0)
    model.eval()
    out = model(**inputs)
    assert out.logits is not None and abs(out.loss.item() - reference.loss.item()) <= 1e-5
    assert model(**inputs, skip_logits=True).logits is None  # chunked in eval too, when asked
    model.fast_paths = False
    with pytest.raises(ValueError, match="skip_logits=True needs model.fast_paths"):
        model(**inputs, skip_logits=True)


def test_trainable_or_adapted_head_keeps_the_full_logits():
    model = _model("llama", target_modules=["q_proj", "lm_head"])
    out = model(**batch("llama"))
    assert out.logits is not None  # the head has an adapter: no chunked loss, the plain loss
    ((_, (_, head)),) = model.graphs.derived.items()
    assert head is None


def test_a_head_unfrozen_later_gets_the_full_loss():
    model = _model("llama")
    inputs = batch("llama")
    assert model(**inputs).logits is None
    model.base.lm_head.weight.requires_grad_(True)
    out = model(**inputs)  # the head's gradient needs the full logits: the plain loss, no error
    out.loss.backward()
    assert out.logits is not None and model.base.lm_head.weight.grad is not None
    model.fast_paths = False
    assert abs(model(**inputs).loss.item() - out.loss.item()) <= 1e-5


def test_sliding_window_and_position_ids_take_the_masked_path():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=V, num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                      intermediate_size=64, max_position_embeddings=64, num_key_value_heads=2,
                                      use_sliding_window=True, sliding_window=4)
    model = surgeon.get_peft_model(transformers.Qwen2ForCausalLM(config), surgeon.LoraConfig(target_modules=["q_proj"]))
    model(**batch("qwen2"))
    ((_, (graph, _)),) = model.graphs.derived.items()
    assert _causal_sites(graph) == 0
    assert causal_attention(next(iter(model.graphs)), config) is None

    llama = _model("llama")
    inputs = batch("llama")
    llama(**inputs, position_ids=torch.arange(9).expand(2, 9))
    assert all(not causal for (_, causal, _) in llama.graphs.derived)


@pytest.mark.parametrize("vocab,n_items,dtype", [(V, None, torch.float32), (1000, 7, torch.float32),
                                                 (1000, torch.tensor(11), torch.float32), (1000, None, torch.bfloat16)])
def test_chunked_loss_equals_transformers(vocab, n_items, dtype, monkeypatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", vocab * 3)  # several chunks, the last one short
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g).to(dtype).requires_grad_(True)
    weight, bias = (torch.randn(vocab, 16, generator=g) * 0.2).to(dtype), (torch.randn(vocab, generator=g) * 0.1).to(dtype)
    labels = torch.randint(0, vocab, (2, 9), generator=g)
    labels[0, :4] = -100
    reference = ForCausalLMLoss(torch.nn.functional.linear(hidden, weight, bias), labels, vocab, n_items)
    (want,) = torch.autograd.grad(reference * 2, hidden)
    loss = chunked_causal_lm_loss(hidden, Head(weight, bias), labels, n_items)
    (got,) = torch.autograd.grad(loss * 2, hidden)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(loss.item() - reference.item()) <= tol
    assert (got.float() - want.float()).abs().max().item() <= tol / 10


def test_chunked_loss_refuses_bad_labels_and_a_trainable_head():
    hidden, weight = torch.randn(1, 4, 8), torch.randn(10, 8)
    with pytest.raises(AdapterError, match=r"token ids must be in \[0, 10\)"):
        chunked_causal_lm_loss(hidden, Head(weight, None), torch.tensor([[1, 2, 10, 3]]))
    with pytest.raises(AdapterError, match="trainable"):
        chunked_causal_lm_loss(hidden, Head(weight.requires_grad_(True), None), torch.tensor([[1, 2, 3, 4]]))
