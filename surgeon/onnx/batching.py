"""Continuous batching across adapters (the engine ``surgeon serve`` runs).

Requests join the running decode batch at token boundaries and leave when done. Each row runs its own adapter
(an adapter-bank export's ``adapter_ids``), its own sampling settings and random generator, and its own stop
condition. On an export without a bank the adapter is one input for the whole batch, so the batch holds one adapter
at a time: requests are admitted in arrival order, and one for another adapter waits until the batch drains. A new
request is prefilled (with the others that join at the same step, left-padded to one length), then joins: its KV
cache and the running rows' are left-padded to one length, with the padding masked out, so one ONNX Runtime run
serves every row's next token. A row's tokens are those of ``AdapterSession.generate`` on that request alone
(tested): the same positions (counted over real tokens only), the same draws from its generator, and logits within
float rounding of the lone run's (padding is masked, not computed into a real position).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from surgeon.errors import AdapterError, GenerationArgumentError
from surgeon.names import LOGITS, past_of_present
from surgeon.onnx.decoding import check_prompt, empty_past, pick_tokens
from surgeon.onnx.runtime import AdapterSession
from surgeon.sampling import check_sampling


@dataclasses.dataclass
class Request:
    """One generation: prompt token ids, the adapter (None: the base), and ``AdapterSession.generate``'s settings.
    ``tokens`` fills with the new tokens as it runs; ``done`` when it stopped (end of sequence or the limit).
    ``on_token(token, done)`` is called with each new token (on the thread that steps the batcher); setting
    ``cancelled`` drops the request at the next token boundary (then ``on_token(None, True)``, once)."""

    ids: list[int]
    adapter: str | None = None
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_id: list[int] | None = None
    on_token: Callable[[int | None, bool], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    error: str | None = None

    def sampling(self) -> dict:
        return {"do_sample": self.do_sample, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


class Batcher:
    """Rows of different adapters and lengths in one decode batch, at most ``max_batch`` at a time.

    ``submit`` checks a request (unknown adapter, a prompt too long for the context, bad sampling: named errors) and
    queues it; each ``step`` admits queued requests while there is room (their prefill gives their first token) and
    runs one decode step for the rows already running; finished rows leave at once."""

    trim = 16  # leading cache columns no running row uses, dropped once there are this many

    def __init__(self, session: AdapterSession, max_batch: int = 8):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise GenerationArgumentError(f"Batcher: max_batch={max_batch!r}: give an integer >= 1")
        self.session, self.max_batch = session, max_batch
        self.banked = session.bank is not None
        self.facts = session.generation  # also refuses an export without a KV cache, by name
        self.waiting: list[Request] = []
        self.slots: list[Request | None] = []  # the batch's rows; None: a free row, reused by the next to join
        self.rngs: list[np.random.Generator | None] = []
        self.past: dict[str, np.ndarray] = {}
        self.mask = np.zeros((0, 0), np.int64)
        self.presents = past_of_present(self.facts["layers"])

    @property
    def rows(self) -> list[Request]:
        """The requests running now."""
        return [r for r in self.slots if r is not None]

    def check(self, request: Request) -> None:
        """The errors ``submit`` would raise for ``request``, by name (reads the export only: safe on any thread)."""
        check_sampling({**request.sampling(), "max_new_tokens": request.max_new_tokens}, "Batcher.submit")
        check_prompt(np.array([request.ids]), None, self.facts, request.max_new_tokens)
        if request.adapter in self.session.prompt_tokens:
            raise AdapterError(f"adapter {request.adapter!r} is prompt tuning, which the batcher does not run; "
                               "generate with it through AdapterSession.generate")
        if self.banked:
            self.session.slots([request.adapter], 1)  # an adapter the bank does not hold fails here, by name
        elif request.adapter is not None:
            self.session.adapter(request.adapter)  # loaded and checked; an unknown name fails here

    def submit(self, request: Request) -> Request:
        self.check(request)
        self.waiting.append(request)
        return request

    def step(self) -> list[Request]:
        """Admit what fits, decode one token for the rows that were running; returns the requests that finished
        (cancelled ones included)."""
        if self.rows:
            self._decode()
        finished = self._leave()
        joining: list[Request] = []
        running = self.rows
        while self.waiting and len(running) + len(joining) < self.max_batch:
            head, batch = self.waiting[0], running or joining
            if head.cancelled:
                finished.append(self._cancel(self.waiting.pop(0)))
            elif self.banked or not batch or head.adapter == batch[0].adapter:
                joining.append(self.waiting.pop(0))
            else:
                break  # another adapter, on an export without a bank: it goes first once the batch drains
        if joining:
            self._admit(joining)
        return finished + self._leave()  # a request can end at its prefill (max_new_tokens 1, or end of sequence)

    def run(self) -> None:
        """Step until every submitted request is done."""
        while self.waiting or self.rows:
            self.step()

    # ---- the batch -----------------------------------------------------------------------------------------------
    # Copying the whole cache is what a join or a leave would cost; most of them copy one row instead. A row that
    # leaves becomes free (it still runs, masked, its output unread) until a joining request is written into it,
    # left-padded to the batch's length; the cache is compacted only when as many rows are free as busy, and its
    # leading columns go once no running row uses them.
    def _admit(self, requests: list[Request]) -> None:
        """Prefill the joining requests in one run (left-padded to the longest prompt, the padding masked out),
        take each one's first token, and put them into free rows (or new ones)."""
        length = max(len(r.ids) for r in requests)
        ids = np.zeros((len(requests), length), np.int64)
        mask = np.zeros_like(ids)
        for i, request in enumerate(requests):
            ids[i, length - len(request.ids):] = request.ids
            mask[i, length - len(request.ids):] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(np.cumsum(mask, axis=1) - 1, 0),
                 **empty_past(self.facts, len(requests))}
        out = self._run(feeds, [r.adapter for r in requests])
        rngs = [np.random.default_rng(r.seed) for r in requests]
        for i, (request, rng) in enumerate(zip(requests, rngs)):
            self._take(request, rng, out[LOGITS][i:i + 1, -1, :])
        past = {self.presents[k]: v for k, v in out.items() if k in self.presents}
        if not self.rows:
            self.slots, self.rngs, self.past, self.mask = list(requests), rngs, past, mask
            return
        width = max(self.mask.shape[1], length)
        if width > self.mask.shape[1]:  # a prompt longer than the running rows' cache: every row is padded
            self.past = {k: _left_pad(v, width, 2) for k, v in self.past.items()}
            self.mask = _left_pad(self.mask, width, 1)
        free = [i for i, r in enumerate(self.slots) if r is None]
        for i, slot in enumerate(free[:len(requests)]):
            for k, v in self.past.items():
                v[slot] = 0
                v[slot, :, width - length:] = past[k][i]
            self.mask[slot] = 0
            self.mask[slot, width - length:] = mask[i]
            self.slots[slot], self.rngs[slot] = requests[i], rngs[i]
        extra = len(free)
        if extra < len(requests):
            self.past = {k: np.concatenate([v, _left_pad(past[k][extra:], width, 2)]) for k, v in self.past.items()}
            self.mask = np.concatenate([self.mask, _left_pad(mask[extra:], width, 1)])
            self.slots += requests[extra:]
            self.rngs += rngs[extra:]

    def _decode(self) -> None:
        last = np.array([[r.tokens[-1] if r is not None else 0] for r in self.slots], np.int64)
        mask = np.concatenate([self.mask, np.ones((len(self.slots), 1), np.int64)], axis=1)
        feeds = {"input_ids": last, "attention_mask": mask, "position_ids": np.cumsum(mask, axis=1)[:, -1:] - 1,
                 **self.past}
        live = self.rows
        out = self._run(feeds, [r.adapter if r is not None else live[0].adapter for r in self.slots])
        for i, (request, rng) in enumerate(zip(self.slots, self.rngs)):
            if request is not None:
                self._take(request, rng, out[LOGITS][i:i + 1, -1, :])
        self.past = {self.presents[k]: v for k, v in out.items() if k in self.presents}
        self.mask = mask

    def _run(self, feeds: dict[str, np.ndarray], adapters: list[str | None]) -> dict[str, np.ndarray]:
        if self.banked:
            return self.session.run(feeds, adapters=adapters)
        return self.session.run(feeds, adapters[0])  # one adapter in the batch (step admits only that one)

    def _take(self, request: Request, rng: np.random.Generator, logits: np.ndarray) -> None:
        if request.cancelled:
            self._cancel(request)
            return
        token = int(pick_tokens(logits.astype(np.float32), rng, **request.sampling())[0])
        request.tokens.append(token)
        eos = set(self.facts.get("eos_token_id") or []) if request.eos_token_id is None else set(request.eos_token_id)
        request.done = token in eos or len(request.tokens) >= request.max_new_tokens
        if request.on_token is not None:
            request.on_token(token, request.done)

    def _cancel(self, request: Request) -> Request:
        request.done = True
        if request.on_token is not None:
            request.on_token(None, True)
        return request

    def abort(self, message: str) -> list[Request]:
        """End every request in the batcher now, each with ``error`` set (a run failed, or the server stops)."""
        ended = self.rows + self.waiting
        self.waiting = []
        self._drop([])
        for request in ended:
            if not request.done:
                request.error = message
                self._cancel(request)
        return ended

    def _leave(self) -> list[Request]:
        for request in self.rows:
            if request.cancelled and not request.done:
                self._cancel(request)
        finished = [r for r in self.rows if r.done]
        for i, request in enumerate(self.slots):
            if request is not None and request.done:
                self.slots[i] = self.rngs[i] = None
        busy = [i for i, r in enumerate(self.slots) if r is not None]
        if not busy or (len(self.slots) - len(busy) >= len(busy) and not self.waiting):
            self._drop(busy)  # no one to fill the free rows soon: copy the busy ones out
        elif finished:
            start = int(np.argmax(self.mask[busy].any(axis=0)))
            if start >= self.trim:  # columns no running row uses: gone (a view; free rows are rewritten when used)
                self.mask = self.mask[:, start:]
                self.past = {k: v[:, :, start:] for k, v in self.past.items()}
        return finished

    def _drop(self, keep: list[int]) -> None:
        """Keep rows ``keep``; cache columns no remaining row uses go too."""
        self.slots = [self.slots[i] for i in keep]
        self.rngs = [self.rngs[i] for i in keep]
        if not keep:
            self.slots, self.rngs, self.past, self.mask = [], [], {}, np.zeros((0, 0), np.int64)
            return
        mask = self.mask[keep]
        start = int(np.argmax(mask.any(axis=0)))
        self.mask = mask[:, start:]
        self.past = {k: v[keep][:, :, start:] for k, v in self.past.items()}


def _left_pad(array: np.ndarray, length: int, axis: int) -> np.ndarray:
    extra = length - array.shape[axis]
    if extra <= 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (extra, 0)
    return np.pad(array, widths)
