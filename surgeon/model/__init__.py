"""Stage 5, the model: ``SurgeonModel`` (PEFT's ``PeftModel``) owning its adapters and its injected graphs."""

from surgeon.model.entry import get_peft_model
from surgeon.model.peft_model import SurgeonModel, trainable_parameters_line

__all__ = ["SurgeonModel", "get_peft_model", "trainable_parameters_line"]
