"""`meshwright serve` end to end: live servers on 127.0.0.1, each a subprocess of this test on
a free port (`--port 0`, the address read from its first line), driven by the official
`openai` client and by plain HTTP; and the request rules of `openai_api` without a socket.

Every greedy answer is compared with `Engine.generate` on the same prompt, one request alone
in an engine of its own (in this process, one slot), so batching, streaming, aborts or bad
requests next to it cannot change a token without a test failing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from meshwright.models import build, load_demo_model
from meshwright.models.demo import ByteTokenizer
from meshwright.runtime import engine_process, server
from meshwright.runtime import openai_api as api
from meshwright.runtime.demo import burst_prompts
from meshwright.runtime.engine import Engine
from meshwright.runtime.prometheus import parse as parse_metrics

MAX_LEN = 128
MODEL = "palm-kjv"
KEY = "test-key-123"
CACHE = os.path.abspath(os.environ.get(
    "MESHWRIGHT_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")))


class Live:
    """A `meshwright serve` subprocess: its address, its output so far, and a way to stop it."""

    def __init__(self, *args: str, **env_vars: str) -> None:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=CACHE,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1",
                   **env_vars)
        env.pop("MESHWRIGHT_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshwright.cli", "serve", "--port", "0", "--no-progress",
             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.address = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "listening on " in line and self.address is None:
                self.address = line.split("listening on ")[1].split()[0]
            if line.startswith("ready:"):
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 240) -> Live:
        assert self._ready.wait(timeout), "server not ready in time:\n" + self.output
        assert self.proc.poll() is None, "server exited:\n" + self.output
        return self

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def client(self, key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.address}/v1", api_key=key, max_retries=0,
                             timeout=120, **kwargs)

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        r = httpx.get(f"{self.address}/metrics", headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        return parse_metrics(r.text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def servers():
    """Three servers started together (they compile at the same time): the main one; a
    two-slot server with three places in its queue, behind an API key with a small body
    bound, which the SIGTERM test (the last to use it) drains; and the user's model of
    tests/served_zoo.py (--model-fn)."""
    started = {
        "main": Live("--max-slots", "8", "--max-len", str(MAX_LEN)),
        "guarded": Live("--max-slots", "2", "--max-len", "256", "--max-queue", "3",
                        "--api-key", KEY, "--max-body-bytes", "4096", "--drain-timeout", "60"),
        "own": Live("--model-fn", "served_zoo:einsum_gqa_served", "--max-slots", "2",
                    "--max-len", "32", PYTHONPATH=os.pathsep.join(filter(None, [
                        os.path.dirname(os.path.abspath(__file__)),
                        os.environ.get("PYTHONPATH")]))),
    }
    try:
        yield {name: s.wait_ready() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def main(servers) -> Live:
    return servers["main"]


@pytest.fixture(scope="module")
def alone():
    """greedy(prompt ids, max_tokens) -> text: `Engine.generate` with the request alone."""
    config, params = load_demo_model()
    engine = Engine(build(config.replace(max_len=MAX_LEN)), params, max_slots=1,
                    max_len=MAX_LEN, kv_lengths=(MAX_LEN,), prefill_lengths=(MAX_LEN,),
                    progress=False, tokenizer=ByteTokenizer())
    cache = {}

    def greedy(prompt: str | list[int], max_tokens: int) -> str:
        key = (tuple(prompt) if isinstance(prompt, list) else prompt, max_tokens)
        if key not in cache:
            (result,) = engine.generate([prompt], max_tokens=max_tokens)
            assert result.ok and len(result.tokens) == max_tokens
            cache[key] = result.text
        return cache[key]

    return greedy


def chat_ids(messages) -> list[int]:
    return ByteTokenizer().encode(api.plain_chat_prompt(messages))


# ---------------------------------------------------------------------------------------------
# The openai client: completion and chat, whole and streamed, greedy = Engine.generate


def test_start_up_prints_the_address_model_plan_and_ready(main):
    lines = main.lines
    assert lines[0].startswith("meshwright serve: listening on http://127.0.0.1:")
    assert any(line.startswith(f"model {MODEL}: max_len {MAX_LEN}, 8 slots") for line in lines)
    assert any(line.startswith("plan: one device") and "decode 1x64 1x128" in line and
               "8x128" in line for line in lines)
    assert [line for line in lines if line.startswith("ready:")] == [lines[-1]]
    # --engine-cpus auto: once compiled, the HTTP process keeps to the last CPU (every
    # thread of it); the engine's loop (its main thread) to the others, XLA's threads to all
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) >= 2:
        (line,) = [line for line in lines if line.startswith("cpus: ")]
        assert line == (f"cpus: the engine's loop on {server.cpu_text(cpus[:-1])} (XLA's "
                        f"threads on {server.cpu_text(cpus)}), the HTTP process on "
                        f"{cpus[-1]} (--engine-cpus auto; off: not pinned)")
        pid = main.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        (engine,) = [int(c) for c in children
                     if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        http_threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        assert {frozenset(os.sched_getaffinity(t)) for t in http_threads} == {
            frozenset({cpus[-1]})}
        where = {}
        for t in os.listdir(f"/proc/{engine}/task"):
            where.setdefault(int(t) == engine, set()).add(frozenset(os.sched_getaffinity(int(t))))
        assert where == {True: {frozenset(cpus[:-1])}, False: {frozenset(cpus)}}, where
    assert httpx.get(f"{main.address}/health").json() == {"status": "ready", "model": MODEL}
    models = main.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_whole_and_streamed_equal_engine_generate(main, alone):
    client = main.client()
    prompt = "In the beginning God"
    expected = alone(prompt, 24)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), 24)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and len({c.id for c in chunks}) == 1
    ids = list(prompt.encode())  # the prompt as token ids: the same answer
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == expected


def test_chat_whole_and_streamed_equal_engine_generate(main, alone):
    client = main.client()
    messages = [{"role": "system", "content": "Speak as the King James Bible."},
                {"role": "user", "content": "And God said"}]
    expected = alone(chat_ids(messages), 20)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                           temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert whole.usage.prompt_tokens == len(chat_ids(messages))
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_stop_strings_cut_the_text_and_sampling_is_seeded(main, alone):
    client = main.client()
    prompt = "And God said, Let there be"
    full = alone(prompt, 40)
    stop = full[10:13]  # a string the greedy answer contains
    cut = full[:full.index(stop)]
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40,
                                        temperature=0, stop=[stop, "zzz"], stream=stream)
        chunks = list(out) if stream else [out]
        assert "".join(c.choices[0].text for c in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=30,
                                         temperature=1.0, top_p=0.9, seed=seed,
                                         extra_body={"top_k": 20}).choices[0].text
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


# ---------------------------------------------------------------------------------------------
# 64 concurrent streams


def test_64_concurrent_streams_all_complete_each_as_alone(main, alone):
    prompts = [f"{i}: {p}" for i, p in enumerate(burst_prompts(64, seed=3))]
    lengths = [8 + (i * 7) % 33 for i in range(64)]
    client = main.client()
    peak = {"running": 0}

    def one(i):
        stream = client.completions.create(model=MODEL, prompt=prompts[i],
                                           max_tokens=lengths[i], temperature=0, stream=True)
        chunks = list(stream)
        return (chunks[0].id, "".join(c.choices[0].text for c in chunks),
                chunks[-1].choices[0].finish_reason, chunks[-1].usage.completion_tokens)

    def watch(stop):
        while not stop.is_set():
            peak["running"] = max(peak["running"],
                                  main.metrics()["meshwright_requests_running"])

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    watcher.start()
    try:
        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(one, range(64)))
    finally:
        stop.set()
        watcher.join()
    assert len({a[0] for a in answers}) == 64  # none duplicated
    assert [a[2:] for a in answers] == [("length", n) for n in lengths]  # none cut, none lost
    for i, (_, text, _, _) in enumerate(answers):
        assert text == alone(prompts[i], lengths[i]), i
    assert peak["running"] == 8  # they ran batched, in every slot


# ---------------------------------------------------------------------------------------------
# Trouble: disconnects, bad requests, a full queue, keys, bodies, SIGTERM


def test_a_client_that_leaves_mid_stream_frees_its_slot(main, alone):
    before = main.metrics()
    client = main.client()
    stream = client.completions.create(model=MODEL, prompt="Blessed are the", max_tokens=100,
                                       temperature=0, stream=True)
    received = [next(iter(stream)) for _ in range(3)]
    assert all(c.choices[0].text for c in received)
    stream.close()  # the client goes away after three chunks
    deadline = time.time() + 30
    while time.time() < deadline:
        m = main.metrics()
        if m["meshwright_engine_aborted_total"] > before["meshwright_engine_aborted_total"]:
            break
        time.sleep(0.05)
    key = 'meshwright_requests_total{endpoint="completions",outcome="disconnected"}'
    assert m.get(key, 0) == before.get(key, 0) + 1
    assert m["meshwright_engine_aborted_total"] == before["meshwright_engine_aborted_total"] + 1
    assert m["meshwright_requests_running"] == 0  # its slot is free ...
    # ... and reused: eight streams, opened together; once each has its first chunk all
    # eight run at once (none can have reached its 110th token yet)
    prompts = [f"{i}: the LORD" for i in range(8)]

    async def eight():
        async with httpx.AsyncClient(base_url=main.address, timeout=120) as http:
            async def stream(prompt, first):
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 110,
                        "temperature": 0, "stream": True}
                text = []
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text.append(json.loads(line[6:])["choices"][0]["text"])
                            if not first.done():
                                first.set_result(None)
                return "".join(text)

            firsts = [asyncio.get_running_loop().create_future() for _ in prompts]
            tasks = [asyncio.create_task(stream(p, f)) for p, f in zip(prompts, firsts)]
            await asyncio.gather(*firsts)
            running = (await http.get("/metrics")).text
            return parse_metrics(running)["meshwright_requests_running"], \
                await asyncio.gather(*tasks)

    running, texts = asyncio.run(eight())
    assert running == 8
    assert texts == [alone(p, 110) for p in prompts]


BAD = [  # (body, param in the error, a word of its message)
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, "max_tokens", "integer"),
    ({"model": MODEL, "prompt": "x", "temprature": 0}, "temprature", "unknown field"),
    ({"model": MODEL, "prompt": 42}, "prompt", "string or a list"),
    ({"model": MODEL}, "prompt", "needs a prompt"),
    ({"model": MODEL, "prompt": "x" * 200}, "prompt", "max_len is 128"),
    ({"model": MODEL, "prompt": "x" * 100, "max_tokens": 60}, "max_tokens", "above max_len"),
    ({"model": MODEL, "prompt": [1, 300, 2]}, "prompt", "outside the vocabulary"),
    ({"model": MODEL, "prompt": []}, "prompt", "empty"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature", ">= 0"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ({"model": MODEL, "prompt": "x", "top_k": 1.5}, "top_k", "integer"),
    ({"model": MODEL, "prompt": "x", "seed": -3}, "seed", "2**32"),
    ({"model": MODEL, "prompt": "x", "n": 2}, "n", "n=1"),
    ({"model": MODEL, "prompt": "x", "logprobs": 3}, "logprobs", "not supported"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, "stream", "true or false"),
    ({"model": MODEL, "prompt": ["a", "b"]}, "prompt", "one prompt per request"),
]
BAD_CHAT = [
    ({"model": MODEL, "messages": []}, "messages", "non-empty"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role",
     "one of"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "text parts"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{}]}, "tools",
     "not supported"),
]


def test_each_bad_request_is_a_400_and_disturbs_no_one(main, alone):
    client = main.client()
    good = {}

    def run_good():
        chunks = list(client.completions.create(model=MODEL, prompt="Thou shalt",
                                                max_tokens=90, temperature=0, stream=True))
        good["text"] = "".join(c.choices[0].text for c in chunks)

    t = threading.Thread(target=run_good)
    t.start()
    with httpx.Client(base_url=main.address, timeout=30) as http:
        for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
            for body, param, word in cases:
                r = (http.post(path, content=body, headers={"content-type": "application/json"})
                     if isinstance(body, bytes) else http.post(path, json=body))
                assert r.status_code == 400, (body, r.text)
                error = r.json()["error"]
                assert set(error) >= {"message", "type", "param"}, error
                assert error["type"] == "invalid_request_error" and error["param"] == param
                assert word in error["message"], (word, error)
        r = http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert http.get("/v1/nowhere").status_code == 404
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=-2)
    t.join(60)
    assert good["text"] == alone("Thou shalt", 90)


def test_a_full_queue_answers_429_with_retry_after(servers):
    """Two slots, three places in the queue: of eight requests sent at once, at most five are
    admitted at first and the rest, arriving while every place is taken, are answered 429;
    the admitted ones complete."""
    guarded = servers["guarded"]
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "And it came to pass", "max_tokens": 100,
            "temperature": 0}
    start = threading.Barrier(8)

    def one(_):
        with httpx.Client(base_url=guarded.address, headers=auth, timeout=60) as http:
            start.wait(10)
            return http.post("/v1/completions", json=body)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    full = [r for r in answers if r.status_code == 429]
    done = [r for r in answers if r.status_code == 200]
    assert len(full) + len(done) == 8 and full and len(done) >= 2, [r.text for r in answers]
    for r in full:
        assert r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["code"] == "queue_full" and "queue full" in error["message"]
    assert all(r.json()["usage"]["completion_tokens"] == 100 for r in done)
    assert len({r.json()["choices"][0]["text"] for r in done}) == 1  # the same greedy answer
    m = guarded.metrics(auth)
    assert m['meshwright_requests_total{endpoint="completions",outcome="queue_full"}'] == \
        len(full)


def test_api_key_and_body_bound(servers):
    guarded = servers["guarded"]
    url = guarded.address
    assert httpx.get(f"{url}/health").status_code == 200  # open to probes
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("GET", "/metrics")):
            r = httpx.request(method, f"{url}{path}", headers=headers, json={})
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").models.list()
    assert [m.id for m in guarded.client(KEY).models.list().data] == [MODEL]
    big = {"model": MODEL, "prompt": "x" * 20_000}
    r = httpx.post(f"{url}/v1/completions", json=big, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and "at most 4096" in r.json()["error"]["message"]
    ok = guarded.client(KEY).completions.create(model=MODEL, prompt="Amen", max_tokens=3,
                                                 temperature=0)
    assert ok.usage.completion_tokens == 3


def test_sigterm_finishes_the_streams_in_flight_and_exits_0(servers):
    drain = servers["guarded"]  # the last test to use it
    auth = {"Authorization": f"Bearer {KEY}"}
    client = drain.client(KEY)
    results = {}

    def one(i):  # two run in the two slots, the third waits for one of them
        stream = client.completions.create(model=MODEL, prompt=f"Psalm {i}", max_tokens=240,
                                           temperature=0, stream=True)
        results[i] = list(stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline, m = time.time() + 30, {}
    while time.time() < deadline and not results:  # until all three are in the server
        m = drain.metrics(auth)
        if m["meshwright_requests_running"] == 2 and m["meshwright_queue_waiting"] == 1:
            break
    assert not results, "a stream ended before all three were in flight"
    pid = drain.proc.pid
    (engine_pid,) = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text()
                     .split() if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    drain.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert drain.proc.wait(60) == 0, drain.output
    assert sorted(results) == [0, 1, 2]
    for chunks in results.values():  # every stream finished in full
        assert chunks[-1].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 240
    (line,) = [x for x in drain.lines if x.startswith("draining: ")]
    assert int(line.split()[1]) >= 2, line  # at least the two running ones were in flight
    assert drain.lines[-1] == "stopped"
    with pytest.raises(httpx.ConnectError):  # no longer admitting
        httpx.get(f"{drain.address}/health")
    assert not Path(f"/proc/{engine_pid}").exists(), "the engine process outlived the server"


def test_a_model_from_functions_serves_token_ids(servers):
    """--model-fn: the user's model (no tokenizer) takes token-id prompts and answers with the
    tokens it generated, the same as the model run alone; text, chat and stop strings are
    refused with a 400 that says so."""
    from served_zoo import einsum_gqa_served

    own = servers["own"]
    assert any("no tokenizer" in line for line in own.lines), own.output
    model, params = einsum_gqa_served()
    engine = Engine(model, params, max_slots=1, max_len=32, progress=False)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [60, 0, 7]]
    alone = [r.tokens for r in engine.generate(prompts, max_tokens=12)]
    url = f"{own.address}/v1/completions"
    body = {"model": "einsum-gqa", "max_tokens": 12, "temperature": 0}
    for prompt, expected in zip(prompts, alone):
        r = httpx.post(url, json={**body, "prompt": prompt}, timeout=60)
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        assert choice["token_ids"] == expected and choice["text"] == ""
        with httpx.stream("POST", url, json={**body, "prompt": prompt, "stream": True},
                          timeout=60) as r:
            events = [line[len("data: "):] for line in r.iter_lines() if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert [t for c in chunks for t in c.get("token_ids", [])] == expected
        assert chunks[-1]["finish_reason"] == "length"
    refused = [({"prompt": "In the beginning"}, "prompt"), ({"prompt": [1, 2], "stop": "x"},
                                                            "stop")]
    for extra, param in refused:
        r = httpx.post(url, json={**body, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "no tokenizer" in r.json()["error"]["message"]
    r = httpx.post(f"{own.address}/v1/chat/completions", json={
        "model": "einsum-gqa", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_metrics_are_prometheus_text(main):
    main.client().completions.create(model=MODEL, prompt="Selah", max_tokens=4, temperature=0)
    r = httpx.get(f"{main.address}/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for name, kind in (("meshwright_requests_total", "counter"),
                       ("meshwright_step_seconds", "histogram"),
                       ("meshwright_time_to_first_token_seconds", "histogram"),
                       ("meshwright_queue_waiting", "gauge"),
                       ("meshwright_bucket_in_use", "gauge")):
        assert f"# TYPE {name} {kind}" in text
    m = parse_metrics(text)
    assert m['meshwright_step_seconds_bucket{le="+Inf"}'] == m["meshwright_step_seconds_count"] > 0
    assert m["meshwright_generation_tokens_total"] >= 4 and m["meshwright_ready"] == 1
    in_use = [k for k in m if k.startswith("meshwright_bucket_in_use{")]
    assert len(in_use) == 1 and 'layout="replicated"' in in_use[0]
    steps = {k: v for k, v in m.items() if k.startswith("meshwright_engine_steps_total{")}
    # (this test's own request, alone: one row, positions under 64)
    assert any('phase="decode",bucket="1x64"' in k and v > 0 for k, v in steps.items())


# ---------------------------------------------------------------------------------------------
# Without a socket: the request rules, text out of tokens, chat templates, the CLI's errors


LIMITS = api.Limits(max_len=64, vocab_size=256, max_tokens=32)
TEXT = api.ModelText(ByteTokenizer())


def test_defaults_follow_openai():
    spec = api.parse_completion({"model": "m", "prompt": "hi"}, "m", LIMITS, TEXT)
    assert spec.max_tokens == 16 and spec.sampling.temperature == 1.0 and not spec.stream
    seeds = {api.parse_completion({"model": "m", "prompt": "hi"}, "m", LIMITS, TEXT)
             .sampling.seed for _ in range(5)}
    assert len(seeds) > 1  # unseeded requests are not all alike
    chat = api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "m",
                          LIMITS, TEXT)
    assert chat.max_tokens == 32  # the room left, up to the server's bound
    assert chat.prompt == tuple(b"user: hi\nassistant:")
    with pytest.raises(api.ApiError, match="above this server's bound"):
        api.parse_completion({"model": "m", "prompt": "x", "max_tokens": 33}, "m", LIMITS, TEXT)


def test_text_stream_holds_back_split_characters_and_stop_prefixes():
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    tokens = list("In the beginning — “God” said: Amen. THE END".encode())
    whole = decode(tokens)
    for stop in ((), ("Amen",), ("—",), ("END", "xyz")):
        s = api.TextStream(decode, stop)
        sent = "".join(s.push([t]) for t in tokens) + s.finish()
        expected = whole[:min((whole.find(x) for x in stop if x in whole), default=len(whole))]
        assert sent == expected == s.text and s.stopped == bool(stop)
        assert "\ufffd" not in sent
    s = api.TextStream(decode, ("Amen",))
    assert s.push(list(b"so Am")) == "so "  # "Am" might begin the stop string
    assert s.push(list(b"ple")) == "Ample"


def test_chat_templates_render_in_a_sandbox(tmp_path):
    from meshwright.models.hf import load_generation_info

    template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>"
                "{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    info = load_generation_info(tmp_path)
    assert info.eos_token_ids == (2, 7) and info.bos_token == "<s>"
    chat = api.ChatTemplate(info.chat_template, info.bos_token, info.eos_token)
    assert chat.render([{"role": "user", "content": "hi"}]) == "<s><|user|>hi</s><|assistant|>"
    escape = api.ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(api.ApiError, match="refused") as e:
        escape.render([{"role": "user", "content": "hi"}])
    assert e.value.status == 400
    refusing = api.ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(api.ApiError, match="roles must alternate"):
        refusing.render([])
    with pytest.raises(ValueError, match="does not parse"):
        api.ChatTemplate("{% for %}")
    assert load_generation_info(Path(tmp_path / "nothing")).chat_template is None


def test_engine_cpus_split_the_cores_between_the_two_processes():
    assert server.cpu_split("auto", {0, 1}) == ((0,), (1,))  # the engine: if its step says so
    assert server.cpu_split("auto", {2, 5, 7}) == ((2, 5), (7,))
    assert server.cpu_split("auto", {3}) == ((), ())  # one CPU: nothing to split
    assert server.cpu_split("auto", None) == ((), ())  # no CPU affinity on this platform
    assert server.cpu_split("off", {0, 1, 2, 3}) == ((), ())
    assert server.cpu_split("0-2,5", set(range(8))) == ((0, 1, 2, 5), (3, 4, 6, 7))
    assert server.cpu_split("0,1", {0, 1}) == ((0, 1), ())  # the HTTP process: unpinned
    with pytest.raises(ValueError, match="CPU 4,6-7 not available to this process"):
        server.cpu_split("0,4,6-7", {0, 1, 2})
    with pytest.raises(ValueError, match="cannot pin"):
        server.cpu_split("0", None)
    for bad in ("", "x", "1-", "3-1", "0,,1", "-1"):
        with pytest.raises(ValueError, match="expected auto, off or CPU numbers"):
            server.parse_cpus(bad)
    assert server.cpu_text([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_engine_cpus_auto_pins_the_loop_and_gives_xlas_threads_every_cpu():
    """pin_split: the calling thread (the engine's loop) on the engine's CPUs, no other (the
    live start-up test checks that the others keep every CPU)."""
    calls = []
    engine_process.pin_split([0], set_affinity=lambda tid, cpus: calls.append((tid, cpus)))
    assert calls == [(0, {0})]
    assert server.cpus_line({"engine": [0], "http": [1], "option": "auto",
                             "compute": [0, 1]}) == (
        "cpus: the engine's loop on 0 (XLA's threads on 0-1), the HTTP process on 1 "
        "(--engine-cpus auto; off: not pinned)")
    assert server.cpus_line({"engine": [0, 1], "http": [2, 3], "option": "0-1",
                             "compute": None}) == (
        "cpus: the engine process on 0-1, the HTTP process on 2-3 (--engine-cpus 0-1; off: not "
        "pinned)")


def test_a_server_whose_log_reader_is_gone_still_drains_on_sigterm():
    """The process that started the server died, and its stdout pipe with it: the drain's
    log line cannot be written, and SIGTERM must still stop the server (it used to raise
    BrokenPipeError in the signal handler, before uvicorn was told to exit: the server ran on)."""
    import uvicorn

    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    s = server.Server(server.ServeOptions(), out=Gone())
    s.begin_drain()
    assert s.draining
    server.say(Gone(), "stopped")  # dropped
    asgi = server._Uvicorn(uvicorn.Config(s.app), on_exit=lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        asgi.handle_exit(signal.SIGTERM, None)
    assert asgi.should_exit  # told to exit all the same


def test_the_server_reads_the_engine_pipe_by_polling_while_requests_are_in_flight():
    """Idle, the server's loop is woken by the pipe; with a request in flight it stops
    sleeping on the pipe and reads it every POLL_S (a write that wakes no one is cheaper
    for the engine); when the last request ends it sleeps on the pipe again. The engine's
    end of the pipe is played by this test."""
    import multiprocessing

    class Sink:
        def __init__(self):
            self.items = []

        def put(self, item):
            self.items.append(item)

    async def run():
        loop = asyncio.get_running_loop()
        proc = engine_process.EngineProcess(server.ServeOptions(), on_message=lambda m: None)
        proc._conn, engine_end = multiprocessing.Pipe(duplex=True)
        proc._loop = loop
        proc._listen()
        assert proc._watching and proc._poller is None  # idle: woken by the pipe
        sink = Sink()
        submitted = asyncio.ensure_future(proc.submit("a request", True, sink))
        await asyncio.sleep(0)
        assert not proc._watching and proc._poller is not None  # in flight: polled
        assert engine_end.recv() == ("submit", 0, "a request", True)
        engine_end.send(("accepted", 0))
        assert await asyncio.wait_for(submitted, 1) == (0, None)
        result = engine_process.EngineFacts  # any object but an int ends the request
        engine_end.send(("step", [0.001], [(0, 7), (0, 8), (0, result)]))
        for _ in range(100):
            await asyncio.sleep(engine_process.POLL_S)
            if proc._watching:
                break
        assert sink.items == [7, 8, result]
        assert proc._watching and proc._poller is None  # nothing in flight: woken again
        engine_end.close()
        await asyncio.sleep(0.01)  # the pipe closed: the loop lets go of it
        assert proc._closed and not proc._watching and proc.status == "failed"

    asyncio.run(run())


def test_the_engine_hands_over_and_reads_less_often_while_requests_queue():
    """Pace: when the loop is about to wait, both at once; running, a first token or an end at
    once, other tokens every handover_s, commands every READ_S; with requests waiting for a
    slot, both every QUEUED_HANDOVER_S, first tokens and ends included."""
    P = engine_process
    pace = P.Pace(P.HANDOVER_S, t=0.0)
    assert not pace.hand_over(0.0005, False, False, news=True, urgent=False)
    assert pace.hand_over(0.0006, False, False, news=True, urgent=True)  # a first token
    assert not pace.hand_over(0.0007, False, False, news=False, urgent=False)
    assert pace.hand_over(0.0007, False, False, news=False, urgent=False, full=True)
    assert pace.hand_over(0.0007 + P.HANDOVER_S, False, False, news=True, urgent=False)
    assert pace.hand_over(0.0031, True, False, news=True, urgent=False)  # about to wait
    assert not pace.read(0.0005, False, False) and pace.read(P.READ_S, False, False)
    assert pace.read(P.READ_S, True, False)  # about to wait
    queued = P.Pace(P.HANDOVER_S, t=0.0)
    late = P.QUEUED_HANDOVER_S - 1e-4
    assert not queued.hand_over(late, False, True, news=True, urgent=True)
    assert not queued.read(late, False, True)
    assert queued.hand_over(P.QUEUED_HANDOVER_S, False, True, news=True, urgent=False)
    assert queued.read(P.QUEUED_HANDOVER_S, False, True)
    assert P.Pace(0.020, t=0.0).queued_s == 0.020  # --stream-interval 20: the longer of the two


def test_pipe_reader_sees_a_message_and_a_closed_pipe():
    import multiprocessing

    mine, theirs = multiprocessing.Pipe(duplex=True)
    readable = engine_process.pipe_reader(mine)
    assert not readable(0.0)
    t0 = time.perf_counter()
    assert not readable(0.02) and time.perf_counter() - t0 >= 0.015  # waited for it
    theirs.send(("stop",))
    assert readable(0.0) and mine.recv() == ("stop",) and not readable(0.0)
    theirs.close()
    assert readable(1.0)  # closed: readable, and recv says so
    with pytest.raises(EOFError):
        mine.recv()


@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "--port must be <= 65535"),
    (["--max-slots", "0"], "--max-slots 0: must be a whole number >= 1"),
    (["--checkpoint", "/no/such/checkpoint"], "/no/such/checkpoint"),
    (["--model", "no-such-preset"], "no-such-preset"),
    (["--engine-cpus", "0-x"], "--engine-cpus '0-x': expected auto, off or CPU numbers"),
])
def test_cli_errors_are_one_line(args, message):
    port = [] if "--port" in args else ["--port", "0"]
    r = subprocess.run([sys.executable, "-m", "meshwright.cli", "serve", "--no-progress", *port,
                        *args], check=False, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=CACHE))
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("meshwright serve: error:"), r.stderr
    assert message in errors[0] and "Traceback" not in r.stderr
