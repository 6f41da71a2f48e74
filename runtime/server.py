"""`meshwright serve`: the engine behind an OpenAI-compatible HTTP API (Starlette on uvicorn).

    $ meshwright serve                       # the bundled model on http://127.0.0.1:8000
    $ curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "palm-kjv", "prompt": "In the beginning", "max_tokens": 16}'

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both stream as server-sent
events ending with `data: [DONE]` when asked), `GET /v1/models`, `GET /health` (200 once
every bucket is compiled, 503 while loading or draining), `GET /metrics` (Prometheus text).
Request bodies are parsed and checked by `openai_api`.

Processes. The engine runs in a process of its own (`engine_process`): it builds the engine
(compiling every bucket), then runs its loop (`Engine.run_forever`) and sends the tokens and
results its iterations produced, one message at most every 2 ms (a first token or a result at
once: `engine_process.HANDOVER_S`; every 8 ms while requests queue: `engine_process.Pace`). The
HTTP handlers run on uvicorn's asyncio loop in the server process; that loop reads the pipe
from the engine every millisecond while requests are in flight (and is woken by it otherwise:
`engine_process.POLL_S`), and each message goes to the mailboxes of the requests it names. The
two processes share only the cores: in one process, every streamed chunk the loop writes would
hold back the engine's next step (both need the interpreter's lock). Once compiled, the HTTP
process keeps to one core, and by default the engine's loop to the others, while XLA's threads
(which run the programs the loop dispatches) may use every core (`--engine-cpus`, `cpu_split`,
`engine_process.pin_split`).

Trouble. A client that disconnects aborts its request (`Engine.abort`: the slot is free at
the next iteration). A full queue answers 429 with Retry-After; an invalid request 400 with
OpenAI's error object; an unknown model 404; a body past `max_body_bytes` 413. SIGTERM (or
Ctrl-C) stops admitting (the listening socket closes, /health says "draining", requests that
still reach a handler get 503), lets the requests in flight finish for up to `drain_timeout_s`,
aborts what is left, stops the engine and exits 0. With an API key every endpoint but /health
needs `Authorization: Bearer KEY` (compared in constant time; 401 otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from meshwright.runtime import openai_api as api
from meshwright.runtime.engine_process import (
    EngineFacts,
    EngineProcess,
    pin_process,
)
from meshwright.runtime.prometheus import CONTENT_TYPE, Counter, Histogram, family
from meshwright.runtime.request import Request, Result

API_KEY_ENV = "MESHWRIGHT_API_KEY"  # the API key when --api-key is not given
DEFAULT_MODEL = "palm-kjv"  # the bundled demo model (models/demo.py)
RETRY_AFTER_S = 1  # what a 429 or 503 tells the client to wait
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions:
    """Settings of `meshwright serve` (the CLI flags of the same names)."""

    model: str = DEFAULT_MODEL  # a preset (random weights) or the bundled model, palm-kjv
    checkpoint: str | None = None  # a Hugging Face checkpoint directory instead
    model_fn: str | None = None  # or MODULE:FACTORY returning (model, params)
    overrides: tuple[str, ...] = ()  # --set key=value on a preset
    model_name: str | None = None  # the id clients send as "model" (default: the model's name)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the address line says which)
    devices: int = 1  # > 1: every bucket mw.shard-compiled on that many devices
    hardware: str = "cpu"  # the profile the planner prices layouts with
    max_slots: int = 8
    max_len: int | None = None  # default: the model's
    max_queue: int = 256  # waiting requests beyond this get 429
    policy: str = "fused"
    max_tokens: int | None = None  # most tokens one request may ask for (default max_len - 1)
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    drain_timeout_s: float = 30.0
    stream_interval_s: float = 0.0  # a stream sends at most one chunk per interval (0: one
    #                                 per engine step that gave it tokens)
    engine_cpus: str = "auto"  # where the two processes run once ready (`cpu_split`)
    cpus: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # set by `serve`: (the engine
    #                                 process's CPUs, the HTTP process's; empty: not pinned)
    seed: int = 0  # random weights of a preset
    access_log: bool = False
    progress: bool = True  # the compile progress bar on stderr
    json: bool = False  # the start-up report as one JSON object instead of text
    cache_dir: str | None = "auto"  # persistent XLA cache (see runtime/demo.py)


# ---------------------------------------------------------------------------------------------
# Engine -> handlers


GONE = "client disconnected"  # delivered to a submission when its client goes away


class Submission:
    """One request in the engine as its handler sees it: tokens, its Result, a disconnect or
    an engine failure arrive, in order, in its mailbox (`put`); the handler takes everything
    there at once (`next`). Everything here runs on the event loop. The handler is woken only
    when it waits: one busy sending, or sleeping out `--stream-interval`, finds its tokens when
    it comes back."""

    def __init__(self) -> None:
        self.rid: int | None = None  # its id in the engine process, once submitted
        self.finished = False  # its Result arrived: nothing to abort
        self._items: list = []
        self._waiter: asyncio.Future | None = None  # set while the handler waits

    def put(self, item: int | Result | str) -> None:
        if isinstance(item, Result):
            self.finished = True
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():  # the handler waits: wake it
            waiter.set_result(None)

    async def next(self) -> tuple[list[int], Result | None, str | None]:
        """Wait for news: (new tokens, the Result if it ended, a reason to give up)."""
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        items, self._items = self._items, []
        tokens, result, trouble = [], None, None
        for item in items:
            if type(item) is int:
                tokens.append(item)
            elif isinstance(item, Result):
                result = result or item
            else:
                trouble = trouble or item
        return tokens, result, trouble


# ---------------------------------------------------------------------------------------------
# Metrics


class ServerMetrics:
    """What `GET /metrics` reports: the server's counters and histograms, and the engine's
    state read at scrape time."""

    def __init__(self) -> None:
        self.requests = Counter("meshwright_requests_total",
                                "HTTP generation requests by endpoint and outcome (stop, length: "
                                "completed; disconnected; invalid; queue_full; unavailable; "
                                "unauthorized; cancelled; error)")
        self.prompt_tokens = Counter("meshwright_prompt_tokens_total",
                                     "prompt tokens of admitted requests")
        self.generated_tokens = Counter("meshwright_generation_tokens_total",
                                        "tokens generated for HTTP requests")
        self.step = Histogram("meshwright_step_seconds", "one engine iteration (schedule, "
                              "shuffle, prefill, decode, deliver)",
                              (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1))
        self.ttft = Histogram("meshwright_time_to_first_token_seconds",
                              "request received to its first token handed to the handler",
                              (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                               5, 10))
        self.latency = Histogram("meshwright_request_seconds",
                                 "request received to its last token", (0.01, 0.025, 0.05, 0.1,
                                                                        0.25, 0.5, 1, 2.5, 5, 10,
                                                                        30, 60))

    def text(self, engine_lines: list[str] | None, status: str) -> str:
        """`engine_lines`: the engine's families (`engine_metric_lines`), once it runs."""
        parts = [self.requests.text(), self.prompt_tokens.text(), self.generated_tokens.text(),
                 self.step.text(), self.ttft.text(), self.latency.text(),
                 family("meshwright_ready", "gauge", "1 when serving, 0 while loading, "
                        "draining or failed", [({}, int(status == "ready"))])]
        if engine_lines is not None:
            parts += engine_lines
        return "\n".join(parts) + "\n"


