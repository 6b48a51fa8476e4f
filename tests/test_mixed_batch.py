"""Many adapters in one batch: ``adapter_names`` (one adapter per row, ``"__base__"`` for none), as PEFT's.

Tolerances: fp32 logits within 1e-5 of PEFT's mixed batch for the same adapter files, and within 1e-5 of the
same row run alone with its adapter active; greedy tokens equal token for token. Adapters have different ranks
(4, 2, 8) and different target sets (the second one targets other modules), on GPT-2 (whose ``addmm`` sites see
batch x sequence rows) and Llama.
"""

from __future__ import annotations

import peft
import pytest
import torch

import surgeon
from surgeon.errors import AdapterError
from tests.conftest import ARCHS, V, make_base

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
