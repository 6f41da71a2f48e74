"""The engine in a process of its own, driven over a pipe: what `meshwright serve` runs.

Why a process. The HTTP side and the engine are both Python. In one process they take turns
holding the interpreter's lock: while the event loop formats and writes a streamed chunk for
every running request, the engine's next step waits for it, and on a small model (a step of a
millisecond) that wait is a fifth of the step. In its own process the engine never waits for
the HTTP side; they share only the cores.

The protocol, one duplex pipe of pickled tuples:

    server -> engine   ("submit", rid, Request, per_token)   a request; per_token: stream its
                                                             tokens (else only its Result)
                       ("abort", rid)                        free its slot (unknown rid: no-op)
                       ("metrics",)                          ask for the engine's metric lines
                       ("stop",)                             leave the loop and exit
    engine -> server   ("ready", EngineFacts, seconds)       every bucket compiled
                       ("failed", exception, ran)            building (ran False) or running failed
                       ("accepted", rid) / ("refused", rid, Result)   the answer to a submit
                       ("step", [seconds, ...], [(rid, token | Result), ...])
                                                             what the engine iterations since
                                                             the last such message produced,
                                                             and the steps timed meanwhile
                       ("metrics", [lines], [seconds, ...])  the answer to ("metrics",)

In the engine process, a reader thread takes commands (`Engine.submit` and `Engine.abort` are
thread-safe) while the main thread runs `Engine.run_forever`. What the iterations produce goes
out as ONE message at a time, at most every `HANDOVER_S` (2 ms; `--stream-interval` if longer),
at once when a request has its first token or ends, or the loop is about to wait: the server's
event loop wakes once per message. Every message costs the engine tens of microseconds (the
pickle, the write, and waking the server's process on another core: 30 to 60 us on the 2-core
test machine), up to a tenth of the bundled model's 0.65 ms step when every step sent one; a
step longer than `HANDOVER_S` still sends one per step. The step times for the server's
histogram ride along, or go every `STEP_TIMES_BATCH` steps (an engine running only whole answers
does not wake it). The engine process exits when told to stop or when the pipe closes (the
server died). Once every bucket is compiled (on every core), it pins all its threads to the CPUs
the server chose for it, if any (`ServeOptions.cpus`: `--engine-cpus CPUS`, or with `auto` the
CPUs the HTTP process leaves it if its decode step is as fast there: `choose_cpus`), and says
where in `EngineFacts.cpus` (and with `auto` what it timed, in `EngineFacts.cpu_choice`).

    >>> proc = EngineProcess(ServeOptions(), on_message=print)           # doctest: +SKIP
    >>> proc.start(asyncio.get_running_loop())                           # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

STOP_TIMEOUT_S = 10.0  # how long `stop` waits for the engine process before killing it
STEP_TIMES_BATCH = 64  # step times sent at the latest after this many steps
HANDOVER_S = 0.002  # streamed tokens go to the server at most this often (a first token, a
#                     Result at once)
AUTO_PIN_SLOWDOWN = 1.25  # --engine-cpus auto pins the engine if its step is at most this
#                           slower there (the HTTP process and its clients take part of the other
#                           cores anyway; on a loaded machine a step that runs as fast on one core
#                           timed up to 14% slower there, GPT-2 small's 34%)
AUTO_PIN_MAX_STEP_S = 0.005  # ... and its step there at most this long: the event loop and
#                              the clients spend tens of microseconds per token, which weighs
#                              on a step of a millisecond but not on one of tens (whose matmuls
#                              XLA spreads over the cores; a timing on a loaded machine can miss
#                              that: GPT-2 small was once timed within 1.25x on one core)
AUTO_TIMING_CALLS = 3  # decode steps timed per round (`choose_cpus`)
AUTO_TIMING_BUDGET_S = 2.0  # how long `choose_cpus` times, beyond its first 3 rounds


@dataclass
class EngineFacts:
    """What the server needs to know of the engine it talks to (sent once, when ready)."""

    name: str
    max_len: int
    vocab_size: int
    max_slots: int
    policy: str
    max_queue: int
    buckets: list[str]  # "decode 8x256", ...
    notes: list[str]
    layout_info: dict  # bench.layout_info: devices, mesh, per-bucket plan
    plan_text: str | None  # the layout plan's explain(), when sharded
    tokenizer: Any = None  # a checkpoint's tokenizer (picklable); None: see tokenizer_kind
    tokenizer_kind: str = "none"  # "bytes" (the bundled model), "checkpoint", "none"
    cpus: list[int] | None = None  # the CPUs the engine process was pinned to (None: not)
    cpu_choice: dict | None = None  # --engine-cpus auto: the step timings it decided on


def engine_facts(engine) -> EngineFacts:
    from meshwright.models.demo import ByteTokenizer
    from meshwright.runtime.bench import layout_info

    tok = engine.tokenizer
    kind = "none" if tok is None else "bytes" if isinstance(tok, ByteTokenizer) else "checkpoint"
    return EngineFacts(
        name=engine.name, max_len=engine.max_len, vocab_size=engine.vocab_size,
        max_slots=engine.max_slots, policy=engine.policy,
        max_queue=engine.scheduler.max_queue,
        buckets=[f"{p} {b.batch}x{b.length}" for p, b in engine.buckets()],
        notes=list(engine.notes), layout_info=layout_info(engine),
        plan_text=engine.layout_plan.explain() if engine.layout_plan is not None else None,
        tokenizer=tok if kind == "checkpoint" else None, tokenizer_kind=kind)


# ---------------------------------------------------------------------------------------------
# The engine's side


def _portable(error: BaseException) -> BaseException:
    """The exception itself if it pickles, else a RuntimeError carrying its text."""
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001 (any pickling failure)
        return RuntimeError(f"{type(error).__name__}: {error}")


def pin_process(cpus) -> None:
    """Every thread of this process onto `cpus` (threads started later inherit it from their
    parent). Linux only (`os.sched_setaffinity`, which pins one thread per call)."""
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: this thread only
        threads = [0]
    for tid in threads:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, set(cpus))


def choose_cpus(engine, fewer, every=None, budget_s: float = AUTO_TIMING_BUDGET_S) -> dict:
    """`--engine-cpus auto`: time the engine's heaviest decode step on `every` CPU (default:
    those this process may use now) and on `fewer` (those the HTTP process leaves it),
    alternately (rounds of `Engine.time_decode_step`, each after an untimed call that settles
    the threads where they now run), until `budget_s` is spent (at least 3 rounds); the best
    time of each (other processes slow some calls: the best is the step's own speed). Stay
    pinned to `fewer` if the step there is at most `AUTO_PIN_SLOWDOWN` times the step on
    every CPU and at most `AUTO_PIN_MAX_STEP_S` long: a step that is mostly dispatch (a small
    model) runs as fast, or faster, on one core, and then the engine keeps clear of the event
    loop and the clients; a step whose matmuls XLA spreads over every core (a larger model)
    keeps them all. Returns what it measured (the start-up report's `cpus.timed`)."""
    every = sorted(os.sched_getaffinity(0) if every is None else every)
    fewer = sorted(fewer)
    bucket = engine.heaviest_decode_bucket()
    times: dict[str, list[float]] = {"every": [], "fewer": []}
    t0 = time.perf_counter()
    rounds = 0
    while rounds < 3 or (time.perf_counter() - t0 < budget_s and rounds < 20):
        for name, cpus in (("every", every), ("fewer", fewer)):
            pin_process(cpus)
            engine.time_decode_step(1, bucket)
            times[name] += engine.time_decode_step(AUTO_TIMING_CALLS, bucket)
        rounds += 1
    every_s, fewer_s = (min(times[k]) for k in ("every", "fewer"))
    pinned = fewer_s <= min(AUTO_PIN_SLOWDOWN * every_s, AUTO_PIN_MAX_STEP_S)
    pin_process(fewer if pinned else every)
    return {"pinned": pinned, "fewer": fewer, "bucket": f"{bucket.batch}x{bucket.length}",
            "every_ms": round(every_s * 1e3, 3), "fewer_ms": round(fewer_s * 1e3, 3),
            "calls": len(times["every"])}


def drain(times: deque) -> list[float]:
    """Take what is in `times` (another thread may append meanwhile)."""
    out = []
    with contextlib.suppress(IndexError):
        for _ in range(len(times)):
            out.append(times.popleft())
    return out


def engine_main(options, conn) -> None:
    """The engine process: build the engine, say ready, run it until stopped."""
    # Signals are the server's business: it drains, then tells this process to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    stop = threading.Event()
    ready = threading.Event()
    engine = None
    handles: dict[int, Any] = {}  # rid -> the engine's RequestHandle, while in flight
    outbox: list[tuple[int, Any]] = []  # what the iterations since the last hand-over produced
    urgent: list[int] = []  # requests whose news in `outbox` goes at once: a first token
    #                          (the time to first token is what a user waits for), a Result
    step_s: deque[float] = deque()  # step times not sent yet (appended by the engine's loop)

    def on_token(rid: int) -> Callable[[int, int], None]:
        first = True

        def token(_request_id: int, token: int) -> None:
            nonlocal first
            outbox.append((rid, token))
            if first:
                urgent.append(rid)
                first = False
        return token

    def on_finish(rid: int) -> Callable[[Any], None]:
        def finished(result) -> None:
            handles.pop(rid, None)
            outbox.append((rid, result))
            urgent.append(rid)
        return finished

    def read_commands() -> None:
        try:
            obey()
        except BaseException as e:  # noqa: BLE001 (the engine is unusable: say so, stop)
            with contextlib.suppress(OSError):
                send(("failed", _portable(e), True))
            stop.set()

    def obey() -> None:
        while True:
            try:
                command = conn.recv()
            except (EOFError, OSError):  # the server is gone
                command = ("stop",)
            kind = command[0]
            if kind == "stop":
                stop.set()
                if not ready.is_set():  # still compiling: nothing to finish
                    os._exit(0)
                return
            if kind == "submit":
                _, rid, request, per_token = command
                handle = engine.submit(request, on_token(rid) if per_token else None,
                                       on_finish=on_finish(rid))
                if handle.done and handle.result().finish_reason == "refused":
                    send(("refused", rid, handle.result()))
                    continue
                handles[rid] = handle
                if handle.done:  # (it finished already: on_finish ran before the line above)
                    handles.pop(rid, None)
                send(("accepted", rid))
            elif kind == "abort":
                handle = handles.get(command[1])
                if handle is not None:
                    handle.abort()
            elif kind == "metrics":
                from meshwright.runtime.server import engine_metric_lines

                send(("metrics", engine_metric_lines(engine), drain(step_s)))

    reader = threading.Thread(target=read_commands, name="meshwright-commands", daemon=True)
    reader.start()
    ran = False
    try:
        from meshwright.runtime.server import build_engine

        t0 = time.perf_counter()
        engine = build_engine(options)
        facts = engine_facts(engine)
        if options.cpus and options.cpus[0]:  # compiled on every core; served on its own
            try:
                if options.engine_cpus == "auto":  # its own cores if the step keeps its speed
                    facts.cpu_choice = choose_cpus(engine, options.cpus[0])
                else:
                    pin_process(options.cpus[0])
                if facts.cpu_choice is None or facts.cpu_choice["pinned"]:
                    facts.cpus = sorted(os.sched_getaffinity(0))
            except OSError as e:  # (a CPU taken away meanwhile): served unpinned, said so
                facts.notes.append(f"the engine process is not pinned to CPUs "
                                   f"{list(options.cpus[0])}: {e.strerror}")
        ready.set()
        send(("ready", facts, time.perf_counter() - t0))
        ran = True

        handover_s = max(HANDOVER_S, options.stream_interval_s)
        last = time.perf_counter()

        def flush(waits: bool = True) -> None:
            """Hand over what the iterations produced: at once if the loop now waits or a
            request has its first token or ended, else once `handover_s` has passed since the
            last hand-over."""
            nonlocal last
            t = time.perf_counter()
            if (outbox and (waits or urgent or t - last >= handover_s)
                    or len(step_s) >= STEP_TIMES_BATCH):
                produced = outbox[:]
                outbox.clear()
                urgent.clear()
                send(("step", drain(step_s), produced))
                last = t

        engine.run_forever(stop, on_step=step_s.append, after_iteration=flush)
        flush()
    except BaseException as e:  # noqa: BLE001 (reported to the server, which stops)
        with contextlib.suppress(OSError):
            send(("failed", _portable(e), ran))
    finally:
        with contextlib.suppress(OSError):
            conn.close()


# ---------------------------------------------------------------------------------------------
# The server's side


class EngineProcess:
    """The engine process as the server sees it. Everything here runs on the server's event
    loop: `start` spawns the process and watches the pipe; every message from the engine goes
    to `on_message(message)`, but the answers to `submit` and `metrics`, which those
    coroutines return. `status`: loading -> ready -> stopped, or failed (`error` says why)."""

    def __init__(self, options, on_message: Callable[[tuple], None]) -> None:
        self.options = options
        self.on_message = on_message
        self.status = "loading"
        self.error: BaseException | None = None
        self.ran = False  # it served: a failure now is the engine's, worth a traceback
        self._process = None
        self._conn = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_rid = 0
        self._acks: dict[int, asyncio.Future] = {}
        self._sinks: dict[int, Any] = {}  # rid -> where its tokens and Result go
        self._metrics: list[asyncio.Future] = []
        self._stopping = False
        self._send_lock = threading.Lock()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe(duplex=True)
        self._process = context.Process(target=engine_main, args=(self.options, child),
                                        name="meshwright-engine", daemon=True)
        self._process.start()
        child.close()
        self._loop = loop
        loop.add_reader(self._conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                self._receive(self._conn.recv())
        except (EOFError, OSError):
            self._lost()

    def _receive(self, message: tuple) -> None:
        kind = message[0]
        if kind in ("accepted", "refused"):
            ack = self._acks.pop(message[1], None)
            if ack is not None and not ack.done():
                ack.set_result(message[2] if kind == "refused" else None)
            return
        if kind == "metrics":
            waiters, self._metrics = self._metrics, []
            for w in waiters:
                if not w.done():
                    w.set_result(message[1])
            self.on_message(("step", message[2], []))  # the step times it brought
            return
        if kind == "step":
            for rid, item in message[2]:
                sink = self._sinks.get(rid)
                if sink is not None:
                    if type(item) is not int:  # its Result: the request is over
                        del self._sinks[rid]
                    sink.put(item)
        elif kind == "ready":
            self.status = "ready"
            self.ran = True
        elif kind == "failed":
            self._fail(message[1])
        self.on_message(message)

    def _fail(self, error: BaseException) -> None:
        if self.status != "failed":
            self.status, self.error = "failed", error
            for future in [*self._acks.values(), *self._metrics]:
                if not future.done():
                    future.set_exception(error)
            self._acks.clear()
            self._metrics.clear()

    def _lost(self) -> None:
        """The pipe closed: the engine process ended without being told to."""
        self._unwatch()
        if self.status in ("loading", "ready") and not self._stopping:
            code = self._process.exitcode if self._process is not None else None
            error = RuntimeError(f"the engine process exited unexpectedly (exit code {code})")
            self._fail(error)
            self.on_message(("failed", error, self.ran))

    def _unwatch(self) -> None:
        if self._loop is not None and self._conn is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._conn.fileno())

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:  # `stop` sends from another thread
                self._conn.send(message)
        except (OSError, ValueError) as e:  # the pipe is closed: the engine is gone
            raise RuntimeError("the engine process is not running") from e

    async def submit(self, request, per_token: bool, sink) -> tuple[int, Any]:
        """Hand a request to the engine: (rid, None) once accepted, (rid, Result) when it was
        refused at once. The tokens (if `per_token`) and the Result of an accepted request
        go to `sink.put(item)` as they come, possibly before this returns."""
        rid = self._next_rid
        self._next_rid += 1
        self._sinks[rid] = sink
        ack = self._acks[rid] = self._loop.create_future()
        try:
            self._send(("submit", rid, request, per_token))
            refused = await ack
        finally:
            self._acks.pop(rid, None)
        if refused is not None:
            self._sinks.pop(rid, None)
        return rid, refused

    def abort(self, rid: int) -> None:
        if self.status == "ready":
            with contextlib.suppress(RuntimeError):
                self._send(("abort", rid))

    async def metric_lines(self) -> list[str]:
        waiter = self._loop.create_future()
        self._metrics.append(waiter)
        self._send(("metrics",))
        return await waiter

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Tell the engine to stop and wait for it (blocking: call it off the loop)."""
        if self._process is None:
            return
        self._stopping = True
        with contextlib.suppress(RuntimeError):
            self._send(("stop",))
        self._process.join(timeout_s)
        if self._process.is_alive():
            print("the engine process did not stop in time: killed", file=sys.stderr)
            self._process.kill()
            self._process.join()
        if self.status != "failed":
            self.status = "stopped"
