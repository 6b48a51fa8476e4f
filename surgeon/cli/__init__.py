"""Stage 8, the command line (``surgeon``)."""

from surgeon.cli.commands import main
from surgeon.cli.running import friendly

__all__ = ["friendly", "main"]
