"""Shared tiny models: real transformers architectures from small configs, seeded random init."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

os.environ["HF_HUB_OFFLINE"] = "1"
if "SURGEON_CACHE_DIR" not in os.environ:  # the capture cache of this test run (never the user's ~/.cache)
    os.environ["SURGEON_CACHE_DIR"] = tempfile.mkdtemp(prefix="surgeon-test-cache-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
import transformers

transformers.logging.set_verbosity_error()
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each, no contention
    torch.set_num_threads(1)

V = 96  # vocabulary of every tiny model
COMMON = dict(vocab_size=V, num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
              max_position_embeddings=64)


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_layer=2, n_head=4, n_embd=32, n_positions=64,
                                                                bos_token_id=0, eos_token_id=0))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, bos_token_id=0, eos_token_id=1, **COMMON))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, bos_token_id=0, eos_token_id=1, **COMMON))


def _opt():
    c = dict(COMMON)
    c["ffn_dim"] = c.pop("intermediate_size")
    return transformers.OPTForCausalLM(transformers.OPTConfig(word_embed_proj_dim=32, pad_token_id=1, bos_token_id=0, eos_token_id=2, **c))


def _phi3():
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, **COMMON))


def _bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, pad_token_id=0, **COMMON))


# name -> (factory, target_modules, task_type)
ARCHS = {
    "gpt2": (_gpt2, ["c_attn", "c_proj"], "CAUSAL_LM"),
    "llama": (_llama, ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM"),
    "qwen2": (_qwen2, ["q_proj", "k_proj", "o_proj"], "CAUSAL_LM"),
    "opt": (_opt, ["q_proj", "v_proj", "fc1"], "CAUSAL_LM"),
    "phi3": (_phi3, ["qkv_proj", "gate_up_proj"], "CAUSAL_LM"),
    "bert": (_bert, ["query", "value"], "SEQ_CLS"),
}


def make_base(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHS[name][0]()


def batch(name: str, b: int = 2, s: int = 9, seed: int = 1, pad_left: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if pad_left:
        mask[0, :pad_left] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    out["labels"] = torch.randint(0, 3, (b,), generator=g) if ARCHS[name][2] == "SEQ_CLS" else ids.clone()
    return out


def loss_curve(model, name: str, steps: int = 10, lr: float = 1e-2, **batch_kw) -> list[float]:
    """AdamW on the trainable tensors, one seeded batch per step; the losses. Seeded first, so two tools draw the
    same dropout masks."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    curve = []
    for step in range(steps):
        loss = model(**batch(name, b=3, s=10, seed=step, **batch_kw)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        curve.append(loss.item())
    return curve


def seeded(model, **kw):
    """``model(**kw)`` after seeding: the base's own dropout (GPT-2's) draws the same masks in both tools."""
    torch.manual_seed(5)
    return model(**kw)


@pytest.fixture(scope="session")
def tmp_session(tmp_path_factory):
    return tmp_path_factory.mktemp("session")


class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, **subprocess_kw) -> CliResult:
    """``surgeon ARGS...``: in this process through click's runner (exit code, stdout, stderr as the shell sees
    them), or as a real ``python -m surgeon.cli`` child when it needs process settings (``preexec_fn``: rlimits).
    A few tests keep real children on purpose: signals, the entry point, exit codes through ``sys.exit``."""
    if subprocess_kw:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-m", "surgeon.cli", *map(str, args)], capture_output=True, text=True,
                              env=env, **subprocess_kw)
        return CliResult(done.returncode, done.stdout, done.stderr)
    from click.testing import CliRunner

    from surgeon.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return CliResult(result.exit_code, result.stdout, result.stderr)


# ---- clients in their own environments (onnxruntime-genai, optimum): tools/clients.py, driven in a subprocess ----
ROOT = Path(__file__).resolve().parents[1]


def client_python(name: str):
    """The python of client ``name``'s venv (built from tools/clients/<name>.lock on first use, then cached)."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "clients.py"), "ensure", name], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.fail(f"the {name} environment could not be built:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def run_client(python: str, *args, **kw) -> subprocess.CompletedProcess:
    """``python ARGS...`` in a client venv, offline, with one thread: the output, or a failure showing its stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the client sees only its own venv
    done = subprocess.run([python, *map(str, args)], capture_output=True, text=True, env=env, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="session")
def genai():
    """``genai(export_dir, prompts, adapters, n)``: onnxruntime-genai's greedy new tokens per adapter (None: the base),
    through examples/genai_generate.py in .venv-genai; prompts are token-id lists (genai pads them itself)."""
    import json

    python = client_python("genai")

    def run(export_dir, prompts: list[list[int]], adapters=(None,), n: int = 8) -> dict:
        args = [ROOT / "examples" / "genai_generate.py", export_dir, "--json", "--threads", 1, "-n", n,
                "--prompt-ids", json.dumps(prompts)]
        args += ["--base"] if None in adapters else []
        for name in adapters:
            args += ["--adapter", name] if name is not None else []
        lines = run_client(python, *args).stdout.splitlines()
        return {row["adapter"]: row["new_tokens"] for row in map(json.loads, lines)}

    return run