def engine_metric_lines(engine) -> list[str]:
    """The engine's state as Prometheus families (read in the engine process, whose loop may
    change it meanwhile)."""
    waiting, running = engine.queue_depth()
    stats = engine.stats
    for _ in range(5):  # the engine loop may add a key meanwhile: copy again
        try:
            runs = sorted(stats.runs.items())
            break
        except RuntimeError:
            continue
    else:
        runs = []
    steps = [({"phase": phase, "bucket": f"{b.batch}x{b.length}",
               "layout": engine.layouts.get((phase, b), "replicated")}, n)
             for (phase, b), n in runs]
    current = engine.last_decode_bucket
    in_use = [] if current is None else [
        ({"bucket": f"{current.batch}x{current.length}",
          "layout": engine.layouts.get(("decode", current), "replicated")}, 1)]
    return [
        family("meshwright_queue_waiting", "gauge", "requests waiting for a KV slot",
               [({}, waiting)]),
        family("meshwright_requests_running", "gauge", "requests holding a KV slot",
               [({}, running)]),
        family("meshwright_slots", "gauge", "KV slots (the largest decode bucket)",
               [({}, engine.max_slots)]),
        family("meshwright_engine_steps_total", "counter", "engine steps run, by phase, "
               "bucket (rows x length) and the layout it runs", steps or [({}, 0)]),
        family("meshwright_bucket_in_use", "gauge", "the decode bucket of the latest step and "
               "its layout", in_use),
        family("meshwright_engine_tokens_total", "counter", "tokens the engine produced",
               [({}, stats.tokens)]),
        family("meshwright_engine_aborted_total", "counter",
               "requests aborted while waiting or running (their slots freed)",
               [({}, stats.aborted)]),
        family("meshwright_kv_moves_total", "counter", "KV slot moves of the memory shuffle",
               [({}, stats.moves)]),
        family("meshwright_layout_switches_total", "counter",
               "consecutive decode steps that ran different layouts",
               [({}, stats.layout_switches)]),
    ]


