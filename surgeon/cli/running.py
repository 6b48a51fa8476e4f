"""How every command runs: quiet libraries, errors as one line with the exit-code contract, SIGTERM that
unwinds (so temporary output is removed), notices as ``surgeon: note:`` lines."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import signal
import sys
import threading
import warnings

import click

from surgeon.errors import SurgeonError, SurgeonNotice


def quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    importlib.import_module("torch")  # torch sets its loggers' levels on import; ours must come after
    transformers = importlib.import_module("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx.experimental.symbolic_shapes", "onnxscript",
                 "bitsandbytes", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("always", category=SurgeonNotice)  # after the line above: notices still show


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str, code: int) -> None:
    click.echo(f"surgeon: error: {_one_line(message)}", err=True)
    sys.exit(code)


def _on_sigterm(signum, frame) -> None:
    """SIGTERM unwinds like an exception, so temporary output is removed on the way out."""
    click.echo("surgeon: terminated (SIGTERM); nothing was written", err=True)
    raise SystemExit(128 + signal.SIGTERM)


def _show_notices():
    """``SurgeonNotice`` warnings become ``surgeon: note: ...`` lines on stderr (returns the previous showwarning)."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, SurgeonNotice):
            click.echo(f"surgeon: note: {_one_line(message)}", err=True)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show  # the filter that lets notices through is set in _quiet, after its UserWarning ignore
    return shown


def friendly(fn):
    """Errors become one line on stderr and the exit code of the contract: 2 bad input or usage (refused before any
    work), 1 work that ran and failed. An unexpected exception is one line too (``SURGEON_DEBUG=1`` shows the
    traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
        shown = _show_notices()
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except SurgeonError as err:
            fail(str(err), err.exit_code)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as err:
            fail(str(err), 2)
        except KeyboardInterrupt:
            fail("interrupted; nothing was written", 130)
        except BrokenPipeError:  # the reader went away (`surgeon inspect DIR | head`): no traceback, no error line
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail again
            raise SystemExit(1) from None
        except Exception as err:
            if os.environ.get("SURGEON_DEBUG"):
                raise
            fail(f"unexpected {type(err).__name__}: {err} (a surgeon bug: please report it; SURGEON_DEBUG=1 shows "
                  "the traceback)", 1)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            warnings.showwarning = shown

    return wrapper


class Surgeon(click.Group):
    """Usage errors (bad options, numbers out of range) as one line and exit 2, like every other refusal."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as err:
            where = f" (see `surgeon {err.ctx.command.name} --help`)" if getattr(err, "ctx", None) and \
                err.ctx.command is not self else ""
            fail(err.format_message() + where, err.exit_code)
        except click.exceptions.Abort:
            fail("aborted", 1)
        sys.exit(code if isinstance(code, int) else 0)

