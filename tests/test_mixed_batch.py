"""Many adapters in one batch: ``adapter_names`` (one adapter per row, ``"__base__"`` for none), as PEFT's, and the
ONNX adapter bank (``export_onnx(..., bank=True)``: each row picks its slot through ``adapter_ids``).

Tolerances: fp32 logits within 1e-5 of PEFT's mixed batch for the same adapter files, and within 1e-5 of the
same row run alone with its adapter active; greedy tokens equal token for token. ONNX Runtime's bank vs torch's
``adapter_names``: <= 1e-4 on the logits of real (unpadded) positions, greedy tokens equal. Adapters have different ranks
(4, 2, 8) and different target sets (the second one targets other modules), on GPT-2 (whose ``addmm`` sites see
batch x sequence rows) and Llama.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import peft
import pytest
import torch

import surgeon
from surgeon.errors import AdapterError
from surgeon.names import ADAPTER_IDS, BANK_FILE
from surgeon.onnx.decoding import empty_past
from surgeon.onnx.export import export_onnx
from surgeon.onnx.runtime import AdapterSession
from surgeon.onnx.writing import write_adapter_file
from surgeon.workflows.checks import run_checks
from tests.conftest import ARCHS, V, make_base, run_cli, session_new_tokens, until_eos

SECOND = {"gpt2": ["c_fc"], "llama": ["k_proj", "up_proj"]}
NAMES = ["default", "__base__", "second", "third", "default"]
PAD = 0


def left_padded(b: int = 5, s: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for row, pads in ((0, 3), (3, 1)):
        mask[row, :pads] = 0
        ids[row, :pads] = PAD
    return ids, mask


ROOTS: dict[str, object] = {}  # architecture -> the adapter directories (default in it, second/ and third/ below)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``models(name)``: (PEFT model, surgeon model) holding the same three adapters from the same files, eval mode."""
    built = {}

    def get(name):
        if name not in built:
            root = tmp_path_factory.mktemp(f"mixed-{name}")
            targets = ARCHS[name][1]
            torch.manual_seed(0)
            ref = peft.get_peft_model(make_base(name), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                       init_lora_weights=False))
            ref.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=SECOND[name],
                                                      init_lora_weights=False))
            ref.add_adapter("third", peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights=False))
            ref.save_pretrained(root)
            ROOTS[name] = root
            ours = surgeon.PeftModel.from_pretrained(make_base(name), root)
            for extra in ("second", "third"):
                ours.load_adapter(root / extra, adapter_name=extra)
            built[name] = (ref.eval(), ours.eval())
        return built[name]

    return get


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("shape", [(5, 7), (5, 3)])
def test_mixed_batch_logits_equal_peft_and_each_row_alone(models, name, shape):
    ref, ours = models(name)
    ids, mask = left_padded(*shape)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        got = ours(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        assert (got - want).abs().max().item() <= 1e-5
        for row, adapter in enumerate(NAMES):
            if adapter == "__base__":
                with ours.disable_adapter():
                    alone = ours(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
            else:
                ours.set_adapter(adapter)
                alone = ours(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
            assert (got[row:row + 1] - alone).abs().max().item() <= 1e-5, (row, adapter)
        ours.set_adapter("default")
        # the rows' adapters differ: a mixed batch is not the active adapter's batch
        assert (got - ours(input_ids=ids, attention_mask=mask).logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_mixed_batch_generate_equals_peft_token_for_token(models, name):
    ref, ours = models(name)
    ids, mask = left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        want = ref.generate(**kw, adapter_names=NAMES)
        got = ours.generate(**kw, adapter_names=NAMES)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        ours.set_adapter("third")
        alone = ours.generate(**{**kw, "input_ids": ids[3:4], "attention_mask": mask[3:4]})
        ours.set_adapter("default")
    torch.testing.assert_close(got[3:4], alone, rtol=0, atol=0)
    assert not all(torch.equal(got[0], got[i]) for i in range(1, 5))


def test_adapter_names_refusals_name_the_problem(models):
    _, ours = models("llama")
    ids, mask = left_padded()
    call = dict(input_ids=ids, attention_mask=mask)
    with pytest.raises(AdapterError, match=r"unknown adapters 'thrid' \(did you mean 'third'"):
        ours(**call, adapter_names=["default", "thrid", "second", "third", "default"])
    with pytest.raises(AdapterError, match="4 adapter_names for a batch of 5 rows"):
        ours(**call, adapter_names=NAMES[:4])
    with pytest.raises(AdapterError, match="must be a list of adapter names"):
        ours(**call, adapter_names="default")
    with pytest.raises(AdapterError, match="generate: 4 adapter_names for a batch of 5 rows"):
        ours.generate(**call, max_new_tokens=2, adapter_names=NAMES[:4])
    ours.train()
    try:
        with pytest.raises(AdapterError, match="training mode"):
            ours(**call, adapter_names=NAMES)
    finally:
        ours.eval()
    ours.merge_adapter(["second"])
    try:
        with pytest.raises(AdapterError, match=r"while adapters are merged \(\['second'\]\); call unmerge_adapter"):
            ours(**call, adapter_names=NAMES)
    finally:
        ours.unmerge_adapter()
    assert all(layer.rows is None for layer in ours.adapter_state.lora_layers())  # nothing left behind


# ---- the ONNX adapter bank ------------------------------------------------------------------------
ROWS = ["default", None, "second", "third", "default"]


@pytest.fixture(scope="module")
def banks(models, tmp_path_factory):
    """``banks(name)``: the KV-cache bank export of the three adapters (made once per architecture)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = export_onnx(models(name)[1], tmp_path_factory.mktemp(f"bank-{name}") / "onnx",
                                      kv_cache=True, bank=True)
        return built[name]

    return get


def feeds_for(session, ids, mask):
    ids, mask = ids.numpy(), mask.numpy()
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            **empty_past(session.generation, ids.shape[0])}


def positions(mask):
    """transformers' generate positions for a left-padded batch (what the KV-cache export is fed)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def torch_logits(ours, ids, mask, adapter):
    with torch.no_grad():
        if adapter is None:
            with ours.disable_adapter():
                return ours(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.numpy()
        ours.set_adapter(adapter)
        try:
            return ours(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.numpy()
        finally:
            ours.set_adapter("default")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_bank_rows_equal_torch_adapter_names_and_each_adapter_file_alone(models, banks, name):
    _, ours = models(name)
    session = AdapterSession(banks(name))
    assert session.bank["slots"] == [None, "default", "second", "third"]
    real = None
    for shape in ((5, 7), (5, 2)):
        ids, mask = left_padded(*shape)
        real = mask.numpy() == 1  # padded positions' logits are not defined
        feeds = feeds_for(session, ids, mask)
        got = session.run(feeds, adapters=ROWS)["logits"]
        with torch.no_grad():
            want = ours(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                        adapter_names=[r or "__base__" for r in ROWS]).logits.numpy()
        assert np.abs(got - want)[real].max() <= 1e-4
        for adapter in ("default", "second", "third", None):  # each adapter's own file on the same graph
            alone = session.run(feeds, adapter)["logits"]
            assert np.abs(alone - torch_logits(ours, ids, mask, adapter))[real].max() <= 1e-4, adapter
    # plain ONNX Runtime: the bank file active, adapter_ids fed (what the README shows)
    plain = ort.InferenceSession(str(banks(name) / "model.onnx"), providers=["CPUExecutionProvider"])
    options = ort.RunOptions()
    lora = ort.LoraAdapter()
    lora.Load(str(banks(name) / BANK_FILE))
    options.add_active_adapter(lora)
    slots = np.array([session.bank["slots"].index(r) for r in ROWS], dtype=np.int64)
    out = plain.run(["logits"], {**feeds, ADAPTER_IDS: slots}, options)[0]
    np.testing.assert_array_equal(out, session.run(feeds, adapters=ROWS)["logits"])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_bank_generation_per_row_equals_torch_and_each_row_alone(models, banks, name):
    _, ours = models(name)
    session = AdapterSession(banks(name))
    ids, mask = left_padded()
    got = session.generate(ids.numpy(), mask.numpy(), adapters=ROWS, max_new_tokens=8, pad_token_id=PAD)
    with torch.no_grad():
        want = ours.generate(input_ids=ids, attention_mask=mask, adapter_names=[r or "__base__" for r in ROWS],
                             max_new_tokens=8, do_sample=False, pad_token_id=PAD).numpy()
    np.testing.assert_array_equal(got, want)
    for row, adapter in enumerate(ROWS):
        alone = session.generate(ids[row:row + 1].numpy(), mask[row:row + 1].numpy(), adapter=adapter,
                                 max_new_tokens=8, pad_token_id=PAD)
        np.testing.assert_array_equal(got[row:row + 1, -8:], alone[:, -8:], err_msg=f"row {row} ({adapter})")


def test_bank_bad_input_is_refused_by_name(models, banks, tmp_path):
    session = AdapterSession(banks("llama"))
    ids, mask = left_padded()
    feeds = feeds_for(session, ids, mask)
    with pytest.raises(AdapterError, match=r"not in this bank: 'thrid' \(did you mean 'third'"):
        session.run(feeds, adapters=["default", None, "thrid", "third", "default"])
    with pytest.raises(AdapterError, match="4 adapters for a batch of 5 rows"):
        session.generate(ids.numpy(), mask.numpy(), adapters=ROWS[:4], max_new_tokens=2)
    with pytest.raises(AdapterError, match="either adapter= .* or adapters="):
        session.run(feeds, "default", adapters=ROWS)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument):  # a slot past the bank: ORT's own check
        session.run({**feeds, ADAPTER_IDS: np.array([0, 1, 2, 3, 9])}, "default")
    with pytest.raises(AdapterError, match="merged and --bank"):
        export_onnx(models("llama")[1], tmp_path / "x", merged=True, bank=True, adapters=["default"])


def test_check_proves_the_bank_equals_the_adapter_files_and_fails_an_altered_slot(banks, tmp_path):
    out = banks("gpt2")
    report = run_checks(out)
    assert next(c for c in report.checks if c.name == "bank").passed, report.text()
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    held = ort.AdapterFormat.read_adapter(str(broken / BANK_FILE))
    params = {k: np.array(v.numpy()) for k, v in held.get_parameters().items()}
    key = sorted(params)[0]
    params[key][1] *= 1.01  # slot 1 ("default") no longer its own file
    write_adapter_file(broken / BANK_FILE, params)
    manifest = json.loads((broken / "manifest.json").read_text())
    from surgeon.onnx.manifest import file_digest
    manifest["files"][BANK_FILE] = file_digest(broken / BANK_FILE)  # a consistent manifest: only the slot is wrong
    (broken / "manifest.json").write_text(json.dumps(manifest))
    code, out_text, _ = run_cli("check", broken, "--json", tmp_path / "r.json")
    assert code == 1, out_text
    checks = {c["name"]: c for c in json.loads((tmp_path / "r.json").read_text())["checks"]}
    assert not checks["bank"]["passed"] and "slot 1 (default) differs from its adapter file" in checks["bank"]["detail"]


def test_bank_grows_without_touching_the_graph(models, banks, tmp_path):
    """A bank of two adapters plus `surgeon bank add` of the third runs like the bank exported with all three."""
    _, ours = models("gpt2")
    full = AdapterSession(banks("gpt2"))
    small = export_onnx(ours, tmp_path / "small", adapters=["default", "second"], kv_cache=True, bank=True)
    graph = (small / "model.onnx").read_bytes()
    code, out, err = run_cli("bank", "add", small, ROOTS["gpt2"] / "third", "--name", "third")
    assert code == 0, out + err
    assert "as slot 3" in out and (small / "model.onnx").read_bytes() == graph
    grown = AdapterSession(small)
    assert grown.bank["slots"] == full.bank["slots"]
    ids, mask = left_padded()
    feeds = feeds_for(grown, ids, mask)
    real = mask.numpy() == 1
    for rows in (ROWS, ["third"] * 5):
        assert np.abs(grown.run(feeds, adapters=rows)["logits"] - full.run(feeds, adapters=rows)["logits"])[real].max() <= 1e-6
    np.testing.assert_array_equal(grown.generate(ids.numpy(), mask.numpy(), adapters=ROWS, max_new_tokens=6),
                                  full.generate(ids.numpy(), mask.numpy(), adapters=ROWS, max_new_tokens=6))
    report = run_checks(small)
    assert report.passed, report.text()  # hashes, the new slot equal to its own file, the new file alone

    # refusals: a taken name, an adapter for another base / other targets, an export that is not a bank
    code, out, err = run_cli("bank", "add", small, ROOTS["gpt2"] / "third", "--name", "third")
    assert code == 2 and "is in the bank already" in out + err
    code, out, err = run_cli("bank", "add", small, ROOTS["llama"], "--name", "other")
    assert code == 2 and "has no adapter input for" in out + err and "union of its adapters' targets" in out + err
    assert AdapterSession(small).bank["slots"] == full.bank["slots"]  # nothing changed by the refusals
    plain = export_onnx(ours, tmp_path / "plain", adapters=["default"])
    code, out, err = run_cli("bank", "add", plain, ROOTS["gpt2"] / "third")
    assert code == 2 and "not an adapter bank" in out + err and len((out + err).strip().splitlines()) == 1


def test_genai_runs_a_bank_export_with_each_adapter_file(banks, genai):
    """onnxruntime-genai feeds no adapter_ids (its default [0] applies the active one-slot file to every row):
    greedy tokens equal AdapterSession's for the base and each adapter, on a padded batch."""
    out = banks("llama")
    session = AdapterSession(out)
    eos = set(session.generation["eos_token_id"])
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    got = genai(out, prompts, adapters=(None, "default", "second", "third"), n=8)
    for adapter in (None, "default", "second", "third"):
        want = session_new_tokens(session, prompts, adapter, 8, PAD)
        assert until_eos(got[adapter], eos) == until_eos(want, eos), adapter


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_continuous_batching_gives_each_request_its_tokens_alone(banks, name):
    """Requests of different adapters, prompt lengths, limits and sampling join a running batch at token boundaries
    (at most 3 rows at a time) and leave when done; each one's tokens equal AdapterSession.generate on it alone."""
    from surgeon.onnx.batching import Batcher, Request

    session = AdapterSession(banks(name))
    rng = np.random.default_rng(7)
    requests = [Request(rng.integers(3, V, n).tolist(), adapter, max_new_tokens=k, eos_token_id=[], **sampling)
                for n, adapter, k, sampling in (
                    (5, "default", 6, {}), (2, None, 9, {}), (7, "second", 3, {}),
                    (4, "third", 7, {"do_sample": True, "top_k": 20, "temperature": 0.8, "seed": 3}),
                    (6, "default", 1, {}), (3, "second", 8, {"do_sample": True, "top_p": 0.9, "seed": 11}))]
    batcher = Batcher(session, max_batch=3)
    batcher.trim = 1  # unused leading cache columns go at every leave (a view), not only after 16
    batcher.submit(requests[0])
    batcher.submit(requests[1])
    batcher.step()
    batcher.step()  # two rows running, two tokens each: the next ones join mid-flight
    for request in requests[2:]:
        batcher.submit(request)
    widths = []
    while batcher.waiting or batcher.rows:
        batcher.step()
        widths.append((len(batcher.rows), len(batcher.slots)))
    # rows that left were reused by the ones that joined (the batch never grew past 3 rows, free ones included)
    assert max(w for w, _ in widths) == 3 and max(s for _, s in widths) == 3 and all(r.done for r in requests)
    for r in requests:
        alone = session.generate(np.array([r.ids]), adapters=[r.adapter], max_new_tokens=r.max_new_tokens,
                                 eos_token_id=[], do_sample=r.do_sample, temperature=r.temperature, top_k=r.top_k,
                                 top_p=r.top_p, seed=r.seed)
        assert r.tokens == alone[0, len(r.ids):].tolist(), (r.adapter, r.ids)


def test_continuous_batching_refuses_by_name(banks):
    from surgeon.onnx.batching import Batcher, Request

    batcher = Batcher(AdapterSession(banks("llama")))
    with pytest.raises(AdapterError, match="thrid"):
        batcher.submit(Request([5, 6], "thrid"))
    with pytest.raises(AdapterError, match="context"):
        batcher.submit(Request([5] * 60, None, max_new_tokens=10))
    with pytest.raises(surgeon.errors.GenerationArgumentError, match="temperature"):
        batcher.submit(Request([5, 6], None, do_sample=True, temperature=-1.0))
    with pytest.raises(surgeon.errors.GenerationArgumentError, match="max_batch"):
        Batcher(AdapterSession(banks("llama")), max_batch=0)


def test_continuous_batching_without_a_bank_runs_one_adapter_at_a_time(models, tmp_path):
    """An export without a bank feeds one adapter to the whole batch: requests are admitted in arrival order while
    they share the running adapter; the next adapter's wait for the batch to drain. Tokens still equal each request
    alone, and a cancelled request leaves at the next token boundary, reported once."""
    from surgeon.onnx.batching import Batcher, Request

    session = AdapterSession(export_onnx(models("gpt2")[1], tmp_path / "plain", kv_cache=True))
    seen = []
    requests = [Request([5 + i, 9, 4 + i], adapter, max_new_tokens=4 + i, eos_token_id=[],
                        on_token=lambda t, done, i=i: seen.append((i, t, done)))
                for i, adapter in enumerate(["default", "default", None, "second", "second"])]
    batcher = Batcher(session, max_batch=4)
    for request in requests:
        batcher.submit(request)
    mixes = []
    while batcher.waiting or batcher.rows:
        batcher.step()
        mixes.append({r.adapter for r in batcher.rows})
    assert all(len(m) <= 1 for m in mixes) and {"default"} in mixes and {"second"} in mixes
    for i, r in enumerate(requests):
        alone = session.generate(np.array([r.ids]), adapter=r.adapter, max_new_tokens=r.max_new_tokens, eos_token_id=[])
        assert r.tokens == alone[0, len(r.ids):].tolist(), r.adapter
        assert [t for j, t, _ in seen if j == i] == r.tokens and [d for j, _, d in seen if j == i][-1]

    stopped = Request([5, 6], "default", max_new_tokens=20, eos_token_id=[], on_token=lambda t, d: seen.append((t, d)))
    batcher.submit(stopped)
    batcher.step()
    stopped.cancelled = True
    assert batcher.step() == [stopped] and not batcher.rows and len(stopped.tokens) == 1 and seen[-1] == (None, True)