# ---------------------------------------------------------------------------------------------
# The HTTP application


class Server:
    """The application: routes, the engine process, metrics. `app` is the ASGI app."""

    def __init__(self, options: ServeOptions, out=sys.stdout) -> None:
        self.options = options
        self.out = out
        self.metrics = ServerMetrics()
        self.runner = EngineProcess(options, self._on_engine)
        self.text: api.ModelText | None = None
        self.limits: api.Limits | None = None
        self.model_id = options.model_name or ""
        self.created = int(time.time())
        self.draining = False
        self.address = ""  # http://host:port, once bound
        self.http_cpus: list[int] | None = None  # the CPUs this process was pinned to
        self.uvicorn: Any = None  # the uvicorn.Server, once running
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active: set[Submission] = set()
        self.app = self._make_app()

    # ---- status ---------------------------------------------------------------------------
    @property
    def status(self) -> str:
        if self.runner.status == "ready" and self.draining:
            return "draining"
        return self.runner.status

    def _on_engine(self, message: tuple) -> None:
        """A message from the engine process (its tokens went to their mailboxes already)."""
        kind = message[0]
        if kind == "step":
            for seconds in message[1]:
                self.metrics.step.observe(seconds)
        elif kind == "ready":
            try:
                self._ready(message[1], message[2])
            except Exception as e:  # noqa: BLE001 (a bad setting: reported, the server stops)
                self.runner.status, self.runner.error = "failed", e
                self._failed(e, ran=False)
        elif kind == "failed":
            self._failed(message[1], ran=message[2])

    def _ready(self, facts: EngineFacts, seconds: float) -> None:
        """Every bucket compiled: the server answers from now on."""
        self.text = model_text(facts, self.options)
        self.model_id = self.options.model_name or facts.name
        max_tokens = self.options.max_tokens or facts.max_len - 1
        if not 1 <= max_tokens < facts.max_len:
            raise ValueError(f"--max-tokens {max_tokens} must be in 1..max_len-1 "
                             f"({facts.max_len - 1})")
        self.limits = api.Limits(max_len=facts.max_len, vocab_size=facts.vocab_size,
                                 max_tokens=max_tokens)
        http_cpus = self.options.cpus[1] if self.options.cpus else ()
        if http_cpus:  # the engine is compiled: from now on the processes keep to their cores
            try:
                pin_process(http_cpus)
                self.http_cpus = sorted(os.sched_getaffinity(0))
            except OSError as e:
                facts.notes.append(f"the HTTP process is not pinned to CPUs "
                                   f"{list(http_cpus)}: {e.strerror}")
        report = startup_report(self, facts, seconds)
        if self.options.json:
            say(self.out, json.dumps(report, sort_keys=True))
        else:
            say(self.out, format_report(report))

    def _failed(self, error: BaseException, ran: bool) -> None:
        """Building or running the engine failed. Requests in flight get a 500; the server
        stops (the CLI reports the error)."""
        if ran:  # it served: say what broke, for the operator
            traceback.print_exception(error, file=sys.stderr)
        for sub in list(self._active):
            sub.put(f"the engine failed: {error}")
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True

    def begin_drain(self) -> None:
        """SIGTERM or Ctrl-C: admit nothing more; what is in flight finishes."""
        if not self.draining:
            self.draining = True
            say(self.out, f"draining: {len(self._active)} request(s) in flight, up to "
                          f"{self.options.drain_timeout_s:g} s")

    # ---- the app --------------------------------------------------------------------------
    def _make_app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self._loop = asyncio.get_running_loop()
            self.runner.start(self._loop)
            yield
            await asyncio.to_thread(self.runner.stop)

        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics_text, methods=["GET"])]
        routed = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
            404: self._not_found, 405: self._not_allowed})
        # The generation endpoints are called straight from the ASGI entry, not through
        # Starlette's router and middleware: a streamed answer sends a message per batch of
        # tokens, and each of those layers would wrap every send.
        generate = {"/v1/completions": self.completions,
                    "/v1/chat/completions": self.chat_completions}

        async def app(scope, receive, send):
            handler = generate.get(scope["path"]) if scope["type"] == "http" and \
                scope["method"] == "POST" else None
            if handler is None:
                return await routed(scope, receive, send)
            from starlette.requests import Request

            response = await handler(Request(scope, receive))
            await response(scope, receive, send)

        key = self.options.api_key
        return BearerAuth(app, key, self._unauthorized) if key else app

    async def _not_found(self, request, exc):
        return _error(404, f"no such endpoint: {request.method} {request.url.path}",
                      "invalid_request_error", code="not_found")

    async def _not_allowed(self, request, exc):
        return _error(405, f"{request.url.path} does not take {request.method}",
                      "invalid_request_error", code="method_not_allowed")

    def _unauthorized(self) -> None:
        self.metrics.requests.inc(endpoint="any", outcome="unauthorized")

    async def health(self, request):
        from starlette.responses import JSONResponse

        status = self.status
        body = {"status": status, "model": self.model_id or None}
        if status == "failed":
            body["error"] = str(self.runner.error)
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    async def models(self, request):
        from starlette.responses import JSONResponse

        if self.limits is None:
            return self._unavailable()
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created,
            "owned_by": "meshwright", "max_model_len": self.limits.max_len}]})

    async def metrics_text(self, request):
        from starlette.responses import Response

        lines = None
        if self.runner.status == "ready":
            with contextlib.suppress(Exception):  # the engine stopped or failed meanwhile
                lines = await self.runner.metric_lines()
        return Response(self.metrics.text(lines, self.status), media_type=CONTENT_TYPE)

    async def completions(self, request):
        return await self._generate(request, "completions")

    async def chat_completions(self, request):
        return await self._generate(request, "chat")

    def _unavailable(self):
        status = self.status
        why = {"loading": "the model is still compiling; retry when GET /health says ready",
               "draining": "the server is shutting down and admits no new requests",
               }.get(status, f"the engine is not serving ({status})")
        return _error(503, why, "service_unavailable", headers={
            "Retry-After": str(RETRY_AFTER_S)})

    # ---- generation -------------------------------------------------------------------------
    async def _generate(self, request, endpoint: str):
        """Parse and check, submit, then answer whole or as a stream."""
        t_start = time.perf_counter()
        count = self.metrics.requests.inc
        if self.status != "ready":
            count(endpoint=endpoint, outcome="unavailable")
            return self._unavailable()
        try:
            body = api.parse_json(await read_body(request, self.options.max_body_bytes))
            parse = api.parse_chat if endpoint == "chat" else api.parse_completion
            spec = parse(body, self.model_id, self.limits, self.text)
        except api.ApiError as e:
            count(endpoint=endpoint, outcome="invalid")
            return _error(e.status, e.message, e.type, e.param, e.code)
        sub = Submission()
        # A whole answer without stop strings needs only the end: its tokens do not cross
        # to this process one step at a time (the handler is not woken at every step).
        per_token = spec.stream or bool(spec.stop)
        try:
            sub.rid, refused = await self.runner.submit(
                Request(prompt=spec.prompt, max_tokens=spec.max_tokens, sampling=spec.sampling,
                        stop_tokens=self.text.eos_token_ids), per_token, sub)
        except Exception as e:  # noqa: BLE001 (the engine failed or stopped meanwhile)
            count(endpoint=endpoint, outcome="error")
            return _error(500, f"the engine failed: {e}", "server_error")
        if refused is not None:
            return self._refused(refused, endpoint)
        self.metrics.prompt_tokens.inc(len(spec.prompt))
        gen = _Generation(sub, spec, api.TextStream(self.text.decode, spec.stop), t_start)
        answer = api.Answer(endpoint, self.model_id)
        watcher = asyncio.ensure_future(_put_on_disconnect(request.receive, sub))
        self._active.add(sub)
        if spec.stream:
            return EventStream(self._events(gen, answer), on_close=lambda: self._close(
                gen, watcher))
        try:
            text = ""
            while True:
                delta, _, finish, trouble = await self._next(gen)
                if trouble is not None:  # (a client that left gets nothing anyway)
                    return _error(500, trouble, "server_error")
                text += delta
                if finish is not None:
                    ids = gen.text.tokens if self.text.token_ids_only else None
                    return _json(answer.full(text, finish, gen.usage(), ids))
        finally:
            self._close(gen, watcher)

    def _refused(self, result: Result, endpoint: str):
        """The engine refused the request at submit: 429 for a full queue, else 400."""
        from meshwright.runtime.scheduler import QUEUE_FULL

        reason = result.error or "refused"
        if reason.startswith(QUEUE_FULL):
            self.metrics.requests.inc(endpoint=endpoint, outcome="queue_full")
            return _error(429, reason, "rate_limit_error", code="queue_full",
                          headers={"Retry-After": str(RETRY_AFTER_S)})
        self.metrics.requests.inc(endpoint=endpoint, outcome="invalid")
        return _error(400, reason, "invalid_request_error")

    async def _events(self, gen: _Generation, answer: api.Answer) -> AsyncIterator[bytes]:
        """The stream: chat's role chunk, a chunk per batch of new text, the final chunk
        (finish_reason, usage), the usage-only chunk when asked, then [DONE]. A model without
        a tokenizer: a chunk per batch of new tokens, carrying their ids."""
        if answer.endpoint == "chat":
            yield api.sse(answer.chunk("", role=True))
        ids_only = self.text.token_ids_only
        while True:
            delta, tokens, finish, trouble = await self._next(gen)
            if trouble is not None:
                if trouble != GONE:  # the client is still there: say what happened
                    yield api.sse(api.error_body(trouble, "server_error"))
                return
            if delta or (ids_only and tokens):
                yield answer.delta_event(delta, tokens) if ids_only else \
                    answer.delta_event(delta)
                if self.options.stream_interval_s and finish is None:
                    # tokens gather meanwhile: one chunk per interval at most (the engine
                    # does not wait for it)
                    await asyncio.sleep(self.options.stream_interval_s)
            if finish is not None:
                use = gen.usage()
                yield api.sse(answer.chunk(None if answer.endpoint == "chat" else "", finish,
                                           use))
                if gen.spec.include_usage:
                    yield api.sse(answer.usage_chunk(use))
                yield api.SSE_DONE
                return

    async def _next(self, gen: _Generation) -> tuple[str, list[int], str | None, str | None]:
        """Wait for the engine's next tokens: (new text, the new tokens, finish_reason once it
        ends, trouble: the client left or the engine failed). A stop string aborts the request in the
        engine (its slot is free at the next iteration)."""
        endpoint = gen.spec.endpoint
        tokens, result, trouble = await gen.sub.next()
        if trouble is not None:
            gen.outcome = "disconnected" if trouble == GONE else "error"
            self.metrics.requests.inc(endpoint=endpoint, outcome=gen.outcome)
            return "", [], None, trouble
        if tokens and not gen.generated:  # its first token reached the handler
            self.metrics.ttft.observe(time.perf_counter() - gen.t_start)
        elif result is not None and result.tokens and not gen.generated:  # delivered whole
            self.metrics.ttft.observe(time.perf_counter() - gen.t_start - result.latency_s
                                      + result.ttft_s)
        if result is not None:  # tokens not handed over one by one come with the result
            tokens = tokens + result.tokens[gen.generated + len(tokens):]
        gen.generated += len(tokens)
        self.metrics.generated_tokens.inc(len(tokens))
        delta = gen.text.push(tokens)
        finish = None
        if gen.text.stopped:
            self.runner.abort(gen.sub.rid)
            finish = "stop"
        elif result is not None:
            delta += gen.text.finish()
            finish = {"stop": "stop", "length": "length"}.get(result.finish_reason, "abort")
        if finish is not None:
            gen.outcome = finish
            self.metrics.requests.inc(endpoint=endpoint, outcome=finish)
            self.metrics.latency.observe(time.perf_counter() - gen.t_start)
        return delta, tokens, finish, None

    def _close(self, gen: _Generation, watcher: asyncio.Future) -> None:
        """The handler is done with a request (answered, client gone, or cancelled by the
        drain timeout): stop watching its connection, abort it in the engine if it still
        runs there."""
        watcher.cancel()
        self._active.discard(gen.sub)
        if not gen.sub.finished:
            self.runner.abort(gen.sub.rid)
        if gen.outcome is None:
            gen.outcome = "cancelled"
            self.metrics.requests.inc(endpoint=gen.spec.endpoint, outcome="cancelled")


