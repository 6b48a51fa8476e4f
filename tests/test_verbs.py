"""transformers' adapter verbs on ``SurgeonModel`` (``enable_peft_hotswap``, ``load_adapter`` hotswapping by default
after it, ``disable_adapters`` / ``enable_adapters``, ``active_adapters()``), call for call against PEFT doing what
transformers' mixin does with them: ``prepare_model_for_compiled_hotswap``, ``hotswap_adapter``, adapters off and on.
transformers 5.24's mixin itself refuses PEFT below 0.22, which is not released; the locked PEFT is 0.21.2.
Tolerance: fp32 logits within 1e-5.
"""

from __future__ import annotations

import peft
import pytest
import torch

import surgeon
from surgeon.errors import AdapterError, UnknownArgumentError
from tests.conftest import ARCHS, batch, make_base


def saved(tmp_path, r: int, seed: int):
    torch.manual_seed(seed)
    model = peft.get_peft_model(make_base("llama"), peft.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                                                    target_modules=ARCHS["llama"][1]))
    model.save_pretrained(tmp_path / f"r{r}")
    return tmp_path / f"r{r}"


def test_verbs_match_peft_doing_what_transformers_does(tmp_path):
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    small, large = saved(tmp_path, 4, 1), saved(tmp_path, 8, 2)
    b = {k: v for k, v in batch("llama", b=2, s=7, pad_left=2).items() if k != "labels"}
    ref = peft.PeftModel.from_pretrained(make_base("llama"), small, adapter_name="x").eval()
    prepare_model_for_compiled_hotswap(ref, target_rank=8)
    ours = surgeon.PeftModel.from_pretrained(make_base("llama"), small, adapter_name="x").eval()
    ours.enable_peft_hotswap(target_rank=8)
    assert {layer.adapters["x"].lora_A.shape[0] for layer in ours.adapter_state.lora_layers()} == {8}

    def same(note, off=False):
        with torch.no_grad():
            if off:
                with ref.disable_adapter():
                    want = ref(**b).logits
            else:
                want = ref(**b).logits
            assert (want - ours(**b).logits).abs().max().item() <= 1e-5, note

    same("after load")
    assert ours.active_adapters() == ours.active_adapters == ref.active_adapters == ["x"]
    ours.disable_adapters()
    same("adapters disabled", off=True)
    ours.disable_adapters()  # not a context: a second call changes nothing
    same("still disabled", off=True)
    ours.enable_adapters()
    same("adapters enabled again")
    hotswap_adapter(ref, str(large), adapter_name="x")
    ours.load_adapter(large, adapter_name="x")  # hotswap by default after enable_peft_hotswap (rank 4 -> 8)
    same("after the hotswap")
    with pytest.raises(AdapterError, match="exists"):
        ours.load_adapter(large, adapter_name="x", hotswap=False)
    ours.load_adapter(small, adapter_name="y")  # a new name loads (and is padded for later hotswaps)
    assert {layer.adapters["y"].lora_A.shape[0] for layer in ours.adapter_state.lora_layers()} == {8}


def test_verbs_refuse_bad_values_by_name(tmp_path):
    ours = surgeon.PeftModel.from_pretrained(make_base("llama"), saved(tmp_path, 4, 1))
    with pytest.raises(UnknownArgumentError, match="check_compiled='later' is not supported.*'error' or 'warn' or 'ignore'"):
        ours.enable_peft_hotswap(target_rank=8, check_compiled="later")
    with pytest.raises(AdapterError, match="target_rank must be a positive integer"):
        ours.enable_peft_hotswap(target_rank=0)
    with pytest.raises(UnknownArgumentError, match="hotswap='yes'"):
        ours.load_adapter(tmp_path / "r4", adapter_name="y", hotswap="yes")
    ours.compile()  # nn.Module.compile: lazily compiled, as transformers checks
    with pytest.raises(AdapterError, match="compiled model.*before model.compile"):
        ours.enable_peft_hotswap(target_rank=8)
    with pytest.warns(UserWarning, match="compiled model"):
        ours.enable_peft_hotswap(target_rank=8, check_compiled="warn")
