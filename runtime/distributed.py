"""Several processes, one mesh: JAX's multi-controller runtime, and what meshwright adds to it.

    >>> import meshwright as mw                                        # doctest: +SKIP
    >>> info = mw.distributed.initialize()    # the environment `meshwright launch` sets
    >>> mesh = mw.make_mesh({"x": 2, "y": 2, "z": 2})   # over jax.devices(): every process's
    >>> step = mw.shard(model.decode_step, mesh=mesh)   # every process runs the same program
    >>> logits, cache = step(params, tokens, cache, positions)
    >>> mw.distributed.gather(logits)         # a numpy array on every process

Every process runs the same Python program and the same compiled programs on its own devices;
XLA's collectives cross processes (gloo over TCP on CPU, NCCL on GPUs, ICI on TPU pods). What
meshwright adds is small:

- `initialize`: `jax.distributed.initialize` from arguments or from the environment
  (`MESHWRIGHT_COORDINATOR`, `MESHWRIGHT_NUM_PROCESSES`, `MESHWRIGHT_PROCESS_ID`,
  `MESHWRIGHT_TIMEOUT_S`), gloo collectives on CPU, and a clear error when the coordinator
  cannot be reached (JAX itself aborts the process with a gRPC deadline message).
- `broadcast(obj)`: a small JSON-able object from the leader (process 0) to every process,
  through the coordination service's key-value store (no device program, nothing to compile).
  The serving engine broadcasts each scheduling decision and the sampled tokens with it
  (`runtime/distributed_engine.py`).
- Failure handling: a monitor thread in every process publishes a heartbeat and watches the
  others'. A process that dies, or stops (a hung machine, SIGSTOP), stops beating: within
  `timeout_s` every other process prints which one and exits with `EXIT_PEER_LOST`. A process
  whose own main thread waits longer than `timeout_s` in a guarded operation (`guard`: a
  sharded step, a broadcast) -- a peer that is alive but stuck -- does the same. Without this,
  a collective waiting for a dead peer can hang for the collective library's own timeout
  (gloo: 30 minutes), or JAX aborts with a gRPC error naming no process.
- `put` and `gather`: host values onto a sharding that spans processes (each process builds
  only its own blocks, `jax.make_array_from_callback`), and a sharded value back as one numpy
  array on every process.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

ENV_COORDINATOR = "MESHWRIGHT_COORDINATOR"  # host:port of process 0's coordination service
ENV_NUM_PROCESSES = "MESHWRIGHT_NUM_PROCESSES"
ENV_PROCESS_ID = "MESHWRIGHT_PROCESS_ID"
ENV_TIMEOUT = "MESHWRIGHT_TIMEOUT_S"  # seconds before a silent peer counts as lost
DEFAULT_TIMEOUT_S = 60.0
EXIT_PEER_LOST = 3  # exit code of a process that stopped because another one was lost
_KEY = "meshwright"  # prefix of every key meshwright writes to the key-value store


class DistributedError(RuntimeError):
    """A multi-process job that cannot start or go on: the message says which process and
    what to do."""


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the job (what `initialize` returns)."""

    process_id: int  # 0 .. num_processes - 1; process 0 hosts the coordinator and leads
    num_processes: int
    coordinator: str | None  # host:port; None when the job is one process
    timeout_s: float  # a peer silent this long counts as lost
    local_devices: int  # devices this process drives
    devices: int  # devices of the whole job (jax.devices())

    @property
    def is_leader(self) -> bool:
        """Whether this process takes requests and broadcasts decisions (process 0)."""
        return self.process_id == 0


_state: dict[str, Any] = {"info": None, "monitor": None, "channel": None}