def session_new_tokens(session, prompts: list[list[int]], adapter, n: int, pad: int) -> list[list[int]]:
    """``AdapterSession.generate``'s new tokens for prompts of any lengths (left-padded into one batch)."""
    import numpy as np

    width = max(map(len, prompts))
    ids = np.array([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    return session.generate(ids, mask, adapter=adapter, max_new_tokens=n, pad_token_id=pad)[:, width:].tolist()


def until_eos(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    """Each row up to (not including) its first end-of-sequence token: genai stops there, surgeon pads after it."""
    out = []
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        out.append(list(row[:cut]))
    return out


def genai_equals_session(genai, export_dir, adapters) -> dict:
    """onnxruntime-genai's greedy tokens for two prompts against ``AdapterSession.generate``'s, per adapter (None:
    the base); returns ours by adapter."""
    from surgeon.onnx.runtime import AdapterSession

    session = AdapterSession(export_dir)
    eos = set(session.generation["eos_token_id"])
    pad = session.generation["pad_token_id"]
    pad = pad if pad is not None else min(eos)
    prompts = [[5, 9, 11, 3], [7, 2, 8, 8, 30, 4]]
    got = genai(export_dir, prompts, adapters=adapters, n=8)
    want = {a: until_eos(session_new_tokens(session, prompts, a, 8, pad), eos) for a in adapters}
    assert {a: until_eos(got[a], eos) for a in want} == want
    return want


def assert_export_matches_torch(root, model, name: str, adapters, input_suffix: str) -> None:
    """``root/onnx`` (a KV-cache export of ``model``) equals torch within 1e-4 at two shapes, with left padding, for
    each adapter in turn (None: the base); greedy generation equals torch's and ``root/merged``'s (the first
    adapter folded). ``input_suffix`` names the method's graph inputs (``.dora_scale``, ``.ia3_l``)."""
    import numpy as np

    from surgeon.onnx.decoding import empty_past
    from surgeon.onnx.runtime import AdapterSession

    session = AdapterSession(root / "onnx")
    assert any(i.endswith(input_suffix) for i in session.lora_inputs)
    for b, s in ((1, 5), (3, 9)):
        x = {k: v for k, v in batch(name, b=b, s=s, seed=b + s, pad_left=2 if b > 1 else 0).items() if k != "labels"}
        x["use_cache"] = False
        feeds = {"input_ids": x["input_ids"].numpy(), "attention_mask": x["attention_mask"].numpy()}
        feeds["position_ids"] = np.maximum(np.cumsum(feeds["attention_mask"], axis=1) - 1, 0)
        for adapter in adapters:
            got = session.run({**feeds, **empty_past(session.generation, b)}, adapter=adapter)["logits"]
            with torch.no_grad():
                if adapter is None:
                    with model.disable_adapter():
                        want = model(**x, position_ids=torch.from_numpy(feeds["position_ids"])).logits.numpy()
                else:
                    model.set_adapter(adapter)
                    want = model(**x, position_ids=torch.from_numpy(feeds["position_ids"])).logits.numpy()
            real = feeds["attention_mask"].astype(bool)
            assert np.abs(got - want)[real].max() <= 1e-4, (b, s, adapter)
    first = next(a for a in adapters if a is not None)
    model.set_adapter(first)
    ids = batch(name, b=2, s=6)["input_ids"].numpy()
    tuned = session.generate(ids, adapter=first, max_new_tokens=6, eos_token_id=[])
    assert (AdapterSession(root / "merged").generate(ids, max_new_tokens=6, eos_token_id=[]) == tuned).all()
    with torch.no_grad():
        want = model.generate(input_ids=torch.from_numpy(ids), max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert (tuned == want.numpy()).all()


def assert_check_catches(root) -> None:
    """``surgeon check`` passes on ``root/onnx`` and ``root/merged`` and fails with ``root/altered`` as the adapter."""
    ok = run_cli("check", root / "onnx")
    assert ok.returncode == 0, ok.stdout
    bad = run_cli("check", root / "onnx", "--adapter", f"default={root / 'altered'}")
    assert bad.returncode == 1 and "FAIL  adapter[default]_vs_torch" in bad.stdout, bad.stdout
    assert run_cli("check", root / "merged").returncode == 0


def files_both_ways(theirs, name: str, tmp_path, inputs: dict):
    """PEFT saves, surgeon loads with equal logits (<= 1e-5); surgeon saves, PEFT loads with equal logits. Returns
    (surgeon's loaded model, PEFT's reloaded one) for the caller's checks of the configs."""
    import peft

    import surgeon

    theirs.eval()
    with torch.no_grad():
        want = theirs(**inputs).logits
    theirs.save_pretrained(tmp_path / "peft")
    loaded = surgeon.PeftModel.from_pretrained(make_base(name), tmp_path / "peft").eval()
    loaded.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make_base(name), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (loaded(**inputs).logits - want).abs().max() <= 1e-5
        assert (back(**inputs).logits - want).abs().max() <= 1e-5
    return loaded, back
