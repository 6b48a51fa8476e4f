"""Stage 1, capture: an eager model and a call signature -> a plain ``fx.GraphModule``."""

from surgeon.capturing.decoder import DECODE_KEY, CacheLayout
from surgeon.capturing.inputs import accepts, example_inputs, signature_of
from surgeon.capturing.modules import SUPPORTED_KINDS, CaptureInfo, ModuleInfo
from surgeon.capturing.trace import capture, capture_decoder, forget

__all__ = ["DECODE_KEY", "SUPPORTED_KINDS", "CacheLayout", "CaptureInfo", "ModuleInfo", "accepts", "capture",
           "capture_decoder", "example_inputs", "forget", "signature_of"]
