"""The capture cache on disk (surgeon/capturing/store.py): a new process that wraps the same architecture
builds its graph from the cache instead of running ``torch.export``, and computes what a fresh capture
computes (within 1e-6: the same ops on the same tensors; CPU matmuls may round differently run to run); anything that could change the graph (config, attention implementation, the model's
source) is a new entry; a damaged or foreign entry is ignored, never trusted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

import surgeon
from surgeon.capturing import capture, trace

from conftest import COMMON, V, batch, make_base

TESTS = Path(__file__).parent


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A fresh cache folder, no in-process templates, and a count of torch.export calls."""
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(trace, "_TEMPLATES", {})
    calls = []
    real = torch.export.export

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    return tmp_path / "cache" / "capture", calls


def _fresh_process():
    trace._TEMPLATES.clear()  # what a new process has: nothing in memory, only the files


SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    calls = []
    real = torch.export.export
    torch.export.export = lambda *a, **k: calls.append(1) or real(*a, **k)
    import surgeon
    from conftest import batch, make_base
    model = surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    out = model(**batch("llama"))
    out.loss.backward()
    grads = [p.grad.flatten().tolist() for p in model.parameters() if p.requires_grad]
    print(json.dumps({{"exports": len(calls), "loss": out.loss.item(), "grads": grads}}))
""")


def test_a_new_process_skips_torch_export(tmp_path):
    env = {"SURGEON_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(TESTS))], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["exports"] == 1 and runs[1]["exports"] == 0
    assert abs(runs[0]["loss"] - runs[1]["loss"]) <= 1e-6
    assert max(abs(a - b) for ga, gb in zip(runs[0]["grads"], runs[1]["grads"]) for a, b in zip(ga, gb)) <= 1e-7
    assert len(list((tmp_path / "cache" / "capture").glob("*.json"))) == 1


@pytest.mark.parametrize("name", ["gpt2", "llama", "phi3", "bert"])
def test_cached_graph_equals_a_fresh_capture(cache, name):
    folder, calls = cache
    base = make_base(name)
    fresh = capture(base)
    _fresh_process()
    loaded = capture(make_base(name))  # a second model object of the same structure
    assert len(calls) == 1 and len(list(folder.glob("*.json"))) == 1
    b = {k: v for k, v in batch(name).items() if k != "labels"} | ({} if name == "bert" else {"use_cache": False})
    with torch.no_grad():
        want, got = fresh.eval()(**b), loaded.eval()(**b)
    assert (want.logits - got.logits).abs().max().item() <= 1e-6
    # torch.export's input guards are kept: graph nodes now, with torch's own message
    with pytest.raises(AssertionError, match=r"Guard failed: attention_mask.size\(\)\[1\] == input_ids.size\(\)\[1\]"):
        loaded(**(b | {"attention_mask": b["attention_mask"][:, :-1]}))


def _llama(**overrides):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **{**COMMON, **overrides}))


def test_a_changed_model_never_gets_a_stale_graph(cache, tmp_path, monkeypatch):
    folder, calls = cache
    last = None
    ids = torch.randint(0, V, (2, 9))
    capture(_llama())
    variants = {"rms_norm_eps": _llama(rms_norm_eps=0.3), "rope_theta": _llama(rope_parameters={"rope_type": "default", "rope_theta": 7.0}),
                "eager attention": _llama(attn_implementation="eager")}
    for what, model in variants.items():
        _fresh_process()
        before = len(calls)
        graph = capture(model.eval()).eval()
        assert len(calls) == before + 1, f"{what}: served from the cache"
        with torch.no_grad():
            assert (graph(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
                    - model(input_ids=ids, use_cache=False).logits).abs().max().item() <= 1e-6, what
    # the model's own source changed (same module, class name and config): a new entry too
    source = tmp_path / "mymodel.py"
    for factor in (2.0, 3.0, 3.0):
        source.write_text(textwrap.dedent(f"""
            import transformers
            class Scaled(transformers.LlamaForCausalLM):
                def forward(self, input_ids=None, attention_mask=None, use_cache=None):
                    out = super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)
                    out.logits = out.logits * {factor}
                    return out
        """))
        spec = importlib.util.spec_from_file_location("mymodel", source)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "mymodel", module)
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        model = module.Scaled(_llama().config)
        _fresh_process()
        before = len(calls)
        graph = capture(model.eval()).eval()
        assert len(calls) == before + (0 if factor == last else 1)  # the same source twice: the entry is reused
        last = factor
        with torch.no_grad():
            assert (graph(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
                    - model(input_ids=ids, use_cache=False).logits).abs().max().item() <= 1e-6


def test_a_class_without_source_is_never_cached(cache):
    folder, calls = cache
    namespace = {}
    exec("import transformers\nclass Hidden(transformers.LlamaForCausalLM):\n    pass\n", namespace)  # no file
    for _ in range(2):
        _fresh_process()
        torch.manual_seed(0)
        capture(namespace["Hidden"](_llama().config))
    assert len(calls) == 2 and not list(folder.glob("*.json"))


@pytest.mark.parametrize("damage", ["truncated", "foreign function", "foreign op", "wrong format"])
def test_a_damaged_or_foreign_entry_is_ignored_and_replaced(cache, damage):
    folder, calls = cache
    base = make_base("llama")
    want = capture(base)
    (entry,) = folder.glob("*.json")
    doc = json.loads(entry.read_text())
    calls_node = next(n for n in doc["nodes"] if n["op"] == "call_function" and "op" in n["target"])
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:1000])
    else:
        if damage == "foreign function":
            calls_node["target"] = {"py": "builtins.print"}
        elif damage == "foreign op":
            calls_node["target"] = {"op": "os::system", "overload": "default"}
        else:
            doc["format"] = 999
        entry.write_text(json.dumps(doc))
    _fresh_process()
    before = len(calls)
    graph = capture(make_base("llama"))
    assert len(calls) == before + 1  # captured again, the entry not trusted
    b = {k: v for k, v in batch("llama").items() if k != "labels"}
    with torch.no_grad():
        assert (graph.eval()(**b, use_cache=False).logits - want.eval()(**b, use_cache=False).logits).abs().max() <= 1e-6
    assert json.loads(entry.read_text())["format"] == 1  # rewritten whole


def test_cache_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE_DIR", "off")
    monkeypatch.setattr(trace, "_TEMPLATES", {})
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    surgeon.get_peft_model(make_base("gpt2"), surgeon.LoraConfig(target_modules=["c_attn"]))
    assert not any(tmp_path.rglob("*.json"))
