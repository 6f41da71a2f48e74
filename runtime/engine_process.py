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

In the engine process one thread does everything: it runs `Engine.run_forever` and reads the
server's commands between iterations (and while it waits for work: `idle_wait`). A reader
thread of its own would wake on the engine's core for every request and take the interpreter's
lock from the loop: measured on the bundled model, the decode steps of the first 150 ms of a
burst of 128 requests took 48% longer than in-process with one, 10% with none (and those after
it 8% and 5%). It reads them at most every `READ_S` (1 ms) while it runs requests, at once when
it is about to wait. What the iterations produce goes out as ONE message at a time, at most
every `HANDOVER_S` (2 ms; `--stream-interval` if longer), at once when a request has its first
token or ends, or the loop is about to wait; while requests wait for a slot, both only every
`QUEUED_HANDOVER_S` (8 ms; `Pace` says why). Every message costs the engine the pickle and the
write, and a write that wakes the server's process on another core costs twice one that wakes
no one (15-30 us against 7-11 us on the 2-core test machine): so while requests are in flight
the server does not sleep on the pipe but reads it every `POLL_S` (1 ms; a token reaches its
handler half a millisecond later on average), and only an idle server is woken by a message. A
step longer than `HANDOVER_S` still sends one message per step. The step times for the server's
histogram ride along, or go every `STEP_TIMES_BATCH` steps (an engine running only whole
answers does not wake it). The engine process exits when told to stop or when the pipe closes
(the server died). Once every bucket is compiled (on every core), it pins all its threads to
the CPUs the server chose for it, if any (`ServeOptions.cpus`: `--engine-cpus CPUS`), and says
where in `EngineFacts.cpus`; with `auto` only its loop keeps to the CPUs the HTTP process
leaves it, and XLA's threads may use every CPU (`pin_split`; where, in
`EngineFacts.compute_cpus`).

    >>> proc = EngineProcess(ServeOptions(), on_message=print)           # doctest: +SKIP
    >>> proc.start(asyncio.get_running_loop())                           # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import select
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
POLL_S = 0.001  # while requests are in flight, the server reads the pipe this often instead
#                 of being woken by each message (a write that wakes no one costs the engine
#                 about half as much)
HANDOVER_S = 0.002  # streamed tokens go to the server at most this often (a first token, a
#                     Result at once)
READ_S = 0.001  # while it runs requests, the engine reads the server's commands at most this
#                 often (at once when it is about to wait)
QUEUED_HANDOVER_S = 0.008  # while requests wait for a slot, the engine hands over and reads
#                            commands only this often, first tokens and ends included: every
#                            hand-over costs tokens the queue is waiting for


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
    compute_cpus: list[int] | None = None  # --engine-cpus auto: the CPUs of XLA's threads
    #                                         (`cpus`: the loop's; `pin_split`)


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
    parent). Linux only (`os.sched_setaffinity`, which pins one thread per call; without
    /proc, this thread only)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, set(cpus))


def pin_split(cpus, set_affinity: Callable[[int, set[int]], None] = os.sched_setaffinity
              ) -> None:
    """`--engine-cpus auto`: the engine's loop (this thread, and the threads it starts later)
    onto `cpus`; every other thread of this process keeps every CPU the process may use
    (they were started before any pinning): XLA's, those that run the compiled programs and
    those a matmul is split over.

    Why. The loop thread (Python: scheduling, dispatch, sampling, the hand-over) is woken at
    every step, and on the HTTP process's core it would take turns with the event loop; so it
    keeps off it, as the HTTP process keeps off the loop's. XLA's threads run the programs
    the loop dispatched, and on one core with the loop they run only while it waits: given
    every core, a program runs while the loop prepares the next step (in-process, pinned to
    one core, the bundled model served 3-9% fewer tokens per second), and a model whose
    matmuls XLA spreads over the cores gets them all (GPT-2 small pinned to one core: a third
    fewer). The bundled model's engine spends 60% of its CPU time in those threads (the
    programs), GPT-2 small's most of it. Over HTTP at saturation, against the same engine
    in-process on every core, this split lost 3.1% on streams and 1.5% on whole answers where
    keeping every thread but XLA's compute pool (`tf_XLAEigen`) on the loop's core lost 5.1%
    and 4.1% (14 alternated repeats); GPT-2 small, 3.9% against 5.3% (4 repeats). And it does
    not depend on the names XLA gives its threads."""
    set_affinity(0, set(cpus))  # (0: the calling thread)