@dataclass
class _Generation:
    """One admitted request while its handler answers it."""

    sub: Submission
    spec: api.GenerationSpec
    text: api.TextStream
    t_start: float  # when the request reached its handler
    generated: int = 0  # tokens received so far
    outcome: str | None = None  # how it ended, once counted in the metrics

    def usage(self) -> dict:
        return api.usage(len(self.spec.prompt), self.generated)


async def _put_on_disconnect(receive, sub: Submission) -> None:
    """Wait for the client to go away (the body is already read, so the next ASGI message
    is http.disconnect) and tell the handler through its mailbox."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            sub.put(GONE)
            return


class EventStream:
    """A `text/event-stream` response whose body comes from an async iterator of events.
    `on_close` runs however it ends: all sent, the client gone, or cancelled."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke while sending
            pass
        finally:
            await self.events.aclose()
            self.on_close()


class BearerAuth:
    """ASGI middleware: every path but /health needs `Authorization: Bearer <key>`. The
    comparison is of SHA-256 digests with `hmac.compare_digest`: constant time, whatever the
    length of what was sent."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app, key: str, on_reject: Callable[[], None]) -> None:
        self.app, self.on_reject = app, on_reject
        self._digest = hashlib.sha256(f"Bearer {key}".encode()).digest()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(hashlib.sha256(sent).digest(), self._digest):
            return await self.app(scope, receive, send)
        self.on_reject()
        message = ("missing API key: send Authorization: Bearer <key>" if not sent
                   else "invalid API key")
        response = _error(401, message, "invalid_request_error", code="invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (by its Content-Length before
    reading, or while reading a body sent without one)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise api.ApiError(f"invalid Content-Length {length!r}")
        if int(length) > limit:
            raise _too_large(int(length), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> api.ApiError:
    return api.ApiError(f"the request body is {size} bytes; this server takes at most {limit} "
                        "(--max-body-bytes)", status=413, code="request_too_large")


def _json(obj: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(obj, separators=(",", ":")), status_code=status,
                    media_type="application/json", headers=headers)


def _error(status: int, message: str, type: str, param: str | None = None,
           code: str | None = None, headers: dict | None = None):
    return _json(api.error_body(message, type, param, code), status, headers)


# ---------------------------------------------------------------------------------------------
# Building the engine and its text


def build_engine(options: ServeOptions):
    """The engine `meshwright serve` runs: `bench.make_engine` (a preset, the bundled model,
    a checkpoint or a model from functions; `devices` > 1: every bucket `mw.shard`-compiled
    in its planned layout) with the persistent compilation cache, the sampler compiled at
    start-up too."""
    from meshwright.runtime import bench
    from meshwright.runtime.demo import use_compilation_cache

    use_compilation_cache(options.cache_dir)
    return bench.make_engine(
        options.model, max_slots=options.max_slots, max_len=options.max_len,
        overrides=options.overrides, seed=options.seed, progress=options.progress,
        checkpoint=options.checkpoint, devices=options.devices, hardware=options.hardware,
        model_fn=options.model_fn, policy=options.policy, max_queue=options.max_queue,
        warm_sampler=True)  # requests sample by default (OpenAI's temperature is 1)


class _Utf8Bytes:
    """The bundled model's byte-level tokenizer (`models.demo.ByteTokenizer`), decoding a
    list of ids in one call: a stream decodes at every step."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def model_text(facts: EngineFacts, options: ServeOptions) -> api.ModelText:
    """How the served model reads and writes text: its tokenizer; for a checkpoint also its
    end-of-sequence ids and chat template (rendered sandboxed). A model without a tokenizer
    (from the user's functions, or a checkpoint without tokenizer.json) reads and writes
    token ids only."""
    eos, template = (), None
    if options.checkpoint is not None:
        from meshwright.models.hf import load_generation_info

        info = load_generation_info(options.checkpoint)
        eos = info.eos_token_ids
        if info.chat_template is not None:
            template = api.ChatTemplate(info.chat_template, info.bos_token, info.eos_token)
    if facts.tokenizer_kind == "none":
        return api.ModelText(None, tuple(eos), None, (
            "text: none, the model has no tokenizer: prompts are token ids, answers carry "
            "token_ids (their text is empty); chat and stop strings are refused"))
    if facts.tokenizer_kind == "bytes":
        tokenizer, note = _Utf8Bytes(), "byte-level: one token per UTF-8 byte"
    else:
        tokenizer, note = facts.tokenizer, "the checkpoint's tokenizer.json"
    chat = ("the checkpoint's chat template (sandboxed Jinja)" if template is not None
            else f"plain: {api.PLAIN_TEMPLATE_DOC}")
    return api.ModelText(tokenizer, tuple(eos), template, f"text: {note}; chat: {chat}")


