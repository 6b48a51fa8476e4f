"""OpenAI's completions request and response, as ``surgeon serve`` reads and writes them (plain data, no I/O).

A request body becomes a ``Completion``: the batcher's ``Request`` plus what the response needs (stop strings,
the model name, whether to stream). A field the server cannot honour is refused by name rather than ignored:
``n`` above 1, ``echo``, ``logprobs``, penalties, ``logit_bias``, ``suffix``. ``temperature`` 0 is greedy
decoding; above 0 samples with ``top_p`` and ``top_k``. ``top_k`` and ``ignore_eos`` (generate ``max_tokens``
whatever comes) are extensions vLLM reads too, sent with the ``openai`` client's ``extra_body``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

from surgeon.errors import SurgeonError, did_you_mean
from surgeon.onnx.batching import Request

BASE = "base"  # the model name of the export's base (no adapter); PEFT's "__base__" is read as the same
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "stream_options", "n", "best_of", "echo", "logprobs", "presence_penalty", "frequency_penalty",
          "logit_bias", "suffix", "user", "ignore_eos"}
NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0,
           "logit_bias": {}, "suffix": None}  # accepted at these values only: anything else would be ignored


class ApiError(SurgeonError, ValueError):
    """A request the server refuses: ``status`` (400, 401, 404, 429, 503), the field at fault (``param``)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}


@dataclasses.dataclass
class Completion:
    request: Request
    model: str
    stops: list[str]
    stream: bool
    usage_in_stream: bool
    used: int = 0  # new tokens the response holds (the batch may have made one more before a stop string ended it)
    id: str = dataclasses.field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def _number(body: dict, name: str, default: float, low: float, high: float = math.inf) -> float:
    value = body.get(name, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ApiError(f"{name}={value!r}: give a number in [{low}, {high}]", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ApiError(f"{name}={value!r}: give an integer >= {low}", param=name)
    return value


def _prompt(body: dict, encode) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list (the client's batch form) is that prompt
    if isinstance(prompt, str):
        ids = encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(f"prompt: {len(prompt)} prompts in one request; send one prompt per request (they are batched "
                       "together on the server anyway)", param="prompt")
    else:
        raise ApiError(f"prompt: give a string or a list of token ids, got {type(prompt).__name__}", param="prompt")
    if not ids:
        raise ApiError("prompt: it encodes to no tokens; give some text", param="prompt")
    return ids


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ApiError(f"stop={stop!r}: give a string or a list of at most 4 strings", param="stop")
    return stops


def parse_completion(body: Any, models: list[str], encode) -> Completion:
    """``body`` (the decoded JSON) as a ``Completion``, or the ``ApiError`` naming the field; ``models``: the names
    the server answers to (the base first); ``encode``: text -> token ids."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(f"unknown fields: {', '.join(u + did_you_mean(u, FIELDS) for u in unknown)}", param=unknown[0])
    for name, neutral in NEUTRAL.items():
        if body.get(name) is not None and body[name] != neutral:
            raise ApiError(f"{name}={body[name]!r} is not supported by surgeon serve; leave it out (or {neutral!r})",
                           param=name)
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError("model: give the adapter's name (GET /v1/models lists them)", param="model")
    if model not in models and model != "__base__":
        raise ApiError(f"model {model!r} does not exist{did_you_mean(model, models)}; this server has: "
                       f"{', '.join(models)}", status=404, param="model", kind="not_found_error")
    temperature = _number(body, "temperature", 1.0, 0.0)
    request = Request(_prompt(body, encode), None if model in (BASE, "__base__") else model,
                      max_new_tokens=_integer(body, "max_tokens", 16, 1), do_sample=temperature > 0,
                      temperature=temperature if temperature > 0 else 1.0, top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                      top_k=max(_integer(body, "top_k", 0, -1), 0), seed=_integer(body, "seed", None, 0))
    ignore_eos = body.get("ignore_eos") or False
    if not isinstance(ignore_eos, bool):
        raise ApiError(f"ignore_eos={ignore_eos!r}: give true or false", param="ignore_eos")
    request.eos_token_id = [] if ignore_eos else None
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError("stream must be true or false; stream_options may hold include_usage only", param="stream")
    return Completion(request, model, _stops(body), stream, bool(options.get("include_usage")))


def choice(text: str, finish: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}


def usage(job: Completion) -> dict[str, int]:
    prompt, new = len(job.request.ids), job.used
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


def response(job: Completion, choices: list[dict], with_usage: bool = True) -> dict[str, Any]:
    out = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model, "choices": choices}
    if with_usage:
        out["usage"] = usage(job)
    return out


def model_list(models: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "surgeon"}
                                       for m in models]}