def pipe_reader(conn) -> Callable[[float], bool]:
    """`conn.poll(timeout)` without its cost: whether `conn` has something to read (or has
    closed), waiting up to `timeout` seconds. `Connection.poll` builds a selector for every
    call (3 us warm); one `select.poll` object kept for the pipe answers in 0.3 us. Where
    there is no poll(2), `conn.poll` itself."""
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
    except (AttributeError, OSError):
        return conn.poll
    return lambda timeout: bool(poller.poll(timeout * 1000))  # (ms; a closed pipe: POLLHUP)


class Pace:
    """When the engine's loop hands what its iterations produced over to the server, and when
    it reads the server's commands; called after every iteration with the time `t` and:
    `waits` (the loop is about to wait: both at once), `queued` (requests wait for a slot),
    `news` (tokens or results to hand over), `urgent` (among them a first token or an end),
    `full` (step times enough for a message of their own).

    Both cost the engine more than they seem to: right after a step, whose weights and KV
    cache have pushed the loop's code and data out of the CPU's caches, a hand-over (pickle
    and write) took 34-41 us of the engine's CPU and a read of the pipe 10-12 us on the
    bundled model (on a warm loop: 8 and 0.3 us). Every 2 ms or at once for a first token or
    an end, and a read after every iteration, that was 5-7 us per generated token, 3-5% of
    the engine's time. So: reads at most every `READ_S`; and while requests wait for a slot,
    when every microsecond of the engine's is one they wait for, both only every `queued_s`
    (`QUEUED_HANDOVER_S`, or `handover_s` if longer), first tokens and ends included (their
    time to first token is mostly the queue's by then)."""

    def __init__(self, handover_s: float, t: float) -> None:
        self.handover_s = handover_s
        self.queued_s = max(QUEUED_HANDOVER_S, handover_s)
        self.sent = self.last_read = t

    def hand_over(self, t: float, waits: bool, queued: bool, news: bool, urgent: bool,
                  full: bool = False) -> bool:
        every = self.queued_s if queued else self.handover_s
        if full or news and (waits or urgent and not queued or t - self.sent >= every):
            self.sent = t
            return True
        return False

    def read(self, t: float, waits: bool, queued: bool) -> bool:
        if waits or t - self.last_read >= (self.queued_s if queued else READ_S):
            self.last_read = t
            return True
        return False


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

    def send(message: tuple) -> None:  # (one thread sends and reads once the engine is built)
        # what conn.send does, without a ForkingPickler (and its dispatch table) per message
        conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    readable = pipe_reader(conn)
    stop = threading.Event()
    ready = threading.Event()
    engine = None
    handles: dict[int, Any] = {}  # rid -> the engine's RequestHandle, while in flight
    outbox: list[tuple[int, Any]] = []  # what the iterations since the last hand-over produced
    urgent: list[int] = []  # requests whose news in `outbox` goes at once: a first token
    #                          (the time to first token is what a user waits for), a Result
    step_s: deque[float] = deque()  # step times not sent yet

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

    def watch_while_compiling() -> None:
        """Building takes seconds to minutes, and all the server may send meanwhile is
        "stop" (or it died: the pipe closes): either way there is nothing to finish."""
        while not ready.is_set():
            try:
                news = conn.poll(0.1)
            except (OSError, ValueError):  # closed by this process: building failed
                return
            if news and not ready.is_set():
                os._exit(0)

    def obey(command: tuple) -> None:
        kind = command[0]
        if kind == "stop":
            stop.set()
        elif kind == "submit":
            _, rid, request, per_token = command
            handle = engine.submit(request, on_token(rid) if per_token else None,
                                   on_finish=on_finish(rid))
            if handle.done and handle.result().finish_reason == "refused":
                send(("refused", rid, handle.result()))
                return
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

    def take_commands(timeout: float = 0.0) -> None:
        """Obey what the server sent, waiting up to `timeout` for the first command. The
        engine's own thread reads them between iterations: no second thread wakes on this
        core for every request, nor takes the interpreter's lock from the loop."""
        try:
            while not stop.is_set() and readable(timeout):
                obey(conn.recv())
                timeout = 0.0
        except (EOFError, OSError):  # the server is gone
            stop.set()

    watcher = threading.Thread(target=watch_while_compiling, name="meshwright-compiling",
                               daemon=True)
    watcher.start()
    ran = False
    try:
        from meshwright.runtime.server import build_engine

        t0 = time.perf_counter()
        engine = build_engine(options)
        facts = engine_facts(engine)
        if options.cpus and options.cpus[0]:  # compiled on every core; served on its own
            try:
                every = sorted(os.sched_getaffinity(0))
                if options.engine_cpus != "auto":
                    pin_process(options.cpus[0])
                else:  # the loop on its own CPUs, XLA's threads on every CPU
                    pin_split(options.cpus[0])
                    facts.compute_cpus = every
                facts.cpus = sorted(os.sched_getaffinity(0))
            except OSError as e:  # (a CPU taken away meanwhile): served unpinned, said so
                facts.notes.append(f"the engine process is not pinned to CPUs "
                                   f"{list(options.cpus[0])}: {e.strerror}")
        ready.set()
        watcher.join()  # (within 0.1 s) from now on, commands are read between iterations
        send(("ready", facts, time.perf_counter() - t0))
        ran = True

        pace = Pace(max(HANDOVER_S, options.stream_interval_s), time.perf_counter())

        def flush(waits: bool = True) -> None:
            """Hand over what the iterations produced and read the server's commands, when
            `pace` says so."""
            t = time.perf_counter()
            queued = bool(engine.scheduler.waiting) and not waits  # (only this thread submits)
            if pace.hand_over(t, waits, queued, bool(outbox), bool(urgent),
                              len(step_s) >= STEP_TIMES_BATCH):
                produced = outbox[:]
                outbox.clear()
                urgent.clear()
                send(("step", drain(step_s), produced))
            if pace.read(t, waits, queued):
                take_commands()

        engine.run_forever(stop, on_step=step_s.append, after_iteration=flush,
                           idle_wait=take_commands)
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
        self._watching = False  # the event loop wakes when the pipe is readable
        self._poller: asyncio.TimerHandle | None = None  # or reads it every POLL_S
        self._closed = False  # the pipe closed: neither

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe(duplex=True)
        self._process = context.Process(target=engine_main, args=(self.options, child),
                                        name="meshwright-engine", daemon=True)
        self._process.start()
        child.close()
        self._loop = loop
        self._listen()

    def _listen(self) -> None:
        """How this side reads the pipe, set again whenever what is in flight changes: while
        requests are in flight, every `POLL_S` (their tokens come several times a
        millisecond at saturation, and a write to a pipe nobody sleeps on spares the engine
        the wake-up of this process on another core); otherwise woken by the pipe (a message
        is then rare and wanted at once: ready, failed, the answer to a metrics scrape)."""
        if self._closed:
            return
        busy = bool(self._sinks or self._acks)
        if busy and self._watching:
            self._loop.remove_reader(self._conn.fileno())
            self._watching = False
        if busy and self._poller is None:
            self._poller = self._loop.call_later(POLL_S, self._poll)
        if not busy and not self._watching:
            if self._poller is not None:
                self._poller.cancel()
                self._poller = None
            self._loop.add_reader(self._conn.fileno(), self._readable)  # (fires at once if
            self._watching = True  #                                         something waits)

    def _poll(self) -> None:
        self._poller = None
        self._readable()
        self._listen()

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
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if self._watching and self._loop is not None and self._conn is not None:
            self._watching = False
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
        self._listen()
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
