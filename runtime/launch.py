"""`meshwright launch -n N -- COMMAND ...`: N local processes of one multi-process job.

    $ meshwright launch -n 2 --devices-per-process 4 -- python my_job.py
    [p0] ...
    [p1] ...

Each process gets the environment `mw.distributed.initialize()` reads: the coordinator
(127.0.0.1 and a free port; process 0 hosts it), the number of processes, its own id, the
timeout, and `--xla_force_host_platform_device_count=K` in XLA_FLAGS so each simulates K CPU
devices. Their output is streamed line by line with a `[pN] ` prefix. When one process exits
non-zero the others are stopped (SIGTERM, then SIGKILL after a grace period) and the launcher
exits with that code; it exits 0 only when every process did. This module imports no JAX.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from meshwright.runtime.distributed import (
    ENV_COORDINATOR,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    ENV_TIMEOUT,
)

DRAIN_S = 30.0  # seconds to read what the stopped processes left in their pipes
GRACE_S = 3.0  # SIGTERM -> SIGKILL


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, coordinator: str, *,
                devices_per_process: int | None = None, timeout_s: float | None = None,
                base: dict | None = None) -> dict[str, str]:
    """The environment of process `process_id` of the job."""
    env = dict(os.environ if base is None else base)
    env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes),
                ENV_PROCESS_ID: str(process_id), "PYTHONUNBUFFERED": "1"})
    if timeout_s is not None:
        env[ENV_TIMEOUT] = str(timeout_s)
    env.setdefault("JAX_PLATFORMS", "cpu")
    if devices_per_process is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if "xla_force_host_platform_device_count" not in f]
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def spawn(command: Sequence[str], num_processes: int, *, devices_per_process: int | None = None,
          timeout_s: float | None = None, port: int | None = None,
          cwd: str | None = None) -> list[subprocess.Popen]:
    """Start the job's processes (stdout and stderr merged into one pipe each), each in its
    own process group so that stopping one stops its children too."""
    if num_processes < 1:
        raise ValueError(f"-n must be >= 1, got {num_processes}")
    if not command:
        raise ValueError("nothing to launch: give the command after --, e.g. "
                         "meshwright launch -n 2 -- python job.py")
    coordinator = f"127.0.0.1:{port or free_port()}"
    procs = []
    for pid in range(num_processes):
        env = process_env(pid, num_processes, coordinator,
                          devices_per_process=devices_per_process, timeout_s=timeout_s)
        procs.append(subprocess.Popen(list(command), env=env, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def stop(procs: Sequence[subprocess.Popen], grace_s: float = GRACE_S) -> None:
    """SIGTERM every process still running (its whole group), SIGKILL after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
            time.sleep(0.05)
    for p in procs:  # reap
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class LaunchResult:
    """How the job ended."""

    returncode: int  # 0 when every process exited 0; else the first failure's code
    returncodes: list[int | None]  # per process (None: still running when stopped; killed)
    failed: int | None = None  # the first process that exited non-zero
    seconds: float = 0.0
    output: dict[int, list[str]] = field(default_factory=dict)  # lines per process, if kept


def _pump(pid: int, stream, out: TextIO | None, lock: threading.Lock,
          keep: list[str] | None) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        if keep is not None:
            keep.append(line)
        if out is not None:
            with lock:
                out.write(f"[p{pid}] {line}\n")
                out.flush()
    stream.close()


def launch(command: Sequence[str], num_processes: int, *, devices_per_process: int | None = None,
           timeout_s: float | None = None, port: int | None = None,
           out: TextIO | None = sys.stdout, keep_output: bool = False,
           deadline_s: float | None = None) -> LaunchResult:
    """Run `command` as `num_processes` processes of one job and wait for them.

    Output goes to `out`, each line prefixed `[pN] ` (None: not printed); `keep_output`
    also returns it. The first process to exit non-zero stops the others. `deadline_s`
    stops the whole job after that many seconds (exit code 124)."""
    t0 = time.monotonic()
    procs = spawn(command, num_processes, devices_per_process=devices_per_process,
                  timeout_s=timeout_s, port=port)
    lock = threading.Lock()
    kept = {pid: [] for pid in range(num_processes)} if keep_output else {}
    pumps = [threading.Thread(target=_pump, args=(pid, p.stdout, out, lock, kept.get(pid)),
                              daemon=True) for pid, p in enumerate(procs)]
    for t in pumps:
        t.start()
    failed, code = None, 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(pid, c) for pid, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed, code = bad[0]
                break
            if all(c == 0 for c in codes):
                break
            if deadline_s is not None and time.monotonic() - t0 > deadline_s:
                code = 124
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        code = 130
    finally:
        running = [pid for pid, p in enumerate(procs) if p.poll() is None]
        if running:
            stop(procs)
        # every process has exited or been killed: read their pipes to the end (a loaded
        # machine may not have scheduled a pump yet; a short join would lose their last lines)
        for t in pumps:
            t.join(timeout=DRAIN_S)
    if out is not None:
        if failed is not None:
            others = ", ".join(str(p) for p in running)
            out.write(f"meshwright launch: process {failed} exited with code {code}"
                      + (f"; stopped process{'es' if len(running) > 1 else ''} {others}"
                         if running else "") + "\n")
        elif code == 124:
            out.write(f"meshwright launch: the job ran past {deadline_s:g} s; stopped it\n")
        out.flush()
    return LaunchResult(code, [p.returncode for p in procs], failed,
                        time.monotonic() - t0, kept)
