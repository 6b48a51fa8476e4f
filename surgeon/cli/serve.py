"""``surgeon serve``: the export behind an OpenAI-style HTTP server (the ONNX Runtime side only: no torch)."""

from __future__ import annotations

import ipaddress
import signal
import socket

import click

from surgeon.cli.commands import main
from surgeon.cli.options import finite
from surgeon.cli.running import friendly
from surgeon.errors import SurgeonError


class ListenError(SurgeonError, OSError):
    """The address cannot be listened on (taken, or not this machine's)."""


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name: resolved by bind
    # proto named: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; with 0 each keep-alive
    # response waited ~40 ms for the client's delayed ACK (Nagle between the headers and the body)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port (0: any free "
                          "one) or --host") from None
    return sock


@main.command()
@click.argument("export_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; 0.0.0.0 serves other machines: set --api-key).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Requests decoded together in one batch.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a batch row; beyond that the server answers 429.")
@click.option("--threads", default=None, type=click.IntRange(1), help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--api-key", envvar="SURGEON_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request (or set SURGEON_API_KEY).")
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=float, callback=finite(0),
              help="On SIGTERM: seconds in-flight requests get to finish before they are cancelled.")
@friendly
def serve(export_dir, host, port, max_batch, max_queue, threads, api_key, shutdown_timeout):
    """Serve EXPORT_DIR (an `surgeon export --kv-cache` directory) over HTTP, OpenAI-style: POST /v1/completions
    with `model` naming an adapter (or `base`), GET /v1/models, /health, /metrics. Concurrent requests share one
    decode batch, each row with its own adapter (a --bank export mixes adapters in a batch; another export runs one
    adapter at a time)."""
    import uvicorn  # deferred: `surgeon --help` does not load the server stack

    from surgeon.onnx.server import Server  # deferred, as above

    if api_key == "":
        raise click.BadParameter("the key is empty; give a secret or leave the option out", param_hint="--api-key")
    server = Server(export_dir, max_batch=max_batch, max_queue=max_queue, threads=threads, api_key=api_key)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"surgeon: serving {export_dir} at http://{shown}:{bound}/v1 (models: {', '.join(server.models)}; "
               f"{'a bank: adapters mixed in a batch' if server.session.bank else 'one adapter per batch'}; "
               f"max batch {max_batch})", err=True)
    config = uvicorn.Config(server.app(), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout)
    stopped = []
    # uvicorn takes SIGTERM/SIGINT while it serves (graceful shutdown) and re-raises the signal after: a stop
    # that was asked for ends here, with exit 0
    previous = {sig: signal.signal(sig, lambda signum, frame: stopped.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    why = f" ({signal.Signals(stopped[0]).name})" if stopped else ""
    metrics = server.metrics
    click.echo(f"surgeon: stopped{why}: {metrics.total(metrics.requests, status='200')} requests answered, "
               f"{metrics.total(metrics.cancelled)} cancelled", err=True)
