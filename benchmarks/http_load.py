"""The HTTP server under load against the same engine in-process: what serving over HTTP costs.

    python benchmarks/http_load.py                  # rates 1000 (saturation) and 20 req/s
    python benchmarks/http_load.py --quick          # a smoke run
    python benchmarks/http_load.py --rates 1000,30 --requests 128 --repeats 3

One workload: Poisson arrivals at each rate, prompts from the bundled model's held-out text
(sent as token ids, so both sides run the same tokens), output lengths uniform in
[--out-len], greedy, run to their length. Six ways to serve it, alternated (each repeat runs
all of them, in a rotated order) so that the machine's other load hits them alike:

- in-process: `Engine.serve(workload, clock="wall")` on an engine built like the server's
  (`bench.make_engine`, the bundled model, the same slots and max_len), on every CPU;
- in-process-pinned: the same with every thread on the CPUs of the server's engine loop
  (those its HTTP process leaves: the engine without the HTTP process's core; left out when
  the server pins nothing);
- http-stream: `meshwright serve` in a subprocess, each request streamed (a chunk per
  engine step), sent at its arrival time by a bare HTTP/1.1 client on uvloop (`_Exchange`:
  one connection per request, the body kept as it arrives and parsed at its end); TTFT is
  the first streamed chunk (for a completion: the first token), latency the stream's end;
- http-stream-20ms: the same with a second server started with `--stream-interval 20` (a
  stream sends at most one chunk per 20 ms);
- http-whole: not streamed (one JSON answer per request; no TTFT);
- http-stream-unpinned: as http-stream, from a third server started with `--engine-cpus off`
  (the engine and HTTP processes not pinned to cores of their own: what pinning buys).

The load generator runs on the CPUs of the server's HTTP process while it drives that server
(unpinned against the unpinned server): clients on other machines would leave the engine's
cores alone, and on one machine that is the nearest stand-in; its CPU time is charged to the
HTTP side's core.

Each reports throughput (generated tokens / first arrival to last token), p50/p99 latency,
p50/p99 time to first token, and CPU time per generated token: of this process for
in-process; for HTTP of the server's two processes together, of the HTTP process's event-loop
thread alone (server-loop: the HTTP work), of the engine process (its loop and XLA's threads),
and of the load generator (on two cores the client's CPU is taken from the server). The table
gives medians over repeats, and each way's throughput against in-process: the median over
repeats of http / in-process - 1 within the repeat. Writes benchmarks/results/http_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "http_load.json"
MODEL = "palm-kjv"  # the bundled model; --model takes a preset (random weights) instead
SERVED_AS = "bench"  # the model id the servers answer to (--model-name)


def workload(requests: int, rate: float, out_len: tuple[int, int], max_len: int,
             seed: int) -> list[tuple[float, list[int], int]]:
    """(arrival_s, prompt ids, max_tokens) per request, Poisson at `rate`."""
    from meshwright.models.demo import encode
    from meshwright.runtime.demo import burst_prompts

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=requests)
    times = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    prompts = [encode(p)[:max_len // 4] for p in burst_prompts(requests, seed=seed)]
    lengths = rng.integers(out_len[0], out_len[1] + 1, size=requests)
    return [(float(t), p, int(n)) for t, p, n in zip(times, prompts, lengths)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def summary(tokens: int, span: float, latency: list[float], ttft: list[float] | None) -> dict:
    return {"throughput_tokens_per_s": tokens / span, "tokens": tokens,
            "latency_s": {"p50": percentile(latency, 50), "p99": percentile(latency, 99)},
            "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)} if ttft
            else {"p50": None, "p99": None}}


# ---------------------------------------------------------------------------------------------
# In-process


def run_in_process(engine, load, cpus: list[int] | None = None) -> dict:
    from meshwright.runtime.request import Request

    arrivals = [(t, Request(prompt=tuple(p), max_tokens=n)) for t, p, n in load]
    cpu = own_cpu_seconds()
    with pinned(cpus):
        report = engine.serve(arrivals, clock="wall")
    cpu = own_cpu_seconds() - cpu
    results = report.results
    assert all(r.ok and len(r.tokens) == n for r, (_, _, n) in zip(results, load))
    span = max(r.finish_s for r in results) - min(r.arrival_s for r in results)
    tokens = sum(len(r.tokens) for r in results)
    m = summary(tokens, span, [r.latency_s for r in results], [r.ttft_s for r in results])
    m["cpu_us_per_token"] = {"in_process": cpu / tokens * 1e6}
    return m


# ---------------------------------------------------------------------------------------------
# Over HTTP


class ServerProcess:
    """`meshwright serve` on a free port of 127.0.0.1."""

    def __init__(self, model: str, overrides: list[str], max_slots: int, max_len: int,
                 *flags: str) -> None:
        sets = [arg for o in overrides for arg in ("--set", o)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshwright.cli", "serve", "--port", "0", "--no-progress",
             "--model", model, *sets, "--model-name", SERVED_AS, "--max-slots", str(max_slots),
             "--max-len", str(max_len), "--max-queue", "4096", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.address, self.lines = None, []
        self.engine_cpus: list[int] | None = None  # where the server runs its engine process
        self.http_cpus: list[int] | None = None  # and its HTTP process (None: not pinned)
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if "listening on " in line:
                    self.address = line.split("listening on ")[1].split()[0]
                if line.startswith("cpus: "):
                    self.engine_cpus, self.http_cpus = cpus_of(line)
                if line.startswith("ready:"):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(600) or self.proc.poll() is not None:
            raise RuntimeError("the server did not start:\n" + "\n".join(self.lines))

    def cpu_seconds(self) -> tuple[float, float, float]:
        """User + system CPU time so far of the server: of its two processes together, of
        the HTTP process's main thread alone (uvicorn's event loop: the HTTP work), and of
        the engine process (its loop and XLA's threads)."""
        def read(path: str) -> float:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        engine = sum(read(f"/proc/{c}/stat") for c in children)
        return read(f"/proc/{pid}/stat") + engine, read(f"/proc/{pid}/task/{pid}/stat"), engine

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


class _Exchange(asyncio.Protocol):
    """One request on its own connection, read by callbacks as the bytes arrive: the body is
    kept as it comes and parsed once at its end. On two cores the load generator's CPU time is
    taken from the server, so it does the least it can per streamed chunk: no stream reader, no
    per-event parsing (a client library spends several times more per chunk)."""

    def __init__(self, request: bytes, stream: bool, done: asyncio.Future) -> None:
        self.request, self.stream, self.done = request, stream, done
        self.parts: list[bytes] = []
        self.tail = b""
        self.first: float | None = None
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parts.append(data)
        if self.first is None:  # the first bytes of the body (for a stream: its first chunk)
            whole = b"".join(self.parts)
            head = whole.find(b"\r\n\r\n")
            if head >= 0 and len(whole) > head + 4:
                self.first = time.perf_counter()
        if self.stream:
            self.tail = self.tail[-8:] + data[-8:]
            if self.tail.endswith(b"\r\n0\r\n\r\n"):  # chunked encoding's last, empty chunk
                self._end()

    def connection_lost(self, exc) -> None:  # a whole answer ends with the connection
        if self.stream:
            if not self.done.done():
                self.done.set_exception(RuntimeError(
                    "the server closed the stream before its end"))
        else:
            self._end()

    def _end(self) -> None:
        if not self.done.done():
            self.done.set_result(time.perf_counter())
        self.transport.close()


def cpus_of(line: str) -> tuple[list[int] | None, list[int] | None]:
    """The server's start-up line `cpus: the engine's loop on 0 (...), the HTTP process on 1
    (...)` (or `the engine process on`) -> ([0], [1]); `any` or `cpus: not pinned` -> None."""
    from meshwright.runtime.server import parse_cpus

    def where(process: str) -> list[int] | None:
        match = re.search(rf"the {process}(?: process|'s loop) on ([0-9]+(?:[-,][0-9]+)*|any)",
                          line)
        return sorted(parse_cpus(match.group(1))) if match and match.group(1) != "any" else None

    return where("engine"), where("HTTP")


@contextlib.contextmanager
def pinned(cpus: list[int] | None):
    """Every thread of this process on `cpus` meanwhile (None: where it is)."""
    from meshwright.runtime.engine_process import pin_process

    before = sorted(os.sched_getaffinity(0))
    if cpus:
        pin_process(cpus)
    try:
        yield
    finally:
        if cpus:
            pin_process(before)


async def _one(host: str, port: int, t0: float, arrival: float, prompt: list[int],
               max_tokens: int, stream: bool) -> tuple[float, float | None, float, int]:
    """One completion over its own connection, at its arrival time: (sent, first chunk of a
    stream, its end, completion tokens)."""
    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    body = json.dumps({"model": SERVED_AS, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": stream}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: "
               b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
               % (host.encode(), len(body), body))
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    sent = time.perf_counter()
    _, exchange = await loop.create_connection(
        lambda: _Exchange(request, stream, ended), host, port)
    done = await ended
    data = b"".join(exchange.parts)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(data.decode(errors="replace"))
    if not stream:
        return sent, None, done, json.loads(body)["usage"]["completion_tokens"]
    if not body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
        raise RuntimeError(f"the stream did not end with [DONE]: {body[-200:]!r}")
    start = body.rindex(b"data: {")  # the final chunk, with usage
    tokens = json.loads(body[start + 6:body.index(b"\n\n", start)])["usage"][
        "completion_tokens"]
    return sent, exchange.first, done, tokens


async def _drive(address: str, load, stream: bool) -> list[tuple]:
    host, port = address.removeprefix("http://").rsplit(":", 1)
    t0 = time.perf_counter() + 0.05
    return await asyncio.gather(*[_one(host, int(port), t0, t, p, n, stream)
                                  for t, p, n in load])


def run_http(server: ServerProcess, load, stream: bool = True) -> dict:
    before, client_cpu = server.cpu_seconds(), own_cpu_seconds()
    with pinned(server.http_cpus):  # off the engine's cores, as clients elsewhere would be
        out = run_loop(_drive(server.address, load, stream))
    server_cpu, loop_cpu, engine_cpu = (b - a for a, b in zip(before, server.cpu_seconds()))
    client_cpu = own_cpu_seconds() - client_cpu
    assert all(tokens == n for (*_, tokens), (_, _, n) in zip(out, load))
    span = max(done for _, _, done, _ in out) - min(sent for sent, *_ in out)
    tokens = sum(tokens for *_, tokens in out)
    m = summary(tokens, span, [done - sent for sent, _, done, _ in out],
                [first - sent for sent, first, _, _ in out] if stream else None)
    m["cpu_us_per_token"] = {"server": server_cpu / tokens * 1e6,
                             "server_loop": loop_cpu / tokens * 1e6,
                             "engine": engine_cpu / tokens * 1e6,
                             "client": client_cpu / tokens * 1e6}
    return m


def run_loop(main):
    """asyncio.run on uvloop where it is installed (the server's loop too): less CPU per
    chunk for the load generator."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------


def median_of(runs: list[dict]) -> dict:
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    out = {"throughput_tokens_per_s": med([r["throughput_tokens_per_s"] for r in runs]),
           "latency_s": {q: med([r["latency_s"][q] for r in runs]) for q in ("p50", "p99")},
           "ttft_s": {q: med([r["ttft_s"][q] for r in runs]) for q in ("p50", "p99")},
           "cpu_us_per_token": {k: med([r["cpu_us_per_token"][k] for r in runs])
                                for k in runs[0]["cpu_us_per_token"]}}
    out["runs"] = runs
    return out


MODES = ("in_process", "in_process_pinned", "http_stream", "http_stream_20ms", "http_whole",
         "http_stream_unpinned")


def table(rows: list[dict]) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1e3:.1f}"

    head = (f"{'rate':>6}  {'served':<22}{'tok/s':>7}{'vs in-proc':>11}{'p50 ms':>8}"
            f"{'p99 ms':>8}{'TTFT p50':>9}{'TTFT p99':>9}  CPU us/token")
    lines = [head, "-" * (len(head) + 18)]
    for row in rows:
        for mode in (m for m in MODES if m in row):
            m = row[mode]
            tps = m["throughput_tokens_per_s"]
            cpu = ", ".join(f"{k.replace('_', '-')} {v:.0f}"
                            for k, v in m["cpu_us_per_token"].items())
            vs = row["throughput_overhead"].get(mode)
            lines.append(f"{row['rate']:>6g}  {mode.replace('_', '-'):<22}{tps:>7.0f}"
                         f"{'' if vs is None else f'{-vs:+.1%}':>11}"
                         f"{ms(m['latency_s']['p50']):>8}{ms(m['latency_s']['p99']):>8}"
                         f"{ms(m['ttft_s']['p50']):>9}{ms(m['ttft_s']['p99']):>9}  {cpu}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="1000,20", help="Poisson arrival rates, req/s")
    p.add_argument("--model", default=MODEL, help="default: the bundled model; or a preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset's config field (repeatable)")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--out-len", type=int, nargs=2, default=(16, 128), metavar=("A", "B"))
    p.add_argument("--max-slots", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="32 requests, 1 repeat, rate 1000")
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args()
    if args.quick:
        args.rates, args.requests, args.repeats = "1000", 32, 1
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    load_start = os.getloadavg()

    from meshwright.runtime import bench
    from meshwright.runtime.demo import use_compilation_cache

    use_compilation_cache("auto")
    servers = [ServerProcess(args.model, args.set, args.max_slots, args.max_len),
               ServerProcess(args.model, args.set, args.max_slots, args.max_len,
                             "--stream-interval", "20"),
               ServerProcess(args.model, args.set, args.max_slots, args.max_len,
                             "--engine-cpus", "off")]
    try:
        engine = bench.make_engine(args.model, max_slots=args.max_slots, max_len=args.max_len,
                                   overrides=args.set, progress=False)
        run = {"in_process": lambda load: run_in_process(engine, load),
               "in_process_pinned": lambda load: run_in_process(engine, load,
                                                                servers[0].engine_cpus),
               "http_stream": lambda load: run_http(servers[0], load),
               "http_stream_20ms": lambda load: run_http(servers[1], load),
               "http_whole": lambda load: run_http(servers[0], load, stream=False),
               "http_stream_unpinned": lambda load: run_http(servers[2], load)}
        # in-process on the server's engine CPUs, when it pinned its engine (else the same as
        # in-process)
        modes = [m for m in MODES if m != "in_process_pinned" or servers[0].engine_cpus]
        rows = []
        for rate in rates:
            load = workload(args.requests, rate, tuple(args.out_len), args.max_len, args.seed)
            for mode in modes:  # warm every path (the sampler, the sockets)
                run[mode](load[:8])
            runs: dict[str, list] = {mode: [] for mode in modes}
            for r in range(args.repeats):
                k = r % len(modes)
                for mode in modes[k:] + modes[:k]:
                    runs[mode].append(run[mode](load))
                    print(f"  rate {rate:g} repeat {r + 1} {mode}: "
                          f"{runs[mode][-1]['throughput_tokens_per_s']:.0f} tok/s",
                          file=sys.stderr, flush=True)
            row = {"rate": rate, **{m: median_of(v) for m, v in runs.items()}}
            # each repeat's ratio to in-process in the same repeat (the ways of a repeat run
            # back to back), then the median over repeats
            row["throughput_overhead"] = {
                m: statistics.median(1 - a["throughput_tokens_per_s"]
                                     / b["throughput_tokens_per_s"]
                                     for a, b in zip(runs[m], runs["in_process"]))
                for m in modes[1:]}
            rows.append(row)
    finally:
        for server in servers:
            server.stop()
    print(f"{args.model}{''.join(' --set ' + o for o in args.set)}, {args.max_slots} slots, max_len {args.max_len}, {args.requests} requests "
          f"per run, output lengths uniform [{args.out_len[0]}, {args.out_len[1]}], greedy; "
          f"median of {args.repeats} runs, the {len(modes)} ways alternated; vs in-proc: the "
          f"median over repeats of each repeat's ratio")
    print(f"load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in load_start)} at the "
          f"start, {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end "
          f"({os.cpu_count()} cores)")
    print(table(rows))
    result = {"model": args.model, "overrides": args.set, "max_slots": args.max_slots, "max_len": args.max_len,
              "requests": args.requests, "out_len": list(args.out_len),
              "repeats": args.repeats, "seed": args.seed, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average_start": load_start,
                          "load_average": os.getloadavg()},
              "command": "python benchmarks/http_load.py " + " ".join(sys.argv[1:])}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
