"""Stage 7, workflows: the stages composed into what the CLI runs (fold to a checkpoint, check an export,
generate text, train on a text file, describe an adapter)."""