# ---------------------------------------------------------------------------------------------
# Start-up


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Connect to the coordinator's port until it answers or `timeout_s` passes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator address {address!r} is not host:port "
                               "(e.g. 127.0.0.1:12355)")
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0) as conn:
                # a port in the ephemeral range can "connect" to itself (TCP simultaneous
                # open) when nothing listens on it: that is no coordinator
                if conn.getsockname() != conn.getpeername():
                    return
                last = ConnectionRefusedError(f"nothing listens on {address}")
        except OSError as e:
            last = e
            time.sleep(0.1)
    raise DistributedError(
        f"could not reach the coordinator at {address} within {timeout_s:g} s ({last}). "
        "Process 0 hosts it: start process 0 with the same coordinator address, check that "
        "this host can reach that address and port, or raise the timeout "
        f"({ENV_TIMEOUT} or initialize(timeout_s=...))")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: float | None = None,
               local_device_count: int | None = None, detect_cluster: bool = False,
               monitor: bool = True) -> ProcessInfo:
    """Join a multi-process job: `jax.distributed.initialize`, plus failure handling.

    Arguments left out come from the environment `meshwright launch` sets (see the module
    docstring); with no coordinator anywhere, the job is this one process and nothing is
    initialised. Call it before anything uses a JAX device. On CPU, cross-process collectives
    use gloo. `local_device_count` simulates that many CPU devices in this process (only
    before JAX has initialised its backend; `meshwright launch --devices-per-process` sets
    it through XLA_FLAGS instead). `timeout_s` (default `MESHWRIGHT_TIMEOUT_S` or 60) bounds
    the wait for the coordinator and how long a silent peer is tolerated. `detect_cluster`:
    with no coordinator given, let JAX find the job itself (Cloud TPU pod slices, SLURM,
    Open MPI, ...: `jax.distributed.initialize()` with no arguments).

        >>> info = mw.distributed.initialize("10.0.0.1:12355", num_processes=4,
        ...                                  process_id=int(os.environ["RANK"]))  # doctest: +SKIP
    """
    import jax

    if _state["info"] is not None:
        return _state["info"]
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    if timeout_s is None:
        timeout_s = float(os.environ.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S)
    if local_device_count is not None:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (" ".join(f for f in flags.split()
                                            if "xla_force_host_platform_device_count" not in f)
                                   + f" --xla_force_host_platform_device_count="
                                     f"{local_device_count}").strip()
    if coordinator_address is None and detect_cluster:
        jax.distributed.initialize(initialization_timeout=max(1, int(timeout_s)),
                                   heartbeat_timeout_seconds=max(10, int(3 * timeout_s)))
        return _started(ProcessInfo(jax.process_index(), jax.process_count(), "detected",
                                    timeout_s, jax.local_device_count(), jax.device_count()),
                        monitor)
    if coordinator_address is None:
        if (num_processes or 1) > 1:
            raise DistributedError(
                f"{num_processes} processes need a coordinator address: pass "
                f"coordinator_address='host:port' or set {ENV_COORDINATOR} (meshwright "
                "launch sets it)")
        info = ProcessInfo(0, 1, None, timeout_s, jax.local_device_count(), jax.device_count())
        _state["info"] = info
        return info
    if num_processes is None or process_id is None:
        raise DistributedError(
            f"coordinator {coordinator_address} given, but the number of processes or this "
            f"process's id is not: pass num_processes= and process_id= or set "
            f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"process id {process_id} is outside 0..{num_processes - 1}")
    if process_id != 0:  # process 0 starts the coordinator itself
        _wait_for_coordinator(coordinator_address, timeout_s)
    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, initialization_timeout=max(1, int(timeout_s)),
        # JAX's own heartbeat aborts the process with a message naming no peer; ours (the
        # monitor) names it, so JAX's fires only well after ours.
        heartbeat_timeout_seconds=max(10, int(3 * timeout_s)))
    return _started(ProcessInfo(process_id, num_processes, coordinator_address, timeout_s,
                                jax.local_device_count(), jax.device_count()), monitor)


def _started(info: ProcessInfo, monitor: bool) -> ProcessInfo:
    _state["info"] = info
    if monitor and info.num_processes > 1:
        # the monitor's threads reach the client through this import: done here, in the
        # caller's thread, so that they never import while the caller is importing the
        # same modules (a circular import across threads fails with _DeadlockError)
        import meshwright.ir.jax_compat  # noqa: F401
        _state["monitor"] = Monitor(info)
        _state["monitor"].start()
        # a process that ends without shutdown() has still exited normally: say so before
        # JAX's own exit handler (registered earlier, so run later) waits for the others
        atexit.register(_mark_exited)
    return info


def _mark_exited() -> None:
    monitor = _state["monitor"]
    if monitor is not None:
        monitor.stop()


def info() -> ProcessInfo:
    """This process's ProcessInfo (a one-process job if `initialize` was not called)."""
    if _state["info"] is None:
        import jax

        return ProcessInfo(jax.process_index(), jax.process_count(), None, DEFAULT_TIMEOUT_S,
                           jax.local_device_count(), jax.device_count())
    return _state["info"]


def is_leader() -> bool:
    """Whether this process is process 0 (the one that takes requests)."""
    return info().is_leader


