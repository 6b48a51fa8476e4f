"""``SurgeonModel``: PEFT's ``PeftModel`` surface over captured, injected graphs.

The eager model keeps its parameters (frozen). ``adapter_state`` owns the adapters (modules shared
by every graph, configs, the active one); ``graphs`` holds one injected graph per call signature,
made on first use. The methods here are PEFT's signatures; the work is in the modules beside this
one (``files``, ``merging``, ``generate``, ``losses``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from surgeon.adapters import check_ranks, check_tensors, read_adapter_dir
from surgeon.capturing import CacheLayout, signature_of
from surgeon.compat import check_kwargs, forward_keywords, params_of, refuse_peft_load_flags, refuse_value
from surgeon.config import LoraConfig
from surgeon.errors import AdapterError, UnknownArgumentError
from surgeon.model import files, merging, prompting
from surgeon.model.adapter_state import AdapterState
from surgeon.model.generate import generate
from surgeon.model.graph_set import GraphSet
from surgeon.model.distributed import DistributedHooks, gathered, release_replaced
from surgeon.model.forward import run_forward
from surgeon.model.verbs import AdapterNames, TransformersVerbs
from surgeon.quant import QuantLinear, check_quant_config, from_bitsandbytes, has_bitsandbytes_layers


class _Base(nn.Module):
    """Holds the transformers model so parameter names read ``base_model.model.<path>`` as in PEFT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class SurgeonModel(TransformersVerbs, DistributedHooks, nn.Module):
    """A base model with LoRA adapters, used like ``peft.PeftModel`` (and with transformers' adapter verbs)."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default", *, is_trainable: bool = True):
        super().__init__()
        check_quant_config(getattr(getattr(model, "config", None), "quantization_config", None))
        if has_bitsandbytes_layers(model):  # transformers' BitsAndBytesConfig: same packed storage, capturable layers
            from_bitsandbytes(model)
        self.base_model = _Base(model)
        self.adapter_modules = nn.Module()  # surgeon_lora.* and surgeon_saved.*, shared by every graph
        self.adapter_state = AdapterState(self.adapter_modules)
        self.graphs = GraphSet(model, self.adapter_state)
        self.fast_paths = True  # exact rewrites per call: causal attention, chunked loss (surgeon/model/forward.py)
        self.compile_graphs = False  # torch.compile each graph it runs (get_peft_model(..., compile=True))
        model.requires_grad_(False)
        self.add_adapter(adapter_name, config, trainable=is_trainable)
        self.register_forward_pre_hook(release_replaced)  # runs before FSDP's gathering hook (see distributed.py)

    # ---- adapters ----------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.adapter_state.configs

    @property
    def active_adapter(self) -> str:
        return self.adapter_state.active

    @property
    def active_adapters(self) -> AdapterNames:
        return AdapterNames([self.adapter_state.active])

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, *, trainable: bool = True) -> None:
        """Add a new adapter (freshly initialised); the active adapter stays active."""
        if peft_config.peft_type == "PROMPT_TUNING":  # no graph change: model/prompting.py
            peft_config = prompting.filled(peft_config, self.base)
            self.adapter_state.add(adapter_name, peft_config, None, trainable=trainable,
                                   prompt=prompting.initial_prompt(peft_config, self.base))
            return
        self.adapter_state.add(adapter_name, peft_config, self.graphs.any(), trainable=trainable)
        self.graphs.attach_new(peft_config)
        if trainable and peft_config.bias != "none":
            for _, p in files.bias_parameters(self, peft_config):
                p.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        self.adapter_state.delete(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        self.adapter_state.known(adapter_name)
        self.adapter_state.activate(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes the base model's outputs."""
        self.adapter_state.set_enabled(False)
        try:
            yield
        finally:
            self.adapter_state.set_enabled(True)

    # ---- forward ----------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self.base_model.model

    def get_base_model(self) -> nn.Module:
        return self.base

    def graph_for(self, **call: Any) -> fx.GraphModule:
        """The injected graph for this call signature (captured on first use)."""
        check_kwargs(f"{type(self.base).__name__}.forward", call, forward_keywords(self.base))
        return self.graphs.get(signature_of(call), call)

    def decoder_graph(self) -> tuple[fx.GraphModule, CacheLayout]:
        """The injected decode graph (KV cache as flat tensors) and its cache layout."""
        graph = self.graphs.decoder()
        return graph, graph.meta["cache_layout"]

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, adapter_names=None,
                skip_logits=None, **kwargs):
        """The base model's forward in the injected graph; ``adapter_names``: one adapter per row (PEFT's);
        ``skip_logits``: leave ``logits`` out when a loss is computed (default: in training; see ``forward.py``)."""
        first = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        with self.adapter_state.rows(adapter_names, first, self.training, "forward"):
            call, labels = prompting.with_prompt(self, {"input_ids": input_ids, "attention_mask": attention_mask,
                                                        **kwargs}, labels)
            return run_forward(self, call, labels, num_items_in_batch, skip_logits)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Trainer reads this; we answer as it would for the base model (it unwraps PEFT models too)."""
        if hasattr(self.base, "accepts_loss_kwargs"):
            return bool(self.base.accepts_loss_kwargs)
        params = inspect.signature(self.base.forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    def generate(self, *args, adapter_names=None, **kwargs):
        """transformers' ``generate``, every step in the injected decode graph; ``adapter_names``: one per row."""
        first = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if prompting.prompt_of(self) is not None:
            if adapter_names is not None:
                raise AdapterError("generate: adapter_names is for LoRA adapters, not prompt tuning")
            return prompting.generate_with_prompt(self, *args, **kwargs)
        with self.adapter_state.rows(adapter_names, first, self.training, "generate"):
            return generate(self, *args, **kwargs)

    # ---- modes and devices ------------------------------------------------------------
    def train(self, mode: bool = True) -> SurgeonModel:
        super().train(mode)
        self.graphs.train(mode)
        return self

    def _apply(self, fn, recurse=True):  # torch's hook for .to()/.cuda()/.half(): graph-only constants move too
        super()._apply(fn, recurse)
        self.graphs.apply(fn, recurse)
        return self

    # ---- parameters and state -----------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for _, p in self.named_parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        # quantized weights are buffers; count them as PEFT counts Params4bit / Int8Params: in x out each
        total += sum(m.in_features * m.out_features for m in self.base.modules() if isinstance(m, QuantLinear))
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Prints PEFT's line, e.g. ``trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364``."""
        print(trainable_parameters_line(*self.get_nb_trainable_parameters()))

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """One adapter's tensors under PEFT's keys (what ``adapter_model.safetensors`` holds)."""
        return files.adapter_tensors(self, adapter_name or self.active_adapter)

    def expected_shapes(self, config: LoraConfig) -> dict[str, tuple[int, ...]]:
        """PEFT keys and shapes an adapter file for ``config`` must hold on this base model."""
        return files.expected_shapes(self, config)

    def state_dict(self, *args, destination: dict | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """What training changes: the active adapter under PEFT's keys (the base stays in its own files).

        ``Trainer.save_model`` writes this as ``model.safetensors``; ``save_pretrained`` writes an
        adapter directory PEFT reads.
        """
        if args:
            raise UnknownArgumentError("state_dict: pass destination, prefix and keep_vars by name (torch deprecated "
                                       "positional arguments)")
        out = destination if destination is not None else {}
        for k, v in self.adapter_state_dict().items():
            out[prefix + k] = v if keep_vars else v.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        refuse_value("load_state_dict", "assign", assign, [False], "adapter tensors are copied into place")
        own = self.adapter_state_dict()
        if strict:
            check_tensors({k: tuple(v.shape) for k, v in own.items()}, state_dict, "state dict")
        with torch.no_grad():
            for key in set(own) & set(state_dict):
                own[key].copy_(state_dict[key])
        return nn.modules.module._IncompatibleKeys(sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own)))

    # ---- adapter directories --------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True, **kwargs: Any) -> None:
        """Write each adapter in PEFT's format: ``default`` in the directory, others in subdirectories.
        ``is_main_process=False`` writes nothing (PEFT's meaning, for all but one rank of a distributed job)."""
        check_kwargs("save_pretrained", kwargs, params_of(SurgeonModel.save_pretrained))
        refuse_value("save_pretrained", "safe_serialization", safe_serialization, [True], "surgeon writes safetensors only")
        refuse_value("save_pretrained", "save_embedding_layers", save_embedding_layers, ["auto", False],
                     "surgeon saves embeddings only through modules_to_save")
        with gathered(self):  # under FSDP, a collective: every rank calls save_pretrained
            if is_main_process:
                files.save_adapters(self, save_directory, selected_adapters or list(self.peft_config))

    def load_adapter(self, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     low_cpu_mem_usage: bool = False, hotswap: bool | str = "auto", **kwargs: Any) -> None:
        """Load a PEFT adapter directory as ``adapter_name``; ``hotswap`` overwrites it in place ("auto": see verbs)."""
        check_kwargs("load_adapter", kwargs, params_of(SurgeonModel.load_adapter))
        refuse_peft_load_flags("load_adapter", autocast_adapter_dtype, low_cpu_mem_usage)
        device = next((p.device for p in self.base.parameters()), torch.device("cpu"))
        if torch_device is not None and torch.device(torch_device) != device:
            raise UnknownArgumentError(f"load_adapter: torch_device={torch_device!r} differs from the model's device "
                                       f"{device}; adapters live on the base's device: move the model with .to()")
        hotswap = self._resolve_hotswap(hotswap, adapter_name)
        files.load_adapter_dir(self, model_id, adapter_name, trainable=is_trainable, hotswap=hotswap)
        if self._hotswap_rank is not None and not hotswap:  # later hotswaps into it change no shape either
            files.pad_for_hotswap(self, self._hotswap_rank)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, **kwargs: Any):
        """``PeftModel.from_pretrained``: wrap ``model`` with the adapter stored in ``model_id``.

        ``config`` (a ``LoraConfig``) replaces the directory's ``adapter_config.json``, as in PEFT.
        """
        check_kwargs("PeftModel.from_pretrained", kwargs, params_of(cls.from_pretrained))
        refuse_peft_load_flags("PeftModel.from_pretrained", autocast_adapter_dtype, low_cpu_mem_usage)
        file_config, tensors = read_adapter_dir(model_id)
        if config is not None and not isinstance(config, LoraConfig):
            raise AdapterError(f"PeftModel.from_pretrained: config must be a surgeon.LoraConfig, got {type(config).__name__}")
        if config is not None:
            check_ranks(config, tensors, str(model_id))
        config = config or file_config
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            peft_model = cls(model, config, adapter_name, is_trainable=is_trainable)
            check_tensors(peft_model.expected_shapes(config), tensors, str(model_id))
        except Exception:
            for p, flag in flags:  # leave the caller's model as it came
                p.requires_grad_(flag)
            raise
        files.copy_in(peft_model, adapter_name, tensors)
        return peft_model if is_trainable else peft_model.eval()

    def prepare_for_hotswap(self, target_rank: int) -> None:
        """Pad every adapter to ``target_rank`` so later hotswaps of rank <= it change no shape.

        Call before ``torch.compile``; the scale is a tensor already, so swapping alphas is free too.
        """
        files.pad_for_hotswap(self, target_rank)

    # ---- merging ---------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters (default: the active one) into the base weights; the branches skip them."""
        if self.adapter_state.prompts() is not None:
            raise AdapterError("merge: prompt tuning has no weights to merge into (its virtual tokens are inputs); "
                               "keep the adapter, or use LoRA/IA3 to get a merged model")
        merging.merge(self, tuple(adapter_names or self.active_adapters), safe_merge)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter (as it was when merged) from the base weights again."""
        merging.unmerge(self)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge and return the plain transformers model (its own class; ``generate`` works)."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        merging.write_saved_copies(self)
        self.base.requires_grad_(False)
        return self.base

    def unload(self) -> nn.Module:
        """The base model without adapters (nothing merged)."""
        self.unmerge_adapter()
        return self.base

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "cat", svd_rank: int | None = None) -> None:
        """A new adapter equal to ``sum w_i * adapter_i``.

        ``"cat"`` is exact: ranks add up (A stacked, B stacked with ``w_i * scale_i`` folded in, scale 1).
        ``"svd"`` truncates the summed delta to ``svd_rank`` (default: the largest input rank).
        """
        config, parts = merging.weighted_adapter(self, adapters, weights, combination_type, svd_rank)
        self.add_adapter(adapter_name, config)
        layers = {layer.path: layer for layer in self.adapter_state.lora_layers()}
        with torch.no_grad():
            for path, (a, b) in parts.items():
                target = layers[path].adapters[adapter_name]
                target.lora_A.copy_(a)
                target.lora_B.copy_(b)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "adapter_modules"):
                raise
            return getattr(self.base_model.model, name)


def trainable_parameters_line(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
