"""Graph passes: each takes a GraphModule and returns a new one, checking its own result."""