def startup_report(server: Server, facts: EngineFacts, seconds: float) -> dict:
    """What `meshwright serve` prints once ready (its --json object)."""
    report = {"address": server.address, "model": server.model_id, "max_len": facts.max_len,
              "max_slots": facts.max_slots, "policy": facts.policy,
              "max_queue": facts.max_queue, "max_tokens": server.limits.max_tokens,
              "eos_token_ids": list(server.text.eos_token_ids), "text": server.text.note,
              "buckets": list(facts.buckets), "compile_s": round(seconds, 2),
              "auth": bool(server.options.api_key), "notes": list(facts.notes),
              "cpus": {"engine": facts.cpus, "http": server.http_cpus,
                       "option": server.options.engine_cpus, "compute": facts.compute_cpus},
              "status": "ready", **facts.layout_info}
    if facts.plan_text is not None:
        report["plan_text"] = facts.plan_text
    return report


def say(out, line: str) -> None:
    """A line of the server's log on `out`. A log reader that went away (a closed pipe: the
    process that started the server died) must not stop the server from serving, or from
    draining on SIGTERM: the line is dropped."""
    with contextlib.suppress(OSError, ValueError):  # BrokenPipeError; ValueError: closed file
        print(line, file=out, flush=True)


def cpus_line(cpus: dict) -> str:
    """Where the two processes run (the start-up report's `cpus`)."""
    engine, http, option = cpus["engine"], cpus["http"], cpus["option"]
    if engine is None and http is None:
        why = {"off": "--engine-cpus off", "auto": "--engine-cpus auto: fewer than 2 CPUs, or "
               "a platform without CPU affinity"}.get(option, f"--engine-cpus {option}")
        return f"cpus: not pinned ({why})"
    where = f"the engine process on {cpu_text(engine) if engine else 'any'}"
    if cpus.get("compute"):  # auto: only the loop thread pinned, XLA's threads on every CPU
        where = (f"the engine's loop on {cpu_text(engine)} (XLA's threads on "
                 f"{cpu_text(cpus['compute'])})")
    return (f"cpus: {where}, the HTTP process on "
            f"{cpu_text(http) if http else 'any'} (--engine-cpus {option}; off: not pinned)")


