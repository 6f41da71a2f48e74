"""The HTTP server under load against the same engine in-process: what serving over HTTP costs.

    python benchmarks/http_load.py                  # rates 1000 (saturation) and 20 req/s
    python benchmarks/http_load.py --quick          # a smoke run
    python benchmarks/http_load.py --rates 1000,30 --requests 128 --repeats 3

One workload: Poisson arrivals at each rate, prompts from the bundled model's held-out text
(sent as token ids, so both sides run the same tokens), output lengths uniform in
[--out-len], greedy, run to their length. Five ways to serve it, alternated (each repeat runs
all five, in a rotated order) so that the machine's other load hits them alike:

- in-process: `Engine.serve(workload, clock="wall")` on an engine built like the server's
  (`bench.make_engine`, the bundled model, the same slots and max_len);
- http-stream: `meshwright serve` in a subprocess, each request streamed (a chunk per
  engine step), sent at its arrival time from asyncio by a bare HTTP/1.1 client (`_one`:
  one connection per request, the body read as it arrives and parsed at its end); TTFT is
  the first streamed chunk (for a completion: the first token), latency the stream's end;
- http-stream-20ms: the same with a second server started with `--stream-interval 20` (a
  stream sends at most one chunk per 20 ms);
- http-whole: not streamed (one JSON answer per request; no TTFT);
- http-stream-unpinned: as http-stream, from a third server started with `--engine-cpus off`
  (the engine and HTTP processes not pinned to cores of their own: what pinning buys).

Each reports throughput (generated tokens / first arrival to last token), p50/p99 latency,
p50/p99 time to first token, and CPU time per generated token: of this process for
in-process; for HTTP of the server's two processes together, of the HTTP process's event-loop
thread alone (server-loop: the HTTP work), of the engine process (its loop and XLA's threads),
and of the load generator (on two cores the client's CPU is taken from the server). The table gives medians over repeats and HTTP's
throughput overhead, 1 - http / in-process. Writes benchmarks/results/http_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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


def run_in_process(engine, load) -> dict:
    from meshwright.runtime.request import Request

    arrivals = [(t, Request(prompt=tuple(p), max_tokens=n)) for t, p, n in load]
    cpu = own_cpu_seconds()
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
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if "listening on " in line:
                    self.address = line.split("listening on ")[1].split()[0]
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


async def _one(host: str, port: int, t0: float, arrival: float, prompt: list[int],
               max_tokens: int, stream: bool) -> tuple[float, float | None, float, int]:
    """One completion over its own connection, at its arrival time: (sent, first chunk of a
    stream, its end, completion tokens). A bare HTTP/1.1 client on asyncio streams: on two
    cores the load generator's own CPU time slows the server, and a full client library
    spends several times more per streamed chunk."""
    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    body = json.dumps({"model": SERVED_AS, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": stream}).encode()
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                 % (host.encode(), len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{head.decode()}{(await reader.read()).decode()}")
    if not stream:
        answer = json.loads(await reader.read())
        writer.close()
        return sent, None, time.perf_counter(), answer["usage"]["completion_tokens"]
    # The body as it comes, parsed once at the end: the load generator reads each arrival
    # once (one read per chunk or batch of chunks), not event by event.
    first, parts, tail = None, [], b""
    while not tail.endswith(b"\r\n0\r\n\r\n"):  # chunked encoding's last, empty chunk
        data = await reader.read(1 << 16)
        if not data:
            raise RuntimeError("the server closed the stream before its end")
        if first is None:
            first = time.perf_counter()
        parts.append(data)
        tail = tail[-8:] + data[-8:]
    done = time.perf_counter()
    writer.close()
    body = b"".join(parts)
    if not body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
        raise RuntimeError(f"the stream did not end with [DONE]: {body[-200:]!r}")
    start = body.rindex(b"data: {")  # the final chunk, with usage
    tokens = json.loads(body[start + 6:body.index(b"\n\n", start)])["usage"][
        "completion_tokens"]
    return sent, first, done, tokens


async def _drive(address: str, load, stream: bool) -> list[tuple]:
    host, port = address.removeprefix("http://").rsplit(":", 1)
    t0 = time.perf_counter() + 0.05
    return await asyncio.gather(*[_one(host, int(port), t0, t, p, n, stream)
                                  for t, p, n in load])


def run_http(server: ServerProcess, load, stream: bool = True) -> dict:
    before, client_cpu = server.cpu_seconds(), own_cpu_seconds()
    out = asyncio.run(_drive(server.address, load, stream))
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


MODES = ("in_process", "http_stream", "http_stream_20ms", "http_whole", "http_stream_unpinned")


def table(rows: list[dict]) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1e3:.1f}"

    head = (f"{'rate':>6}  {'served':<22}{'tok/s':>7}{'vs in-proc':>11}{'p50 ms':>8}"
            f"{'p99 ms':>8}{'TTFT p50':>9}{'TTFT p99':>9}  CPU us/token")
    lines = [head, "-" * (len(head) + 18)]
    for row in rows:
        base = row["in_process"]["throughput_tokens_per_s"]
        for mode in MODES:
            m = row[mode]
            tps = m["throughput_tokens_per_s"]
            cpu = ", ".join(f"{k.replace('_', '-')} {v:.0f}"
                            for k, v in m["cpu_us_per_token"].items())
            lines.append(f"{row['rate']:>6g}  {mode.replace('_', '-'):<22}{tps:>7.0f}"
                         f"{'' if mode == 'in_process' else f'{tps / base - 1:+.1%}':>11}"
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
               "http_stream": lambda load: run_http(servers[0], load),
               "http_stream_20ms": lambda load: run_http(servers[1], load),
               "http_whole": lambda load: run_http(servers[0], load, stream=False),
               "http_stream_unpinned": lambda load: run_http(servers[2], load)}
        rows = []
        for rate in rates:
            load = workload(args.requests, rate, tuple(args.out_len), args.max_len, args.seed)
            for mode in MODES:  # warm every path (the sampler, the sockets)
                run[mode](load[:8])
            runs: dict[str, list] = {mode: [] for mode in MODES}
            for r in range(args.repeats):
                k = r % len(MODES)
                for mode in MODES[k:] + MODES[:k]:
                    runs[mode].append(run[mode](load))
                    print(f"  rate {rate:g} repeat {r + 1} {mode}: "
                          f"{runs[mode][-1]['throughput_tokens_per_s']:.0f} tok/s",
                          file=sys.stderr, flush=True)
            row = {"rate": rate, **{m: median_of(v) for m, v in runs.items()}}
            base = row["in_process"]["throughput_tokens_per_s"]
            row["throughput_overhead"] = {
                m: 1 - row[m]["throughput_tokens_per_s"] / base for m in MODES[1:]}
            rows.append(row)
    finally:
        for server in servers:
            server.stop()
    print(f"{args.model}{''.join(' --set ' + o for o in args.set)}, {args.max_slots} slots, max_len {args.max_len}, {args.requests} requests "
          f"per run, output lengths uniform [{args.out_len[0]}, {args.out_len[1]}], greedy; "
          f"median of {args.repeats} runs, the {len(MODES)} ways alternated")
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
