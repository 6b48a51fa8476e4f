"""transformers' adapter verbs (``PeftAdapterMixin``) on ``SurgeonModel``, with transformers' meanings.

Users of the transformers PEFT guide call ``enable_adapters()`` / ``disable_adapters()`` (all adapters, not a
context), ``active_adapters()`` (a method there, a property in PEFT: both work here), and
``enable_peft_hotswap(target_rank=...)``, after which ``load_adapter`` of a name already loaded hotswaps it
unless ``hotswap=False``.
"""

from __future__ import annotations

import warnings

from surgeon.compat import refuse_value
from surgeon.errors import AdapterError
from surgeon.model import files

CHECK_COMPILED = ("error", "warn", "ignore")


class AdapterNames(list):
    """The active adapters: a list (PEFT's ``active_adapters`` property) that can also be called (transformers')."""

    def __call__(self) -> list[str]:
        return list(self)


class TransformersVerbs:
    """Mixed into ``SurgeonModel``; uses its ``adapter_state`` and ``prepare_for_hotswap``."""

    _hotswap_rank: int | None = None

    def disable_adapters(self) -> None:
        """Every adapter off until ``enable_adapters()``: the model computes the base model's outputs."""
        self.adapter_state.set_enabled(False)

    def enable_adapters(self) -> None:
        """Adapters on again after ``disable_adapters()``."""
        self.adapter_state.set_enabled(True)

    def enable_peft_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """Pad every adapter (and each one loaded later) to ``target_rank``, and make ``load_adapter`` of a loaded
        name hotswap it by default. Call it before ``torch.compile``: on a compiled model ``check_compiled`` says
        what happens (``"error"``, ``"warn"``, ``"ignore"``)."""
        refuse_value("enable_peft_hotswap", "check_compiled", check_compiled, list(CHECK_COMPILED),
                     "how to treat a model that is compiled already")
        if not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank < 1:
            raise AdapterError(f"enable_peft_hotswap: target_rank must be a positive integer, got {target_rank!r}")
        if getattr(self, "_compiled_call_impl", None) is not None:
            message = ("enable_peft_hotswap on a compiled model: padding the adapters now changes shapes the compiled "
                       "graph was specialised on; call it before model.compile()")
            if check_compiled == "error":
                raise AdapterError(message + " (or pass check_compiled='warn')")
            if check_compiled == "warn":
                warnings.warn(message, stacklevel=2)
        self._hotswap_rank = target_rank
        files.pad_for_hotswap(self, target_rank)

    def _resolve_hotswap(self, hotswap, adapter_name: str) -> bool:
        """transformers' ``hotswap="auto"``: hotswap when ``enable_peft_hotswap`` was called and the name is loaded."""
        if hotswap == "auto":
            return self._hotswap_rank is not None and adapter_name in self.adapter_state.configs
        refuse_value("load_adapter", "hotswap", hotswap, [True, False, "auto"], "whether to overwrite a loaded adapter")
        return bool(hotswap)