def shutdown() -> None:
    """Leave the job cleanly: tell the monitors this process is done, then shut JAX's
    distributed runtime down (a barrier: every process must call it, or exit)."""
    import jax

    monitor = _state["monitor"]
    if monitor is not None:
        monitor.stop()
        _state["monitor"] = None
    if _state["info"] is not None and _state["info"].num_processes > 1:
        jax.distributed.shutdown()
    _state.update(info=None, channel=None)


def _client():
    from meshwright.ir.jax_compat import distributed_client

    client = distributed_client()
    if client is None:
        raise DistributedError("jax.distributed is not initialised: call "
                               "mw.distributed.initialize() first")
    return client


# ---------------------------------------------------------------------------------------------
# Failure handling


def fail(message: str) -> None:
    """Print a clear error naming this process and stop it at once with EXIT_PEER_LOST.

    `os._exit`, not an exception: the main thread may be blocked inside a collective that
    will never return, and JAX's atexit shutdown would wait for the lost peer too."""
    pid = info().process_id if _state["info"] is not None else "?"
    sys.stdout.flush()
    print(f"meshwright.distributed: process {pid}: error: {message}; stopping "
          f"(exit code {EXIT_PEER_LOST})", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


class Monitor(threading.Thread):
    """Heartbeats through the key-value store, and deadlines on guarded operations.

    A beat thread writes this process's beat and reads everyone's every `timeout_s / 6`;
    this thread judges, so a coordinator that stops answering (its calls block) is noticed
    too. Lost: a peer whose beat has not changed for `timeout_s` (unless it said it exited),
    the coordinator when no exchange with it has succeeded for `timeout_s`, and this
    process's own `guard(what)` section when it lasts longer than `timeout_s`.
    """

    def __init__(self, process: ProcessInfo) -> None:
        super().__init__(name="meshwright-monitor", daemon=True)
        self.process = process
        self.timeout_s = process.timeout_s
        self.interval_s = max(0.05, min(1.0, process.timeout_s / 6))
        self._stop_event = threading.Event()
        self._guard: tuple[str, float] | None = None
        self._beats: dict[str, str] = {}
        self._exchanged = time.monotonic()  # last successful exchange with the coordinator
        self._error: str | None = None

    def guard(self, what: str):
        return _Guard(self, what)

    def stop(self) -> None:
        self._stop_event.set()
        with contextlib.suppress(Exception):
            _client().key_value_set(self._key(self.process.process_id), "exited",
                                    allow_overwrite=True)

    def _key(self, pid: int) -> str:
        return f"{_KEY}/alive/{pid}"

    def _beat_loop(self) -> None:
        import jax

        client = _client()
        me, beat = self.process.process_id, 0
        while not self._stop_event.is_set():
            try:
                beat += 1
                client.key_value_set(self._key(me), str(beat), allow_overwrite=True)
                self._beats = dict(client.key_value_dir_get(f"{_KEY}/alive/"))
                self._exchanged = time.monotonic()
            except jax.errors.JaxRuntimeError as e:  # the coordinator (process 0) is gone
                self._error = str(e).splitlines()[0][:200]
                return
            self._stop_event.wait(self.interval_s)

    def run(self) -> None:
        threading.Thread(target=self._beat_loop, name="meshwright-heartbeat",
                         daemon=True).start()
        me = self.process.process_id
        seen: dict[int, tuple[str | None, float]] = {}
        while not self._stop_event.wait(self.interval_s):
            now = time.monotonic()
            if self._error is not None or now - self._exchanged > self.timeout_s:
                if self._stop_event.is_set():
                    return
                why = self._error or f"no answer for {now - self._exchanged:.1f} s"
                fail(f"lost the coordinator at {self.process.coordinator} (process 0 died, "
                     f"hangs or cannot be reached: {why})")
            beats = self._beats
            for pid in range(self.process.num_processes):
                if pid == me:
                    continue
                beat = beats.get(self._key(pid))
                if beat == "exited":
                    continue
                last = seen.get(pid)
                if last is None or last[0] != beat:
                    seen[pid] = (beat, now)
                elif now - last[1] > self.timeout_s:
                    fail(f"process {pid} has sent no heartbeat for {now - last[1]:.1f} s "
                         f"(timeout {self.timeout_s:g} s): it died or hangs")
            guard = self._guard
            if guard is not None and now - guard[1] > self.timeout_s:
                fail(f"{guard[0]} did not finish within {self.timeout_s:g} s: another "
                     "process died, hangs, or runs a different program")


class _Guard:
    def __init__(self, monitor: Monitor, what: str) -> None:
        self.monitor, self.what = monitor, what

    def __enter__(self):
        self.monitor._guard = (self.what, time.monotonic())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.monitor._guard = None
        import jax

        if exc_type is not None and issubclass(exc_type, jax.errors.JaxRuntimeError):
            # a collective whose peer went away fails here (gloo: the connection closed);
            # JAX's exit would then wait for that peer, so stop now with a clear message
            first = next((line for line in str(exc).splitlines() if line.strip()), "")
            fail(f"{self.what} failed: {first[:300]} (another process died or its "
                 "connection broke)")


def guard(what: str):
    """A context manager: `what` must finish within the timeout, or this process stops with
    a clear error; a JAX runtime error inside it (a collective whose peer is gone) stops it
    at once with the same kind of message. A no-op in a one-process job.

        >>> with mw.distributed.guard("decode step 12"):         # doctest: +SKIP
        ...     logits, cache = step(params, tokens, cache, positions)
    """
    monitor = _state["monitor"]
    return monitor.guard(what) if monitor is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Host data from the leader to everyone


class Channel:
    """Numbered JSON messages from the leader to every other process, through the coordination
    service's key-value store. The leader `publish`es message n under `<name>/n`; the others
    `receive` them in order, each acknowledging what it has read, so the leader can delete
    messages everyone has."""

    def __init__(self, name: str = "bcast") -> None:
        self.name = name
        self.process = info()
        self._seq = 0
        self._deleted = 0

    def _key(self, seq: int) -> str:
        return f"{_KEY}/{self.name}/{seq}"

    def publish(self, obj: Any) -> None:
        if not self.process.is_leader:
            raise DistributedError("only the leader (process 0) publishes")
        client = _client()
        client.key_value_set(self._key(self._seq), json.dumps(obj, separators=(",", ":")))
        self._seq += 1
        if self._seq % 64 == 0:
            self._collect(client)

    def receive(self, what: str = "the next message", timeout_s: float | None = None) -> Any:
        """The next message; waits at most `timeout_s` (default: no limit, e.g. a follower
        waiting while the leader has no requests -- dead peers are the monitor's job)."""
        import jax

        client = _client()
        key = self._key(self._seq)
        if timeout_s is None:
            while True:  # in slices, so the monitor thread's verdict can still stop us
                try:
                    value = client.blocking_key_value_get(key, 60_000)
                    break
                except jax.errors.JaxRuntimeError as e:
                    if "DEADLINE_EXCEEDED" not in str(e) and "deadline" not in str(e).lower():
                        fail(f"waiting for {what} from process 0: {str(e).splitlines()[0]}")
        else:
            try:
                value = client.blocking_key_value_get(key, max(1, int(1000 * timeout_s)))
            except jax.errors.JaxRuntimeError as e:
                fail(f"no {what} from process 0 within {timeout_s:g} s "
                     f"({str(e).splitlines()[0][:120]})")
        self._seq += 1
        client.key_value_set(f"{_KEY}/{self.name}-ack/{self.process.process_id}",
                             str(self._seq), allow_overwrite=True)
        return json.loads(value)

    def _collect(self, client) -> None:
        """Delete the messages every follower has read."""
        acks = dict(client.key_value_dir_get(f"{_KEY}/{self.name}-ack/"))
        read = [int(acks.get(f"{_KEY}/{self.name}-ack/{p}", 0))
                for p in range(1, self.process.num_processes)]
        upto = min(read, default=self._seq)
        for seq in range(self._deleted, upto):
            client.key_value_delete(self._key(seq))
        self._deleted = max(self._deleted, upto)


def broadcast(obj: Any = None, what: str = "a broadcast") -> Any:
    """The leader's `obj` (JSON-able) on every process: the leader sends, the others
    receive and return it. Every process must call it at the same point of the program."""
    process = info()
    if process.num_processes == 1:
        return obj
    channel = _state["channel"]
    if channel is None:
        channel = _state["channel"] = Channel()
    if process.is_leader:
        channel.publish(obj)
        return obj
    return channel.receive(what)


# ---------------------------------------------------------------------------------------------
# Arrays on shardings that span processes


def put(x: Any, sharding) -> Any:
    """A host value (numpy, a Python scalar, or a jax.Array on this process's devices) laid
    out in `sharding`, which may span processes: each process builds only the blocks of its
    own devices (every process must pass the same value). A jax.Array already spread over
    the job's devices is resharded instead."""
    import jax
    import numpy as np

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x if x.sharding == sharding else jax.device_put(x, sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def gather(tree: Any) -> Any:
    """Every array of `tree` as a numpy array on every process (a collective for arrays
    that span processes: every process must call it)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x.addressable_data(0) if x.is_fully_replicated else x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