def _by_phase(buckets: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for b in buckets:
        phase, shape = b.split()
        out.setdefault(phase, []).append(shape)
    return out


def format_report(r: dict) -> str:
    lines = [(f"model {r['model']}: max_len {r['max_len']}, {r['max_slots']} slots, policy "
              f"{r['policy']}, queue {r['max_queue']}, max_tokens {r['max_tokens']}"),
             r["text"] + (f"; stops at token ids {r['eos_token_ids']}"
                          if r["eos_token_ids"] else "")]
    if r.get("plan_text"):
        lines.append(r["plan_text"])
    else:
        lines.append("plan: one device, plain jax.jit; buckets (rows x length): "
                     + "; ".join(f"{phase} {' '.join(shapes)}"
                                 for phase, shapes in _by_phase(r["buckets"]).items()))
    lines.append(cpus_line(r["cpus"]))
    lines += [f"note: {n}" for n in r["notes"]]
    lines.append(f"compiled {len(r['buckets'])} buckets in {r['compile_s']:.1f} s")
    lines.append(f"ready: {r['address']}/v1 serves {r['model']!r}"
                 + (" (Bearer API key required)" if r["auth"] else "")
                 + "; SIGTERM or Ctrl-C drains and stops")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Running it


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now, so that a busy port is reported before compiling."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family_, _, _, _, address = infos[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: {e.strerror}") from None
    sock = socket.socket(family_, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port "
                         "(0: any free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def available_cpus() -> set[int] | None:
    """The CPUs this process may run on; None where processes cannot be pinned (not Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    return set(os.sched_getaffinity(0))


def parse_cpus(text: str) -> set[int]:
    """`0-2,5` -> {0, 1, 2, 5}."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        high = high if dash else low
        if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
            raise ValueError(f"--engine-cpus {text!r}: expected auto, off or CPU numbers and "
                             "ranges such as 0-2,5")
        cpus.update(range(int(low), int(high) + 1))
    return cpus


def cpu_split(spec: str, available: set[int] | None) -> tuple[tuple[int, ...],
                                                               tuple[int, ...]]:
    """Where the engine process and the HTTP process run once the server is ready: (the
    engine's CPUs, the HTTP process's); an empty tuple leaves that process unpinned.

    `auto`: the HTTP process on the last CPU this process may use, the engine's loop on the
    others, XLA's threads on every CPU (`engine_process.pin_split`; with fewer than two CPUs,
    or where processes cannot be pinned, neither is pinned): the event loop and the engine's
    loop, both woken at every step, keep off each other's cores, while the programs the engine
    runs may use every core. `off`: neither. A list (`0-2,5`): the engine on those, the HTTP
    process on the rest (if any). Unpinned, the event loop and the clients may push the
    engine's loop from one core to the other, its step then starting with a cold cache (on
    2 cores that cost unpinned streams 18.6-30.7% against 17.4-18.5% pinned before the
    engine's hand-over got cheaper; since, the two are within 2% of each other)."""
    if spec == "off":
        return (), ()
    if spec == "auto":
        if available is None or len(available) < 2:
            return (), ()
        return tuple(sorted(available - {max(available)})), (max(available),)
    engine = parse_cpus(spec)
    if available is None:
        raise ValueError(f"--engine-cpus {spec}: this platform cannot pin processes to CPUs; "
                         "use auto or off")
    if not engine <= available:
        raise ValueError(f"--engine-cpus {spec}: CPU {cpu_text(sorted(engine - available))} "
                         f"not available to this process (it may use {cpu_text(available)})")
    return tuple(sorted(engine)), tuple(sorted(available - engine))


def cpu_text(cpus) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def serve(options: ServeOptions, out=sys.stdout) -> int:
    """Run the server until SIGTERM / Ctrl-C; 0 after a clean drain. Raises ValueError (the
    CLI prints it as one line) when the engine cannot be built or the port not bound."""
    import uvicorn

    _check_options(options)
    if options.api_key is None:
        options.api_key = os.environ.get(API_KEY_ENV) or None
    options.cpus = cpu_split(options.engine_cpus, available_cpus())
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    server = Server(options, out=out)
    server.address = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    if not options.json:
        say(out, f"meshwright serve: listening on {server.address} (GET /health: 503 until "
                 "every bucket is compiled)")
        if options.host not in LOOPBACK and not options.api_key:
            say(out, f"warning: {options.host} is reachable from other machines and no API "
                     f"key is set (--api-key or {API_KEY_ENV})")
    config = uvicorn.Config(server.app, log_level="warning", access_log=options.access_log,
                            lifespan="on", timeout_graceful_shutdown=options.drain_timeout_s,
                            timeout_keep_alive=5, proxy_headers=False)
    runner = _Uvicorn(config, on_exit=server.begin_drain)
    server.uvicorn = runner
    runner.run(sockets=[sock])
    error = server.runner.error
    if error is not None:  # the CLI prints a ValueError as one line
        if isinstance(error, (ValueError, KeyError)):
            raise error
        raise ValueError(f"the engine failed: {type(error).__name__}: {error}") from error
    if not options.json:
        say(out, "stopped")
    return 0


def _check_options(o: ServeOptions) -> None:
    if sum(x is not None for x in (o.checkpoint, o.model_fn)) > 1:
        raise ValueError("--checkpoint and --model-fn name two models; give one")
    if o.overrides and (o.checkpoint or o.model_fn):
        raise ValueError("--set overrides a preset's config; a checkpoint or --model-fn model "
                         "brings its own")
    for name, value, low in (("--port", o.port, 0), ("--max-slots", o.max_slots, 1),
                             ("--max-queue", o.max_queue, 0), ("--devices", o.devices, 1),
                             ("--max-body-bytes", o.max_body_bytes, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if o.port > 65535:
        raise ValueError(f"--port must be <= 65535, got {o.port}")
    if o.stream_interval_s < 0:
        raise ValueError(f"--stream-interval must be >= 0 ms, got "
                         f"{o.stream_interval_s * 1e3:g}")
    if o.drain_timeout_s < 0:
        raise ValueError(f"--drain-timeout must be >= 0, got {o.drain_timeout_s}")
    if o.max_tokens is not None and o.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {o.max_tokens}")
    if o.api_key is not None and not o.api_key.strip():
        raise ValueError("--api-key is empty")
    if o.engine_cpus not in ("auto", "off"):
        parse_cpus(o.engine_cpus)


class _Uvicorn:
    """uvicorn.Server, made here so that its import stays lazy: SIGTERM/SIGINT start the
    drain (`on_exit`), and the signal is not raised again after a clean shutdown (uvicorn
    re-raises it, which would end the process with the signal's status instead of 0)."""

    def __new__(cls, config, on_exit: Callable[[], None]):
        import uvicorn

        class Quiet(uvicorn.Server):
            def handle_exit(self, sig, frame):
                try:
                    on_exit()
                finally:  # whatever on_exit met, the server drains and stops
                    super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                signals = (signal.SIGINT, signal.SIGTERM)
                original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
                try:
                    yield
                finally:
                    for sig, handler in original.items():
                        signal.signal(sig, handler)

        return Quiet(config)


__all__ = ["API_KEY_ENV", "DEFAULT_MODEL", "ServeOptions", "Server", "build_engine",
           "model_text", "serve"]
