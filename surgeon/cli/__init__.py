"""Stage 8, the command line (``surgeon``)."""

from surgeon.cli.commands import main
from surgeon.cli import serve as _serve  # noqa: F401  (registers `surgeon serve`)
from surgeon.cli.running import friendly

__all__ = ["friendly", "main"]
