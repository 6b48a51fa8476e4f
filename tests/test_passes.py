"""Passes return new graphs and never edit what they were given; fold remembers exactly what it added.

Tolerances: exact (``torch.equal``) for restored weights while nothing wrote to them; fp32 1e-5 max-abs on logits.
"""

from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.graphs import graphs_of
from surgeon.layers import LoraLayer, SavedTensor
from surgeon.passes.inputs import InputFeed, lora_as_inputs
from tests.conftest import ARCHS, batch, make_base


def snapshot(gm) -> dict:
    """Everything a pass could edit in place: code, meta keys, the module tree, adapter tables, tensor identities."""
    modules = {}
    for name, m in gm.named_modules():
        entry = (type(m).__name__, id(m))
        if isinstance(m, LoraLayer):
            entry += (tuple((n, id(a)) for n, a in m.adapters.items()), m.active, m.merged, m.enabled)
        elif isinstance(m, SavedTensor):
            entry += (tuple((n, id(c)) for n, c in m.copies.items()), m.active, m.enabled)
        modules[name] = entry
    tensors = {n: (id(t), t._version, float(t.detach().double().sum()))
               for n, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]}
    return {"code": [sub.code for _, sub in graphs_of(gm)], "meta": sorted(gm.meta), "modules": modules,
            "tensors": tensors, "training": gm.training}


def config(name, **extra):
    _, targets, task = ARCHS[name]
    return surgeon.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task, init_lora_weights=False, **extra)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_every_pass_leaves_its_input_and_its_modules_unchanged(name):
    torch.manual_seed(0)
    base = make_base(name)
    g0 = surgeon.capture(base)
    steps = [("inject a", lambda g: surgeon.inject_lora(g, config(name), "a"))]
    _, targets, _ = ARCHS[name]
    second = config(name) if name != "bert" else config(name, modules_to_save=["classifier"])
    steps += [("inject b", lambda g: surgeon.inject_lora(g, second, "b")),
              ("fold", surgeon.fold), ("unfold", surgeon.unfold)]
    graph = g0
    for label, run in steps:
        before = snapshot(graph)
        new = run(graph)
        assert snapshot(graph) == before, f"{label} edited its input graph"
        assert new is not graph
        graph = new
    injected = surgeon.inject_lora(surgeon.inject_lora(g0, config(name), "a"), second, "b")
    before = snapshot(injected)
    lora_as_inputs(injected, InputFeed())
    assert snapshot(injected) == before, "lora_as_inputs edited its input graph"
    layers_a = [m for m in injected.modules() if isinstance(m, LoraLayer)]
    assert layers_a and all(set(m.adapters) == {"a", "b"} for m in layers_a)


def test_injecting_into_an_injected_graph_keeps_the_old_graphs_outputs():
    torch.manual_seed(0)
    base = make_base("llama")
    x = {k: v for k, v in batch("llama").items() if k != "labels"}
    x["use_cache"] = False
    g1 = surgeon.inject_lora(surgeon.capture(base, x), config("llama"), "a")
    with torch.no_grad():
        before = g1(**x).logits
        g2 = surgeon.inject_lora(g1, config("llama"), "b")
        for layer in (m for m in g2.modules() if isinstance(m, LoraLayer)):
            layer.active = ("b",)  # activating b in the new graph must not reach the old one
        assert torch.equal(g1(**x).logits, before)
        assert not torch.allclose(g2(**x).logits, before)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_unfold_after_training_restores_the_weights_bit_for_bit(name):
    torch.manual_seed(0)
    model = surgeon.get_peft_model(make_base(name), config(name))
    x = {k: v for k, v in batch(name).items() if k != "labels"}
    x["use_cache"] = False
    graph = model.graph_for(**x)
    weights = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    folded = surgeon.fold(graph)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):  # the adapter moves after the fold
        model.train()
        model(**batch(name)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    unfolded = surgeon.unfold(folded).eval()  # a copy of the graph as it was at the fold: in train mode
    site_weights = [p for n, p in unfolded.named_parameters() if n.endswith("weight")]
    by_value = {n: w for n, w in weights.items()}
    for n, p in unfolded.named_parameters():
        if n in by_value:
            assert torch.equal(p, by_value[n]), f"{n} differs after unfold"
    assert site_weights
    with torch.no_grad():  # and it computes the model as it is now: base + the trained adapter
        assert (unfolded(**x).logits - model(**x).logits).abs().max() <= 1e-5


def test_unmerge_subtracts_what_merge_added_even_if_the_adapter_changed():
    torch.manual_seed(0)
    model = surgeon.get_peft_model(make_base("llama"), config("llama")).eval()
    weights = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    model.merge_adapter()
    with torch.no_grad():  # someone overwrites the merged adapter's tensors (a load, a hotswap)
        for layer in model.adapter_state.lora_layers():
            layer.adapters["default"].lora_B.mul_(3.0)
    model.unmerge_adapter()
    worst = max((p.detach() - weights[n]).abs().max().item() for n, p in model.base.named_parameters())
    assert worst <= 1e-6


def test_a_second_model_of_the_same_structure_reuses_the_trace_with_its_own_tensors():
    import gc
    import weakref

    from surgeon.capturing import trace

    first, second = make_base("gpt2", seed=0), make_base("gpt2", seed=1)
    g1 = surgeon.capture(first)
    exports = trace._export
    calls = []
    trace._export = lambda *a, **k: calls.append(a) or exports(*a, **k)  # count real traces (not a mock: it runs)
    try:
        g2 = surgeon.capture(second)
        other = make_base("gpt2", seed=0)
        other.config.n_positions = 32  # another structure: traced itself
        other.transformer.wpe = torch.nn.Embedding(32, 32)
        g3 = surgeon.capture(other)
    finally:
        trace._export = exports
    assert len(calls) == 1  # only `other`
    assert {id(p) for p in g2.parameters()} == {id(p) for p in second.parameters()}
    x = {k: v for k, v in batch("gpt2").items() if k != "labels"}
    for graph, model in ((g1, first), (g2, second), (g3, other)):
        graph.eval(), model.eval()
        with torch.no_grad():
            assert torch.equal(graph(**x, use_cache=False).logits, model(**x, use_cache=False).logits)
    probe = weakref.ref(first.transformer.h[0].attn.c_attn.weight)
    del first, g1
    gc.collect()
    assert probe() is None, "the structural template keeps the first model's weights alive"
