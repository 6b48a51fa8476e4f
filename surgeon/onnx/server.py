"""``surgeon serve``: an OpenAI-style HTTP server for an export, one batch across adapters.

Starlette on uvicorn: a small, well-kept ASGI stack whose streaming response watches for the client going away
(so a disconnected stream's row is dropped at the next token), with uvicorn's graceful shutdown on SIGTERM (no new
connections; in-flight responses finish within ``--shutdown-timeout``, then are cancelled). Routes:
``POST /v1/completions`` (server-sent events with ``stream``), ``GET /v1/models``, ``GET /health`` and
Prometheus' ``GET /metrics`` (prometheus_client's own exposition). The batcher runs on the engine's thread; each
token crosses to the event loop through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from surgeon.errors import SurgeonError
from surgeon.onnx.engine import Engine, QueueFullError, StoppingError, Text, load_tokenizer
from surgeon.onnx.openai_api import BASE, ApiError, Completion, choice, model_list, parse_completion, response, usage
from surgeon.onnx.runtime import AdapterSession

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (two servers in one process do not mix)."""

    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("surgeon_requests", "Completion requests answered, by model and HTTP status",
                                ["model", "status"], registry=registry)
        self.prompt_tokens = Counter("surgeon_prompt_tokens", "Prompt tokens prefilled", ["model"], registry=registry)
        self.tokens = Counter("surgeon_generated_tokens", "Tokens generated", ["model"], registry=registry)
        self.cancelled = Counter("surgeon_cancelled_requests", "Requests dropped before they finished (the client "
                                 "went away, or shutdown)", registry=registry)
        self.batch = Histogram("surgeon_batch_rows", "Rows in each decode step", registry=registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.busy = Counter("surgeon_engine_busy_seconds", "Time the batcher spent in prefill and decode steps",
                            registry=registry)
        self.latency = Histogram("surgeon_request_seconds", "Time from a request's arrival to its last token",
                                 registry=registry, buckets=LATENCY_BUCKETS)
        self.first = Histogram("surgeon_time_to_first_token_seconds", "Time from a request's arrival to its first "
                               "token", registry=registry, buckets=LATENCY_BUCKETS)
        Gauge("surgeon_queue_depth", "Requests waiting to join the batch", registry=registry).set_function(
            lambda: engine.waiting)
        Gauge("surgeon_running_rows", "Requests in the decode batch", registry=registry).set_function(
            lambda: engine.running)

    def step(self, rows: int, seconds: float) -> None:
        if rows:
            self.batch.observe(rows)
        self.busy.inc(seconds)

    def answer(self, model: str, status: int) -> None:
        self.requests.labels(model, str(status)).inc()

    def cancel(self) -> None:
        self.cancelled.inc()

    def total(self, counter: Counter, **labels: str) -> int:
        """``counter``'s count over every label set matching ``labels`` (the summary line at shutdown)."""
        return int(sum(sample.value for metric in counter.collect() for sample in metric.samples
                       if sample.name.endswith("_total") and labels.items() <= sample.labels.items()))


class Server:
    """What the routes share: the session, the tokenizer, the engine, the metrics, the key."""

    def __init__(self, export_dir: str | Path, *, max_batch: int = 8, max_queue: int = 64, threads: int | None = None,
                 api_key: str | None = None):
        self.dir = Path(export_dir)
        self.session = AdapterSession(self.dir, intra_op_threads=threads)
        self.tokenizer = load_tokenizer(self.dir)
        self.engine = Engine(self.session, max_batch=max_batch, max_queue=max_queue)
        self.metrics = Metrics(self.engine)
        self.engine.on_step = self.metrics.step
        self.api_key = api_key
        bank = self.session.bank
        adapters = [s for s in bank["slots"] if s is not None] if bank else \
            [a for a in self.session.adapters if a not in self.session.prompt_tokens]
        self.models = [BASE] + [a for a in adapters if a != BASE]
        self.created = int(time.time())

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.engine.start()
            try:
                yield
            finally:
                self.engine.stop()

        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.list_models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics_text, methods=["GET"])]
        app = Starlette(routes=routes, lifespan=lifespan)
        app.add_middleware(_KeyCheck, key=self.api_key)
        return app

    # ---- routes --------------------------------------------------------------------------------------------------
    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "running": self.engine.running, "waiting": self.engine.waiting,
                             "models": self.models})

    async def list_models(self, request: HttpRequest) -> Response:
        return JSONResponse(model_list(self.models, self.created))

    async def metrics_text(self, request: HttpRequest) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, request: HttpRequest) -> Response:
        start = time.perf_counter()
        model = "-"  # until the body names one
        try:
            try:
                body = json.loads(await request.body())
            except ValueError as err:
                raise ApiError(f"the request body is not JSON ({err})") from None
            job = parse_completion(body, self.models, self.encode)
            model = job.model
            pieces = self._run(job, start)
        except ApiError as err:
            return self._refuse(model, err)
        except QueueFullError as err:
            return self._refuse(model, ApiError(str(err), 429, kind="rate_limit_error"))
        except StoppingError as err:
            return self._refuse(model, ApiError(str(err), 503, kind="server_error"))
        except SurgeonError as err:  # the batcher's refusals: the prompt does not fit, sampling out of range
            message = str(err).replace("max_new_tokens", "max_tokens")  # in the API's words
            return self._refuse(model, ApiError(message, 400, param=_param_of(message)))
        if job.stream:
            return StreamingResponse(self._events(job, pieces), media_type="text/event-stream")
        return await self._whole(request, job, pieces)

    # ---- one completion ------------------------------------------------------------------------------------------
    def _run(self, job: Completion, start: float) -> AsyncIterator[tuple[str, str | None]]:
        """Submit ``job``; returns the async iterator of (text, finish reason) pieces. Leaving it early cancels
        the request (its row leaves the batch at the next token)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        made = self.metrics.tokens.labels(job.model)

        def on_token(token, done):  # on the engine's thread
            if token is not None:
                made.inc()
            loop.call_soon_threadsafe(queue.put_nowait, (token, done))

        job.request.on_token = on_token
        self.engine.submit(job.request)
        self.metrics.prompt_tokens.labels(job.model).inc(len(job.request.ids))
        text = Text(self.tokenizer, job.stops)

        async def pieces():
            finished = False
            try:
                while True:
                    arrived = [await queue.get()]
                    while not queue.empty():  # tokens that queued meanwhile go out as one event (less work per token)
                        arrived.append(queue.get_nowait())
                    piece = ""
                    for token, done in arrived:
                        if token is None:  # cancelled, or the engine failed / stopped
                            raise _Ended(job.request.error or "cancelled")
                        piece += text.add(token)
                        job.used = len(text.ids)
                        if job.used == 1:
                            self.metrics.first.observe(time.perf_counter() - start)
                        if text.stopped or done:
                            job.request.cancelled = not done  # a stop string ends the row early
                            finished = True
                            reason = "stop" if text.stopped or job.used < job.request.max_new_tokens else "length"
                            yield piece + text.end(), reason
                            self.metrics.latency.observe(time.perf_counter() - start)
                            self.metrics.answer(job.model, 200)
                            return
                    if piece:
                        yield piece, None
            finally:
                if not finished:
                    job.request.cancelled = True
                    self.metrics.cancel()

        return pieces()

    async def _events(self, job: Completion, pieces) -> AsyncIterator[str]:
        try:
            async for piece, finish in pieces:
                yield _event(response(job, [choice(piece, finish)], with_usage=False))
            if job.usage_in_stream:
                yield _event({**response(job, [], with_usage=False), "usage": usage(job)})
        except _Ended as err:
            self.metrics.answer(job.model, 500)
            yield _event(ApiError(f"generation ended early: {err}", 500, kind="server_error").body())
        yield "data: [DONE]\n\n"

    async def _whole(self, request: HttpRequest, job: Completion, pieces) -> Response:
        async def collect():
            text, reason = [], None
            async for piece, finish in pieces:
                text.append(piece)
                reason = finish
            return "".join(text), reason

        work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client went away: dropping the collector cancels the request
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, _Ended):
                await work
            return Response(status_code=499)
        try:
            text, reason = work.result()
        except _Ended as err:
            self.metrics.answer(job.model, 500)
            return JSONResponse(ApiError(f"generation ended early: {err}", 500, kind="server_error").body(), 500)
        return JSONResponse(response(job, [choice(text, reason)]))

    def _refuse(self, model: str, err: ApiError) -> Response:
        self.metrics.answer(model, err.status)
        return JSONResponse(err.body(), status_code=err.status)


class _Ended(Exception):
    """A request's row ended without its last token (cancelled, or the engine failed or stopped)."""


class _KeyCheck:
    """``--api-key``: every request carries ``Authorization: Bearer KEY`` (the ``openai`` client's ``api_key``)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if hmac.compare_digest(header.encode(), f"Bearer {self.key}".encode()):
            return await self.app(scope, receive, send)
        err = ApiError("missing or wrong API key: send the header 'Authorization: Bearer KEY' (the openai client's "
                       "api_key)", 401, kind="authentication_error")
        await JSONResponse(err.body(), status_code=401)(scope, receive, send)


async def _disconnected(request: HttpRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _param_of(message: str) -> str | None:
    return next((name for name in ("prompt", "max_tokens", "temperature", "top_p", "top_k") if name in message), None)
