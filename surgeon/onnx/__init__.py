"""ONNX export (needs torch) and the ONNX Runtime session (never imports torch)."""
