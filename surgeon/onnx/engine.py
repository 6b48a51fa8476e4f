"""The batcher on a thread of its own, for ``surgeon serve``; the text a request's tokens make, stop strings included.

Requests come from any thread (the server's event loop) through ``Engine.submit``; each step of the batcher runs
on the engine's thread, and each new token goes back through the request's ``on_token``. ONNX Runtime releases the
GIL while it runs, so the event loop keeps answering while a batch step computes. numpy, tokenizers and ONNX
Runtime only: no torch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer

from surgeon.errors import AdapterFileError, SurgeonError
from surgeon.names import TOKENIZER_JSON
from surgeon.onnx.batching import Batcher, Request
from surgeon.onnx.runtime import AdapterSession


class QueueFullError(SurgeonError, RuntimeError):
    """Every batch row and queue place is taken (the server answers 429)."""


class StoppingError(SurgeonError, RuntimeError):
    """The engine is shutting down and takes no new requests (the server answers 503)."""


def load_tokenizer(export_dir: str | Path) -> Tokenizer:
    """The export's ``tokenizer.json`` (``surgeon export`` copies it beside the model), read by ``tokenizers``."""
    path = Path(export_dir) / TOKENIZER_JSON
    if not path.is_file():
        raise AdapterFileError(f"{path}: missing; serving needs the tokenizer beside the model: re-export from a "
                               "model directory that has tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises its own Exception type for a malformed file
        raise AdapterFileError(f"{path}: not a readable tokenizer file ({err}); re-export the model") from None


class Engine:
    """``Batcher`` stepping on its own thread while there is work; ``submit`` and ``stop`` from any thread.

    At most ``max_batch`` rows run and ``max_queue`` more wait; a request beyond that is refused
    (``QueueFullError``). ``on_step(rows, seconds)`` is called after each step with the rows it decoded (0: a
    prefill only) and the time it took."""

    def __init__(self, session: AdapterSession, *, max_batch: int = 8, max_queue: int = 64,
                 on_step: Callable[[int, float], None] | None = None):
        self.batcher = Batcher(session, max_batch)
        self.max_queue, self.on_step = max_queue, on_step
        self._inbox: list[Request] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="surgeon-batcher", daemon=True)

    @property
    def running(self) -> int:
        return len(self.batcher.rows)

    @property
    def waiting(self) -> int:
        return len(self._inbox) + len(self.batcher.waiting)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, request: Request) -> Request:
        """Queue ``request``; the batcher's refusals (unknown adapter, prompt too long, bad sampling) raise here."""
        self.batcher.check(request)
        with self._wake:
            if self._stopping:
                raise StoppingError("the server is shutting down; send the request to another instance")
            limit = self.batcher.max_batch + self.max_queue
            if self.running + self.waiting >= limit:
                raise QueueFullError(f"{self.running} requests running and {self.waiting} waiting: the server holds "
                                     f"at most {limit} (--max-batch {self.batcher.max_batch} + --max-queue "
                                     f"{self.max_queue}); retry later")
            self._inbox.append(request)
            self._wake.notify()
        return request

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left and end the thread (after the server stopped taking requests)."""
        with self._wake:
            self._stopping = True
            for request in self._inbox:
                request.cancelled = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        batcher = self.batcher
        while True:
            with self._wake:
                while not (self._inbox or batcher.rows or batcher.waiting or self._stopping):
                    self._wake.wait()
                batcher.waiting.extend(self._inbox)
                self._inbox.clear()
                if self._stopping:
                    batcher.abort("the server stopped before the request finished")
                    return
            decoding, start = len(batcher.rows), time.perf_counter()
            try:
                batcher.step()
            except Exception as err:  # ONNX Runtime's own errors: every request in flight fails, the server stays up
                batcher.abort(f"the model run failed: {type(err).__name__}: {err}")
                continue
            if self.on_step is not None:
                self.on_step(decoding, time.perf_counter() - start)


class Text:
    """The text of a request's new tokens as they come, cut at the first stop string (which is not included).

    ``add(token)`` returns the text that is safe to send now: a piece that could still become a stop string,
    or an unfinished UTF-8 character, is held back until the next token decides it; ``end()`` returns the rest."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._send(text[:cut], len(text[:cut]))
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete character: wait for its bytes
            safe -= 1
        return self._send(text, safe)

    def end(self) -> str:
        if self.stopped:
            return ""
        return self._send(self.text(), None)

    def _send(self, text: str, upto: int | None) -> str:
        upto = len(text) if upto is None else upto
        piece = text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece
