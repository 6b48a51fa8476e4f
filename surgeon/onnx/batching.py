"""Continuous batching across adapters on an adapter-bank export (the engine ``surgeon serve`` is to run).

Requests join the running decode batch at token boundaries and leave when done. Each row runs its own adapter
(the bank's ``adapter_ids``), its own sampling settings and random generator, and its own stop condition. A new
request is prefilled alone, then joins: its KV cache and the running rows' are left-padded to one length, with the
padding masked out, so one ONNX Runtime run serves every row's next token. A row's tokens are those of
``AdapterSession.generate`` on that request alone: the same prefill, the same positions (counted over real
tokens only), and the same draws from its generator.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from surgeon.errors import AdapterError
from surgeon.names import LOGITS, past_of_present
from surgeon.onnx.decoding import check_prompt, empty_past, pick_tokens
from surgeon.onnx.runtime import AdapterSession
from surgeon.sampling import check_sampling


@dataclasses.dataclass
class Request:
    """One generation: prompt token ids, the adapter (None: the base), and ``AdapterSession.generate``'s settings.
    ``tokens`` fills with the new tokens as it runs; ``done`` when it stopped (end of sequence or the limit)."""

    ids: list[int]
    adapter: str | None = None
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_id: list[int] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    done: bool = False

    def sampling(self) -> dict:
        return {"do_sample": self.do_sample, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


class Batcher:
    """Rows of different adapters and lengths in one decode batch, at most ``max_batch`` at a time.

    ``submit`` checks a request (unknown adapter, a prompt too long for the context, bad sampling: named errors) and
    queues it; each ``step`` admits queued requests while there is room (their prefill gives their first token) and
    runs one decode step for the rows already running; finished rows leave at once."""

    def __init__(self, session: AdapterSession, max_batch: int = 8):
        if session.bank is None:
            raise AdapterError(f"{session.dir}: continuous batching across adapters needs an adapter-bank export; "
                               "re-export with `surgeon export MODEL ADAPTER_DIR... -o OUT --bank --kv-cache`")
        self.session, self.max_batch = session, max_batch
        self.facts = session.generation  # also refuses an export without a KV cache, by name
        self.waiting: list[Request] = []
        self.rows: list[Request] = []
        self.rngs: list[np.random.Generator] = []
        self.past: dict[str, np.ndarray] = {}
        self.mask = np.zeros((0, 0), np.int64)
        self.presents = past_of_present(self.facts["layers"])

    def submit(self, request: Request) -> Request:
        check_sampling({**request.sampling(), "max_new_tokens": request.max_new_tokens}, "Batcher.submit")
        check_prompt(np.array([request.ids]), None, self.facts, request.max_new_tokens)
        self.session.slots([request.adapter], 1)  # an adapter the bank does not hold fails here, by name
        self.waiting.append(request)
        return request

    def step(self) -> list[Request]:
        """Admit what fits, decode one token for the rows that were running; returns the requests that finished."""
        if self.rows:
            self._decode()
        finished = self._leave()
        while self.waiting and len(self.rows) < self.max_batch:
            self._admit(self.waiting.pop(0))
        return finished + self._leave()  # a request can end at its prefill (max_new_tokens 1, or end of sequence)

    def run(self) -> None:
        """Step until every submitted request is done."""
        while self.waiting or self.rows:
            self.step()

    # ---- the batch -----------------------------------------------------------------------------------------------
    def _admit(self, request: Request) -> None:
        ids = np.array([request.ids], np.int64)
        mask = np.ones_like(ids)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.cumsum(mask, axis=1) - 1,
                 **empty_past(self.facts, 1)}
        out = self.session.run(feeds, adapters=[request.adapter])
        rng = np.random.default_rng(request.seed)
        self._take(request, rng, out[LOGITS][:, -1, :])
        past = {self.presents[k]: v for k, v in out.items() if k in self.presents}
        self._join(request, rng, past, mask)

    def _decode(self) -> None:
        last = np.array([[r.tokens[-1]] for r in self.rows], np.int64)
        mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], axis=1)
        feeds = {"input_ids": last, "attention_mask": mask, "position_ids": np.cumsum(mask, axis=1)[:, -1:] - 1,
                 **self.past}
        out = self.session.run(feeds, adapters=[r.adapter for r in self.rows])
        for i, (request, rng) in enumerate(zip(self.rows, self.rngs)):
            self._take(request, rng, out[LOGITS][i:i + 1, -1, :])
        self.past = {self.presents[k]: v for k, v in out.items() if k in self.presents}
        self.mask = mask

    def _take(self, request: Request, rng: np.random.Generator, logits: np.ndarray) -> None:
        token = int(pick_tokens(logits.astype(np.float32), rng, **request.sampling())[0])
        request.tokens.append(token)
        eos = set(self.facts.get("eos_token_id") or []) if request.eos_token_id is None else set(request.eos_token_id)
        request.done = token in eos or len(request.tokens) >= request.max_new_tokens

    def _join(self, request: Request, rng, past: dict[str, np.ndarray], mask: np.ndarray) -> None:
        """Append one row: every cache and the mask left-padded to the longer length (padding masked out)."""
        length = max(self.mask.shape[1], mask.shape[1])
        self.past = {k: np.concatenate([_left_pad(self.past[k], length, 2), _left_pad(v, length, 2)])
                     if self.rows else v for k, v in past.items()}
        self.mask = np.concatenate([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)]) if self.rows \
            else mask
        self.rows.append(request)
        self.rngs.append(rng)

    def _leave(self) -> list[Request]:
        finished = [r for r in self.rows if r.done]
        if finished:
            self._drop([i for i, r in enumerate(self.rows) if not r.done])
        return finished

    def _drop(self, keep: list[int]) -> None:
        """Keep rows ``keep``; cache columns no remaining row uses go too."""
        self.rows = [self.rows[i] for i in keep]
        self.rngs = [self.rngs[i] for i in keep]
        if not keep:
            self.past, self.mask = {}, np.zeros((0, 0), np.int64)
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
