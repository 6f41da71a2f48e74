"""The serving engine: the scheduler's decisions carried out on compiled model steps.

    >>> from meshwright.runtime.engine import Engine
    >>> engine = Engine("palm-tiny", max_slots=4, max_len=64, progress=False)
    >>> [r.tokens for r in engine.generate([[1, 2, 3], [4, 5]], max_tokens=3)]  # doctest: +SKIP
    [[..., ..., ...], [..., ..., ...]]

One iteration (`Engine.step`), as gpt-fast would write it, with the compile boundary in one
place (`compile_fn`):

    out = scheduler.schedule(now)          # device-free decisions (runtime/scheduler.py)
    kv.move                                # the memory shuffle, in the KV store
    prefill(rows x padded length)          # every request admitted now, batched -> first tokens
    decode_step(window of the KV cache)    # every live request, at its own position
    scheduler.update(out, sampled, now)    # finished requests leave and are delivered

Buckets. Every step runs at a static shape compiled at start-up, a `Bucket(batch, length)`:

- decode: `batch` rows (1, 2, 4, ..., max_slots: the scheduler keeps the live requests in the
  first rows) and a KV window of `length` positions (`kv_lengths`, default 64, 128, ...,
  max_len), the smallest that holds the longest live row: attention reads the live prefix,
  not max_len;
- prefill: `batch` prompts (`prefill_rows`, default 1, 2, 4, 8) padded on the right to
  `length` tokens (`prefill_lengths`, default 8, 16, ..., max_len): the requests admitted in
  one iteration are prefilled together, in as few calls as the buckets and
  `prefill_tokens` (rows x length per call) allow.

The KV cache (`kv_cache.KVCache`) keeps every slot in a store and hands each decode step the
window of its bucket, donated, so a step writes its new tokens in place and reads no position
it does not need; prefills write their rows into the store.

The seam for the sharded compiler (`mw.shard`; `runtime/layouts.py` builds an engine on it):

- `compile_fn(phase, bucket) -> callable` is called once per (phase, bucket) at start-up.
  The callable has the model's own signature and meaning at the bucket's shapes:
  decode_step(params, tokens (batch,), cache, positions (batch,)) with the cache at (batch,
  length), and prefill(params, tokens (batch, length), cache, last (batch,)) with a fresh
  cache of (batch, length) whose positions 0..length-1 it writes, returning logits (batch, V)
  at each row's last prompt token; both return (logits, cache) and the engine donates the
  cache it passes. The default is `jax.jit(model.fn(phase), donate_argnums=2)`, compiled
  ahead of time. A callable with an `in_shardings` attribute (the argument tree of the
  shardings it takes, e.g. `layouts.CompiledStep`) tells the engine where to put things: the
  weights are placed once with the first such step's weight shardings (a step that wants them
  split otherwise is listed in `engine.weight_copies`: it keeps its own copy, placed once),
  the KV window of each decode bucket as that step takes it, the store as the largest decode
  bucket takes it, and the helpers around the steps (sampling, KV loads, write-backs, writes,
  moves) are compiled at start-up, so nothing compiles on first use. Its `layout` and `why`
  attributes name the bucket's layout when there is no `planner_fn`.
- `planner_fn(phase, bucket) -> str` names the layout of each compiled bucket (default: the
  step's `layout`, else "replicated"); the engine counts how often consecutive decode steps
  change layout (`stats.layout_switches`). Without a sharded step the weights are `params`
  as given (replicated over `mesh` if one is given); they never move on a bucket switch.
- `cache_sharding`: None, a `jax.sharding.Sharding`, or (capacity, length) -> Sharding (see
  `kv_cache.batch_sharding`), for the KV cache when no compiled step says otherwise.

Threads: `submit` and `abort` are thread-safe, and `run_forever(stop)` runs the loop in one
thread until stopped while other threads submit, abort and wait on handles (the HTTP server,
`runtime/server.py`). A lock guards the scheduler and the handles; an iteration's device work
runs outside it. Without `run_forever`, the engine advances only when the caller steps it.

A model whose layers are a scan (`config.scan_layers`) is served as a loop (`unroll_layers`,
listed in `engine.notes`): on XLA:CPU a scan copies every layer's weights out of the stacked
arrays at every step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from meshwright.models import Model, TransformerConfig, build, get_config, unroll_layers
from meshwright.models.functions import FunctionModel
from meshwright.runtime.kv_cache import KVCache, ShardingFn, kv_lengths_for, zeros_maker
from meshwright.runtime.request import Request, Result, SamplingParams
from meshwright.runtime.sampling import greedy, sample_tokens
from meshwright.runtime.scheduler import (
    Prefill,
    Scheduler,
    SchedulerOutput,
    bucket_sizes,
    doubling,
)


class Bucket(NamedTuple):
    """The static shape a step is compiled for."""

    batch: int  # rows: decode 1, 2, 4, ..., max_slots; prefill 1, 2, 4, ... prompts
    length: int  # decode: positions of the KV window; prefill: padded prompt length


CompileFn = Callable[[str, Bucket], Callable]
PlannerFn = Callable[[str, Bucket], "str | None"]


# ---------------------------------------------------------------------------------------------
# Clocks


class WallClock:
    """Real time since the clock was made; waiting sleeps."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    @contextlib.contextmanager
    def compute(self):
        yield

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)


class VirtualClock:
    """Replay time: advances by the measured wall time of the engine's work, and jumps over
    idle waits instead of sleeping. Same numbers as a wall clock, without the idle time
    (inside `compute`, `now()` includes the work so far)."""

    def __init__(self) -> None:
        self._t = 0.0
        self._since: float | None = None  # perf_counter at the start of the current compute

    def now(self) -> float:
        if self._since is None:
            return self._t
        return self._t + time.perf_counter() - self._since

    @contextlib.contextmanager
    def compute(self):
        self._since = time.perf_counter()
        try:
            yield
        finally:
            self._t += time.perf_counter() - self._since
            self._since = None

    def wait_until(self, t: float) -> None:
        self._t = max(self._t, t)


class StepClock(VirtualClock):
    """Deterministic replay time: every engine iteration takes `step_s` seconds, whatever it
    really took. For tests and for scheduling studies that must not depend on machine load."""

    def __init__(self, step_s: float = 1e-3) -> None:
        super().__init__()
        self.step_s = step_s

    def now(self) -> float:
        return self._t  # the iteration's start, however long its work

    @contextlib.contextmanager
    def compute(self):
        try:
            yield
        finally:
            self._t += self.step_s


Clock = WallClock | VirtualClock


def make_clock(clock: str | Clock) -> Clock:
    """"wall", "virtual", or a clock object (e.g. StepClock(1e-3)), used as given."""
    if isinstance(clock, (WallClock, VirtualClock)):
        return clock
    if clock == "wall":
        return WallClock()
    if clock == "virtual":
        return VirtualClock()
    raise ValueError(f"clock must be 'wall', 'virtual' or a clock object, got {clock!r}")


# ---------------------------------------------------------------------------------------------
# Handles and statistics


class RequestHandle:
    """A submitted request. Iterate it to stream tokens as they are produced (this drives the
    engine, or waits for its loop when `Engine.run_forever` runs it in another thread), or
    call `result()` to wait for the whole Result."""

    def __init__(self, engine: Engine, request_id: int,
                 on_token: Callable[[int, int], None] | None = None,
                 on_finish: Callable[[Result], None] | None = None) -> None:
        self.engine = engine
        self.request_id = request_id
        self.tokens: list[int] = []  # produced so far
        self.on_token = on_token  # called as on_token(request_id, token) for each token
        self.on_finish = on_finish  # called as on_finish(result) when it finishes or is
        #                             aborted (a request refused at submit is done at once)
        self._result: Result | None = None

    @property
    def done(self) -> bool:
        return self._result is not None

    def result(self) -> Result:
        """Run the engine until this request has finished (or was refused)."""
        while not self.done:
            self.engine._advance()
        return self._result

    def __iter__(self) -> Iterator[int]:
        i = 0
        while True:
            while i < len(self.tokens):
                yield self.tokens[i]
                i += 1
            if self.done:
                return
            self.engine._advance()

    def abort(self) -> bool:
        """`Engine.abort` of this request."""
        return self.engine.abort(self.request_id)

    def _push(self, token: int) -> None:
        self.tokens.append(token)
        if self.on_token is not None:
            self.on_token(self.request_id, token)

    def _finish(self, result: Result) -> None:
        self._result = result
        if self.on_finish is not None:
            self.on_finish(result)

    def __repr__(self) -> str:
        state = self._result.finish_reason if self._result else "running"
        return f"RequestHandle(id={self.request_id}, {len(self.tokens)} tokens, {state})"


@dataclass
class EngineStats:
    """Counters since the engine (or its last `reset_stats`) started."""

    steps: int = 0  # iterations that did something
    decode_steps: int = 0
    prefills: int = 0
    prefill_calls: int = 0  # prefill steps run (each prefills one or more requests)
    moves: int = 0  # KV slot moves of the memory shuffle
    resizes: int = 0  # KV window (re)loads: bucket changes, joins, moves
    tokens: int = 0  # tokens produced
    aborted: int = 0  # requests aborted (Engine.abort) while waiting or running
    buckets_used: Counter = field(default_factory=Counter)  # decode bucket -> steps
    layout_switches: int = 0  # consecutive decode steps with different layouts
    runs: Counter = field(default_factory=Counter)  # (phase, Bucket) -> calls of its step
    seconds: Counter = field(default_factory=Counter)  # wall time per part of the iteration


# ---------------------------------------------------------------------------------------------
# The engine


def prefill_lengths_for(max_len: int, smallest: int = 8) -> tuple[int, ...]:
    """Padded prompt lengths: powers of two from `smallest`, capped by max_len.

    >>> prefill_lengths_for(64), prefill_lengths_for(320)
    ((8, 16, 32, 64), (8, 16, 32, 64, 128, 256, 320))
    """
    return doubling(smallest, max_len)


def engine_buckets(max_slots: int, kv_lengths: Sequence[int], prefill_rows: Sequence[int],
                   prefill_lengths: Sequence[int],
                   prefill_tokens: int | None = None) -> list[tuple[str, Bucket]]:
    """Every (phase, Bucket) an engine compiles: decode for every batch bucket x KV window
    length, prefill for every rows x padded length whose rows x length fits `prefill_tokens`
    (a single row always fits).

    >>> [f"{p} {b.batch}x{b.length}" for p, b in engine_buckets(2, (64,), (1, 2), (32, 64), 64)]
    ['decode 1x64', 'decode 2x64', 'prefill 1x32', 'prefill 2x32', 'prefill 1x64']
    """
    out = [("decode", Bucket(b, n)) for b in bucket_sizes(max_slots) for n in kv_lengths]
    for n in prefill_lengths:
        for r in prefill_rows:
            if r == 1 or prefill_tokens is None or r * n <= prefill_tokens:
                out.append(("prefill", Bucket(r, n)))
    return out


class Engine:
    """Serve a model with iteration-level scheduling (Flover temporal fusion) or a baseline.

    `model` is a Model, a TransformerConfig, a preset name, or a model served from the user's
    own functions (`models.from_functions`: its contract is checked here, its cache's axes
    found by tracing its decode step, and a breach refused with a `ModelContractError`);
    `params` default to `model.init_params(PRNGKey(0))` (a model from functions needs them).
    `max_len` (default: the model's) is the KV length of a slot: prompt + max_tokens must fit
    in it. `policy` is "fused", "static" or "dynamic"
    (`window_s` is dynamic batching's window); `shuffle=False` turns the memory shuffle off.
    Buckets (see the module docstring): `kv_lengths` (decode KV windows, default
    `kv_cache.kv_lengths_for(max_len)`), `prefill_rows` (default 1, 2, 4, 8, up to
    max_slots), `prefill_lengths` (default `prefill_lengths_for(max_len)`), `prefill_tokens`
    (most rows x length per prefill call, default 4096). `warmup` compiles every bucket at
    start-up (with a progress bar unless `progress=False`); otherwise each bucket compiles on
    first use. `unroll` serves a scan-layers model as a loop (see the module docstring).
    `weights_first` ("auto": on CPU) compiles the default steps after the `weights-first` pass
    (passes/weights_first.py): the weight matrices stored transposed, each the left operand
    of its matmul, which XLA:CPU multiplies by a few rows up to 1.4x faster; `engine.params`
    then holds them so (converted once). `weights="int8"` compiles the default steps after
    the `quantize-int8` pass instead (per-channel int8 weights, converted once; the paper's
    decode setting). `warm_sampler` compiles the full sampler (temperature, top-k, top-p)
    with every bucket at start-up; otherwise it compiles on the first sampled request per
    batch size (~0.7 s), which greedy serving never needs. See the module docstring for
    `compile_fn`, `planner_fn`, `cache_sharding` and `mesh`.
    """

    def __init__(self, model: Model | FunctionModel | TransformerConfig | str,
                 params: Any = None, *,
                 mesh: jax.sharding.Mesh | None = None, max_slots: int = 8,
                 max_len: int | None = None, policy: str = "fused", shuffle: bool = True,
                 window_s: float = 0.01, max_queue: int = 1024,
                 compile_fn: CompileFn | None = None, planner_fn: PlannerFn | None = None,
                 cache_sharding: ShardingFn | jax.sharding.Sharding | None = None,
                 kv_lengths: Sequence[int] | None = None,
                 prefill_rows: Sequence[int] | None = None,
                 prefill_lengths: Sequence[int] | None = None, prefill_tokens: int = 4096,
                 clock: str | Clock = "wall", warmup: bool = True, progress: bool = True,
                 tokenizer: Any = None, unroll: bool = True,
                 weights_first: bool | str = "auto", weights: str = "native",
                 warm_sampler: bool = False) -> None:
        from meshwright import validate

        max_len = validate.max_len(max_len, "max_len")  # None: the model's; 0 is refused
        max_slots = validate.positive_int(max_slots, "max_slots")
        model = _as_model(model)
        self.notes: list[str] = []  # what runs otherwise than given, and why
        if isinstance(model, Model):
            model, params, max_len = self._reference_model(model, params, max_len, unroll)
        else:  # served from the user's functions (models.from_functions)
            if params is None:
                raise ValueError(f"{model.name}: a model served from functions needs its "
                                 "params: Engine(model, params, ...)")
            max_len = max_len or model.max_len
            if max_len is None:
                raise ValueError(f"{model.name}: no max_len: pass Engine(..., max_len=N) or "
                                 "from_functions(..., max_len=N)")
            if model.max_len is not None and max_len > model.max_len:
                raise ValueError(f"max_len={max_len} exceeds {model.name}'s "
                                 f"max_len={model.max_len}")
            model.check(params)  # refuses a function that breaks the contract, by rule
        self.model, self.max_len, self.max_slots = model, max_len, max_slots
        self.config = model.config  # a TransformerConfig; None for a model from functions
        self.name, self.vocab_size = model.name, model.vocab_size
        self.mesh = mesh
        # text in, text out: a `tokenizers.Tokenizer` (models.load_tokenizer) or anything with
        # encode(str) -> ids (or an object with .ids) and decode(ids) -> str
        self.tokenizer = tokenizer
        if mesh is not None:
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            params = jax.device_put(params, replicated)
            if cache_sharding is None:
                cache_sharding = replicated
        self.params = params
        self.kv_lengths = _check_lengths("kv_lengths", kv_lengths or kv_lengths_for(max_len),
                                         max_len, need=max_len)
        self.prefill_lengths = _check_lengths(
            "prefill_lengths", prefill_lengths or prefill_lengths_for(max_len), max_len,
            need=max_len - 1)
        self.prefill_rows = tuple(sorted(set(prefill_rows or bucket_sizes(min(max_slots, 8)))))
        if self.prefill_rows[0] != 1 or self.prefill_rows[-1] > max_slots:
            raise ValueError(f"prefill_rows {self.prefill_rows} must start at 1 and not exceed "
                             f"max_slots={max_slots}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        self.prefill_tokens = prefill_tokens
        self.kv = KVCache.for_model(model, max_slots, max_len, params=params,
                                    sharding=cache_sharding)
        self.compile_fn = compile_fn or self.default_compile_fn
        if weights_first not in (True, False, "auto"):
            raise ValueError(f"weights_first must be True, False or 'auto', got "
                             f"{weights_first!r}")
        if weights not in ("native", "int8"):
            raise ValueError(f"weights must be 'native' or 'int8', got {weights!r}")
        if weights == "int8" and compile_fn is not None:
            raise ValueError("weights='int8' applies to the engine's own compile path; pass "
                             "weights='int8' to whatever builds compile_fn instead (mw.shard)")
        self.weights = weights
        # the weights-first pass on the default compile path (auto: on CPU, where it pays);
        # int8 weights are stored contracted-last by quantize-int8 itself
        self._weights_first = compile_fn is None and weights == "native" and (
            weights_first is True or (weights_first == "auto"
                                      and jax.default_backend() == "cpu"))
        self._original_weights = None  # the weights' shapes as the model takes them
        self._weight_transforms: dict = {}  # how they are stored instead (weights-first)
        self.planner_fn = planner_fn
        self.warm_sampler = warm_sampler
        self.clock = make_clock(clock)
        self.stats = EngineStats()
        self._steps: dict[tuple[str, Bucket], Callable] = {}
        self.layouts: dict[tuple[str, Bucket], str] = {}  # (phase, bucket) -> layout name
        self.layout_why: dict[tuple[str, Bucket], str] = {}  # and why (the step's `why`)
        self.layout_plan = None  # the EngineLayouts, when built by layouts.sharded_engine
        self.weight_copies: list[str] = []  # buckets whose steps take the weights split
        #                                     otherwise than placed (each keeps its own copy)
        self._weight_shardings = None  # how the weights were placed (from a step)
        self._window_shardings: dict[tuple[int, int], Any] = {}  # decode bucket -> its cache's
        self._zeros_fns: dict[Bucket, Callable] = {}  # prefill bucket -> its fresh zero cache
        self._prefill_shardings: dict[Bucket, Any] = {}  # prefill bucket -> its fresh cache's
        # the shape, dtype and placement of each prefill bucket's output cache and of each
        # decode window's, to warm the cache's writes on (shapes only: holding the arrays
        # themselves would keep every bucket's cache alive, gigabytes at 32 slots x 1024)
        self._prefill_outputs: list = []
        self._decode_outputs: dict = {}
        self._user_cache_sharding = cache_sharding
        self._last_layout: str | None = None
        self.last_decode_bucket: Bucket | None = None  # the bucket of the latest decode step
        self._handles: dict[int, RequestHandle] = {}
        self._done: list[Result] = []
        # Threads: submit, abort and handles may be used from any thread while one thread
        # runs the loop (run_forever). The lock guards the scheduler and the handles; the
        # device work of an iteration runs outside it (it reads only the slots, which change
        # in the loop's own thread).
        self._lock = threading.RLock()
        self._progress = threading.Condition(self._lock)  # notified on submit, abort, step
        self._abort_ids: list[int] = []  # aborted, applied at the start of the next step
        self._first_tokens: dict[int, float] = {}  # request id -> when its prefill handed it out
        self._loop_thread: int | None = None  # the thread in run_forever, if any
        self._collect_done = True  # keep finished Results for run_until_idle and serve
        self.set_policy(policy, shuffle=shuffle, window_s=window_s, max_queue=max_queue)
        if warmup:
            self.compile_all(progress=progress)

    def _reference_model(self, model: Model, params: dict | None, max_len: int | None,
                         unroll: bool) -> tuple[Model, dict, int]:
        """A reference model at the engine's max_len, with params, its scan unrolled."""
        cfg = model.config
        max_len = max_len or cfg.max_len
        if max_len > cfg.max_len:  # RoPE models run longer; learned positions need params
            if cfg.positions == "learned" and params is not None:
                raise ValueError(
                    f"max_len={max_len} exceeds {cfg.name}'s max_len={cfg.max_len}, and its "
                    "learned position embeddings only cover that many positions; pass "
                    "params for a config with a larger max_len, or a smaller max_len")
            model = build(cfg.replace(max_len=max_len))
            cfg = model.config
        if params is None:
            params = model.init_params(jax.random.PRNGKey(0))
        if unroll and cfg.scan_layers:
            model, params = unroll_layers(model, params)
            self.notes.append(f"layers served as a Python loop, not a scan ({cfg.n_layers} "
                              "layers): inside a scan XLA copies every layer's weights and "
                              "KV cache out of the stacked arrays at every step")
        return model, params, max_len

    # ---- configuration --------------------------------------------------------------------
    def set_policy(self, policy: str, *, shuffle: bool = True, window_s: float | None = None,
                   max_queue: int | None = None) -> None:
        """Switch scheduling policy (only when idle); compiled steps are kept."""
        old = getattr(self, "scheduler", None)
        if old is not None and old.has_work():
            raise RuntimeError("set_policy: the engine still has requests in flight")
        self.policy, self.shuffle = policy, shuffle
        self.scheduler = Scheduler(
            self.max_slots,
            max_queue if max_queue is not None else old.max_queue,
            policy, window_s if window_s is not None else old.window_s, shuffle=shuffle,
            max_len=self.max_len, vocab_size=self.vocab_size)

    def model_params(self) -> dict:
        """The weights as the model takes them (`engine.params` is how the compiled steps
        take them: stored transposed where the weights-first pass converted them). Not for
        int8 weights (their float values are gone)."""
        if self.weights == "int8":
            raise ValueError("an int8 engine keeps only the quantized weights")
        if not self._weight_transforms:
            return self.params
        flat, tree = jax.tree.flatten(self.params)
        for i, steps in self._weight_transforms.items():
            for step in reversed(steps):
                flat[i] = jnp.transpose(flat[i], np.argsort(step.order))
        return jax.tree.unflatten(tree, flat)

    def set_cache_sharding(self, sharding) -> None:
        """How the KV cache is placed when no compiled step says: None, a Sharding, or
        (capacity, length) -> Sharding (or a tree of them like the cache). Re-places it."""
        self._user_cache_sharding = sharding
        self.kv.set_sharding(self._kv_sharding)

    def reset_stats(self) -> None:
        self.stats = EngineStats()
        self._last_layout = None

    # ---- compilation ------------------------------------------------------------------------
    def buckets(self) -> list[tuple[str, Bucket]]:
        """Every (phase, bucket) the engine runs (`engine_buckets`)."""
        return engine_buckets(self.max_slots, self.kv_lengths, self.prefill_rows,
                              self.prefill_lengths, self.prefill_tokens)

    def default_compile_fn(self, phase: str, bucket: Bucket) -> Callable:
        """`jax.jit` of the model's function with the cache donated (one device, or replicated
        over `mesh`); on CPU (`weights_first`), of the function after the `weights-first`
        pass, which takes the weights stored transposed (converted once, on first use)."""
        fn = self.model.fn(phase)
        if not self._weights_first and self.weights != "int8":
            return jax.jit(fn, donate_argnums=(2,))
        from meshwright.ir import trace

        structs = self._original_weights or jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.params)
        g = trace(fn, *self._example_args(phase, bucket, structs))
        if self.weights == "int8":
            from meshwright.passes import PassManager, get_pass
            from meshwright.passes.quantize import quantize_params

            g = PassManager(["infer-axes", "find-blocks",
                             get_pass("quantize-int8", positions=0)]).run(g)
            report = g.meta["quantize-int8"]
            converted = [(w.index, w.reduce_axes, w.layout) for w in report.weights]

            def convert(params):
                return quantize_params(g, params)

            note = (f"int8 weights: {len(converted)} weight matrices quantized per output "
                    "channel (the quantize-int8 pass), int8 x int8 matmuls")
        else:
            from meshwright.passes.weights_first import convert_arguments, weights_first

            g = weights_first(g)
            converted = g.meta["load_transforms"]

            def convert(params):
                return convert_arguments(g, (params,))[0]

            note = (f"{len(g.meta['weights-first'])} weight matrices stored transposed, each "
                    "the left operand of its matmul (the weights-first pass: XLA:CPU's fast "
                    "orientation for a few rows)")
        if self._original_weights is None:  # the first bucket: convert the weights once
            self.params = convert(self.params)
            self._original_weights, self._weight_transforms = structs, converted
            self.notes.append(note)
        elif converted != self._weight_transforms:
            raise RuntimeError(f"{phase} {bucket.batch}x{bucket.length}: the pass converted "
                               "other weights than for the first bucket; build the engine with "
                               "weights_first=False and weights='native'")
        return jax.jit(g.as_function(), donate_argnums=(2,))

    def compile_all(self, progress: bool = True) -> None:
        """Compile every bucket ahead of time (and the small cache/sampling helpers)."""
        todo = self.buckets()
        bar = None
        if progress:
            from meshwright.progress import bar as progress_bar

            bar = progress_bar(todo, desc=f"compiling {self.name}", unit="bucket")
        t0 = time.perf_counter()
        for phase, bucket in bar if bar is not None else todo:
            if bar is not None:
                bar.set_postfix_str(f"{phase} {bucket.batch}x{bucket.length}")
            self._step_fn(phase, bucket)
        self.kv.warm_up([(b.batch, b.length) for p, b in self._steps if p == "decode"],
                        self._decode_outputs, self._prefill_outputs)
        self.stats.seconds["compile"] += time.perf_counter() - t0
        if bar is not None:
            bar.close()

    def _step_fn(self, phase: str, bucket: Bucket) -> Callable:
        key = (phase, bucket)
        fn = self._steps.get(key)
        if fn is None:
            fn = self.compile_fn(phase, bucket)
            shardings = getattr(fn, "in_shardings", None)
            if shardings is not None:
                self._adopt_shardings(phase, bucket, shardings)
            args = self._example_args(phase, bucket)
            if hasattr(fn, "lower"):  # jax.jit-like: compile ahead of time
                fn.lower(*args).compile()
            # One call on zeros placed as the step takes them: compiles any other callable,
            # fills jit's dispatch cache (a first call takes ~15 ms more than the next ones),
            # and gives the helpers real outputs to compile on.
            logits, cache = jax.block_until_ready(fn(*_zeros_like(args)))
            greedy(logits).block_until_ready()
            if self.warm_sampler:  # the full sampler too, on logits placed as the step's
                sample_tokens(logits, [_WARM] * bucket.batch, [0] * bucket.batch)
            if phase == "prefill":
                jax.block_until_ready(self._fresh_cache(bucket))
                self._prefill_outputs.append(_placed_shapes(cache))
            else:
                self._decode_outputs[(bucket.batch, bucket.length)] = _placed_shapes(cache)
            del logits, cache
            self._steps[key] = fn
            layout = self.planner_fn(phase, bucket) if self.planner_fn else None
            self.layouts[key] = layout or getattr(fn, "layout", None) or "replicated"
            self.layout_why[key] = getattr(fn, "why", "") or ""
        return fn

    def _adopt_shardings(self, phase: str, bucket: Bucket, shardings: tuple) -> None:
        """Place the weights (once) and the KV cache as a compiled step takes them."""
        weights, cache = shardings[0], shardings[2]
        if self._weight_shardings is None:
            tree = jax.tree_util.tree_structure(self.params)
            placed = [x if s is None else jax.device_put(x, s)  # None: the step converts it
                      for x, s in zip(tree.flatten_up_to(self.params),
                                      tree.flatten_up_to(weights))]
            self.params = jax.tree_util.tree_unflatten(tree, placed)
            self._weight_shardings = weights
        elif not _same_shardings(self.params, weights):
            self.weight_copies.append(f"{phase} {bucket.batch}x{bucket.length}")
        if phase == "decode":
            self._window_shardings[(bucket.batch, bucket.length)] = cache
            self.kv.set_sharding(self._kv_sharding)  # re-places the store
        else:
            self._prefill_shardings[bucket] = cache

    def _kv_sharding(self, capacity: int, length: int):
        """The KV cache's sharding at (capacity, length) slots x positions: the decode step's,
        once compiled; the store (max_slots, max_len) takes the largest decode bucket's.
        Before any, the `cache_sharding` given."""
        own = self._window_shardings.get((capacity, length))
        if own is not None:
            return own
        if (capacity, length) == (self.max_slots, self.max_len) and self._window_shardings:
            return self._window_shardings[max(self._window_shardings)]
        given = self._user_cache_sharding
        if callable(given) and not isinstance(given, jax.sharding.Sharding):
            return given(capacity, length)
        return given

    def _cache_structs(self, batch: int, length: int, sharding) -> Any:
        structs = self.kv.shapes(batch, length)
        if sharding is None:
            return structs
        if isinstance(sharding, jax.sharding.Sharding):
            sharding = jax.tree.map(lambda _: sharding, structs)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            structs, sharding)

    def _example_args(self, phase: str, bucket: Bucket, params: Any = None) -> tuple:
        params = self.params if params is None else params
        rows = jax.ShapeDtypeStruct((bucket.batch,), jnp.int32)
        if phase == "prefill":
            cache = self._cache_structs(bucket.batch, bucket.length,
                                        self._prefill_shardings.get(bucket))
            tokens = jax.ShapeDtypeStruct((bucket.batch, bucket.length), jnp.int32)
            return (params, tokens, cache, rows)
        cache = self._cache_structs(bucket.batch, bucket.length,
                                    self.kv.sharding_for(bucket.batch, bucket.length))
        return (params, rows, cache, rows)

    def _fresh_cache(self, bucket: Bucket):
        """A zero cache for a prefill bucket (one dispatch; the prefill donates it), placed as
        that prefill step takes it (`kv_cache.zeros_maker`: one compile per shapes and
        placement)."""
        fn = self._zeros_fns.get(bucket)
        if fn is None:  # (a bucket's placement is set once, when it compiles)
            sharding = self._prefill_shardings.get(bucket)
            structs = self._cache_structs(bucket.batch, bucket.length, sharding)
            fn = self._zeros_fns[bucket] = zeros_maker(
                structs, None if sharding is None else jax.tree.map(lambda s: s.sharding, structs))
        return fn()

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, request: Request, on_token: Callable[[int, int], None] | None = None, *,
               on_finish: Callable[[Result], None] | None = None,
               arrival_s: float | None = None) -> RequestHandle:
        """Queue a request; returns its handle at once. An invalid request (or one past the
        queue bound) comes back already finished with finish_reason "refused" and the reason
        in `handle.result().error`; it never disturbs the requests in flight. Thread-safe.

        `on_token(request_id, token)` and `on_finish(result)` are called in the thread that
        runs the engine, as tokens are produced and when the request ends (not for a
        request refused here): keep them short, e.g. hand over to another thread's queue."""
        with self._lock:
            now = self.clock.now() if arrival_s is None else arrival_s
            state = self.scheduler.submit(request, now)
            handle = RequestHandle(self, state.request_id, on_token, on_finish)
            if isinstance(state, Result):
                handle._result = state
                if self._collect_done:
                    self._done.append(state)
            else:
                self._handles[state.request_id] = handle
                self._progress.notify_all()  # wake an idle loop
        return handle

    def abort(self, request_id: int) -> bool:
        """Abort a waiting or running request. Thread-safe. It leaves at the start of the
        next iteration: a waiting request leaves the queue, a running one frees its KV slot
        for the next admission (the scheduler shrinks the bucket as when a request finishes).
        Its handle then finishes with finish_reason "aborted" and the tokens produced so
        far. False when the request is not in flight (unknown, finished, refused, or already
        being aborted)."""
        with self._lock:
            if request_id not in self._handles or request_id in self._abort_ids:
                return False
            self._abort_ids.append(request_id)
            self._progress.notify_all()
            return True

    def queue_depth(self) -> tuple[int, int]:
        """(waiting, running) requests, read under the engine's lock."""
        with self._lock:
            return len(self.scheduler.waiting), len(self.scheduler.running)

    def generate(self, prompts: Iterable[str | Sequence[int] | Request], max_tokens: int = 16,
                 sampling: SamplingParams | None = None,
                 stop_tokens: Sequence[int] = ()) -> list[Result]:
        """Run a list of prompts (text, token id lists, or Requests) to completion; results in
        order. Text needs a tokenizer (`Engine(..., tokenizer=models.load_tokenizer(DIR))`);
        with one, every Result also carries its generated `text`."""
        handles = [self.submit(p if isinstance(p, Request) else Request(
            prompt=tuple(self.encode(p) if isinstance(p, str) else p), max_tokens=max_tokens,
            sampling=sampling or SamplingParams(), stop_tokens=tuple(stop_tokens)))
            for p in prompts]
        results = [h.result() for h in handles]
        if self.tokenizer is not None:
            for r in results:
                r.text = self.decode(r.tokens)
        return results

    def encode(self, text: str) -> list[int]:
        """Token ids of a text prompt, with the engine's tokenizer."""
        if self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: Engine(..., tokenizer=...) "
                             "(meshwright.models.load_tokenizer(DIR) reads tokenizer.json); "
                             "or pass token ids")
        out = self.tokenizer.encode(text)
        return list(getattr(out, "ids", out))

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("decoding text needs a tokenizer: Engine(..., tokenizer=...)")
        return self.tokenizer.decode(list(ids))

    def run_until_idle(self) -> list[Result]:
        """Step until nothing waits or runs; the results delivered meanwhile (and refusals
        not collected before), in the order they finished."""
        while self.scheduler.has_work():
            self._advance()
        done, self._done = self._done, []
        return done

    # ---- the loop -----------------------------------------------------------------------------
    def run_forever(self, stop: threading.Event,
                    on_step: Callable[[float], None] | None = None,
                    idle_poll_s: float = 0.05,
                    after_iteration: Callable[[bool], None] | None = None,
                    idle_wait: Callable[[float], None] | None = None) -> None:
        """Run the loop in this thread until `stop` is set: step while there is work, sleep
        while there is none (a submit or abort wakes it; `stop` is seen within
        `idle_poll_s`). Meanwhile other threads submit, abort and wait on handles (a
        handle's `result()` or iteration waits for this loop instead of stepping). Results
        reach callers through their handles and callbacks only: nothing is kept for
        `run_until_idle`, so a long-running loop holds no finished request.
        `on_step(seconds)` is called after each iteration that ran something, then
        `after_iteration(waits)` after every iteration (the place to hand over, at once, what
        the callbacks of its requests collected; `waits`: the loop now waits for a dynamic
        batching window, so nothing should be held back). `idle_wait(seconds)`, if given, is
        how the loop waits when it has no work or waits for a batching window: called without
        the engine's lock, it may return early (the place to wait for work arriving by another
        way than a thread's `submit`, and to submit it from this thread).

            >>> stop = threading.Event()                                    # doctest: +SKIP
            >>> threading.Thread(target=engine.run_forever, args=(stop,)).start()
            >>> engine.submit(Request(prompt=(1, 2), max_tokens=4)).result().tokens
            >>> stop.set()
        """
        with self._lock:
            if self._loop_thread is not None:
                raise RuntimeError("the engine's loop already runs in another thread")
            self._loop_thread = threading.get_ident()
            self._collect_done = False
            self._done = []
        try:
            while not stop.is_set():
                with self._lock:
                    idle = not self.scheduler.has_work()
                    if idle and idle_wait is None:
                        self._progress.wait(idle_poll_s)
                        continue
                if idle:
                    idle_wait(idle_poll_s)
                    continue
                t0, steps = time.perf_counter(), self.stats.steps
                wait_until = self.step()
                if on_step is not None and self.stats.steps != steps:
                    on_step(time.perf_counter() - t0)
                if after_iteration is not None:
                    after_iteration(wait_until is not None)
                if wait_until is not None:  # dynamic batching's window: a submit may end it
                    wait_s = min(idle_poll_s, max(0.0, wait_until - self.clock.now()))
                    if idle_wait is not None:
                        idle_wait(wait_s)
                        continue
                    with self._lock:
                        self._progress.wait(wait_s)
        finally:
            with self._lock:
                self._loop_thread = None
                self._collect_done = True

    def _advance(self) -> None:
        """One step, or a wait when the scheduler has nothing to do yet (dynamic window).
        While another thread runs the loop (run_forever), wait for its next step instead."""
        if self._loop_thread is not None and self._loop_thread != threading.get_ident():
            with self._lock:
                self._progress.wait(0.05)
            return
        if not self.scheduler.has_work():
            raise RuntimeError("the engine is idle: nothing was submitted that could finish")
        wait_until = self.step()
        if wait_until is not None:
            self.clock.wait_until(wait_until)

    def step(self) -> float | None:
        """One iteration: apply aborts, schedule, shuffle, prefill, decode, deliver. Returns
        the time to wait until when the scheduler chose to wait (dynamic batching), else
        None."""
        with self.clock.compute():
            with self._lock:
                self._apply_aborts(self.clock.now())
                out = self.scheduler.schedule(self.clock.now())
                if out.idle:
                    self.scheduler.update(out, {}, self.clock.now())
                    return out.wait_until
            sampled = self._run(out)  # device work: reads only the slots, outside the lock
        self._finish_step(out, sampled, self.clock.now())
        return None

    def _apply_aborts(self, now: float) -> None:
        """Take the aborted requests out of the scheduler (under the lock); finish their
        handles with finish_reason "aborted"."""
        for request_id in self._abort_ids:
            result = self.scheduler.abort(request_id, now)
            handle = self._handles.pop(request_id, None)
            if result is None or handle is None:  # finished meanwhile: delivered already
                continue
            self.stats.aborted += 1
            handle._finish(result)
            if self._collect_done:
                self._done.append(result)
        self._abort_ids = []

    def _finish_step(self, out: SchedulerOutput, sampled: dict[int, int], now: float) -> None:
        """Hand the step's tokens to the scheduler, stream them, deliver finished results."""
        with self._lock:
            early, self._first_tokens = self._first_tokens, {}
            handed_out = {p.request_id for p in out.prefills}
            finished = self.scheduler.update(out, sampled, now, times=early)
            self.stats.steps += 1
            self.stats.tokens += len(sampled)
            for request_id, token in sampled.items():
                if request_id not in handed_out:  # a prefill's first token went out already
                    self._handles[request_id]._push(token)
            for result in finished:
                self._handles.pop(result.request_id)._finish(result)
                if self._collect_done:
                    self._done.append(result)
            self._progress.notify_all()

    def _run(self, out: SchedulerOutput) -> dict[int, int]:
        seconds = self.stats.seconds
        t0 = time.perf_counter()
        for src, dst in out.moves:
            self.kv.move(src, dst)
        self.stats.moves += len(out.moves)
        t1 = time.perf_counter()
        seconds["shuffle"] += t1 - t0
        sampled = self._prefill(out.prefills) if out.prefills else {}
        t2 = time.perf_counter()
        seconds["prefill"] += t2 - t1
        if out.decode_slots:
            sampled.update(self._decode(out))
            seconds["decode"] += time.perf_counter() - t2
        return sampled

    def prefill_groups(self, prefills: Sequence[Prefill]) -> list[tuple[Bucket, list[Prefill]]]:
        """How one iteration's admitted requests are prefilled: shortest prompts first, each
        call at the smallest (rows, padded length) bucket that holds it. The next prompt joins
        the call while a bucket holds it (rows buckets, `prefill_tokens`) and its padded
        length is at most twice the call's shortest prompt's: no prompt is padded to more
        than twice its bucket, and prompts of like length share a call.

            >>> [(b.batch, b.length, len(g)) for b, g in engine.prefill_groups(admitted)]
            [(4, 8, 3), (1, 32, 1)]              # prompts of 5, 6, 7 and 30 tokens
        """
        todo = sorted(prefills, key=lambda p: len(p.prompt))
        groups: list[tuple[Bucket, list[Prefill]]] = []
        while todo:
            group = [todo.pop(0)]
            bucket = self._prefill_bucket(1, len(group[0].prompt))
            shortest = bucket.length
            while todo:
                joined = self._prefill_bucket(len(group) + 1, len(todo[0].prompt))
                if joined is None or joined.length > 2 * shortest:
                    break
                group.append(todo.pop(0))
                bucket = joined
            groups.append((bucket, group))
        return groups

    def _prefill_bucket(self, rows: int, longest: int) -> Bucket | None:
        """The smallest compiled prefill bucket with at least `rows` rows of `longest`
        tokens (None: none that size)."""
        n = next(n for n in self.prefill_lengths if n >= longest)
        r = next((r for r in self.prefill_rows if r >= rows), None)
        if r is None or (r > 1 and r * n > self.prefill_tokens):
            return None
        return Bucket(r, n)

    def _prefill(self, prefills: Sequence[Prefill]) -> dict[int, int]:
        """Prefill the requests admitted this iteration, batched, and write their K/V into
        their slots; returns each one's first token.

        Padding is harmless: a prompt's last real token (T-1) attends only to positions
        <= T-1, and the padded positions' K/V (written at T..) are never read: the request's
        decode steps write position T, T+1, ... before attending to them, and attend only
        to positions <= their own. Padded rows are written nowhere.
        """
        sampled = {}
        for bucket, group in self.prefill_groups(prefills):
            tokens = np.zeros((bucket.batch, bucket.length), np.int32)
            last = np.zeros(bucket.batch, np.int32)
            for row, p in enumerate(group):
                tokens[row, :len(p.prompt)] = p.prompt
                last[row] = len(p.prompt) - 1
            fn = self._step_fn("prefill", bucket)
            logits, cache = fn(self.params, tokens, self._fresh_cache(bucket), last)  # (R, V)
            self.stats.runs[("prefill", bucket)] += 1
            self.stats.prefill_calls += 1
            self.kv.write([p.slot for p in group], cache)
            params = [self.scheduler.slots[p.slot].request.sampling for p in group]
            params += [None] * (bucket.batch - len(group))
            out = np.asarray(sample_tokens(logits, params, [0] * bucket.batch))
            first = {p.request_id: int(out[row]) for row, p in enumerate(group)}
            sampled.update(first)
            self._hand_out_first(first)
        self.stats.prefills += len(prefills)
        return sampled

    def _hand_out_first(self, first: dict[int, int]) -> None:
        """A prefill call's first tokens go to their handles as soon as the call ends, not
        at the end of the iteration (after the other calls and the decode step): under a
        burst the first prompts' TTFT is their own call's, not the whole admission's. The
        time is kept for the scheduler's record (not under a StepClock, where every token of
        an iteration is stamped at its end)."""
        now = None if isinstance(self.clock, StepClock) else self.clock.now()
        with self._lock:
            for request_id, token in first.items():
                handle = self._handles.get(request_id)  # none on a follower process
                if handle is None:
                    continue
                if now is not None:
                    self._first_tokens[request_id] = now
                handle._push(token)

    def kv_length_for(self, positions: Sequence[int]) -> int:
        """The decode KV window that holds every row's position: the smallest `kv_lengths`
        entry above the largest."""
        need = max(positions) + 1
        return next(n for n in self.kv_lengths if n >= need)

    def _decode(self, out: SchedulerOutput) -> dict[int, int]:
        bucket = Bucket(out.bucket, self.kv_length_for(out.positions))
        fn = self._step_fn("decode", bucket)
        layout = self.layouts[("decode", bucket)]
        if self._last_layout is not None and layout != self._last_layout:
            self.stats.layout_switches += 1
        self._last_layout = layout
        params, indices = [None] * out.bucket, [0] * out.bucket
        for slot in out.decode_slots:
            state = self.scheduler.slots[slot]
            params[slot], indices[slot] = state.request.sampling, len(state.tokens)
        events = self.kv.events
        window = self.kv.window(bucket.batch, bucket.length)
        self.stats.resizes += self.kv.events - events
        logits, cache = fn(self.params, np.asarray(out.tokens, np.int32), window,
                           np.asarray(out.positions, np.int32))
        self.kv.set_window(cache)
        tokens = sample_tokens(logits, params, indices)
        self.stats.decode_steps += 1
        self.last_decode_bucket = bucket
        self.stats.buckets_used[out.bucket] += 1
        self.stats.runs[("decode", bucket)] += 1
        return {rid: int(tokens[slot]) for slot, rid in zip(out.decode_slots, out.decode_ids)}

    # ---- replay a workload ------------------------------------------------------------------
    def serve(self, workload, clock: str | Clock = "virtual",
              progress: bool = False) -> ServeReport:
        """Replay `workload` (a `workload.Workload` or a list of (arrival_s, Request)):
        submit each request at its arrival time, step while there is work, wait (virtual
        clock: jump) when there is none. Returns the results and the summary metrics.
        `clock`: "virtual" (measured compute time, idle gaps skipped), "wall", or a clock
        object such as `StepClock(1e-3)` (deterministic)."""
        from meshwright.runtime.workload import summarize

        arrivals = sorted(getattr(workload, "arrivals", workload), key=lambda a: a[0])
        if self.scheduler.has_work():
            raise RuntimeError("serve() needs an idle engine")
        saved_clock, self.clock = self.clock, make_clock(clock)
        self.reset_stats()
        self._done = []
        bar = None
        if progress:
            from meshwright.progress import bar as progress_bar

            bar = progress_bar(total=len(arrivals), desc=f"serve {self.policy}", unit="req")
        try:
            i, n = 0, len(arrivals)
            while i < n or self.scheduler.has_work():
                now = self.clock.now()
                while i < n and arrivals[i][0] <= now:
                    self.submit(arrivals[i][1], arrival_s=arrivals[i][0])
                    i += 1
                if self.scheduler.has_work():
                    wait_until = self.step()
                    if wait_until is not None:
                        nxt = arrivals[i][0] if i < n else wait_until
                        self.clock.wait_until(min(wait_until, nxt))
                elif i < n:
                    self.clock.wait_until(arrivals[i][0])
                if bar is not None:
                    bar.n = len(self._done)
                    bar.refresh()
            elapsed = self.clock.now()
        finally:
            self.clock = saved_clock
            if bar is not None:
                bar.close()
        results, self._done = sorted(self._done, key=lambda r: r.request_id), []
        return ServeReport(results=results, metrics=summarize(
            results, policy=self.policy, elapsed_s=elapsed, stats=self.stats,
            layouts=self.layouts, shuffle=self.shuffle))


@dataclass
class ServeReport:
    """What `Engine.serve` returns."""

    results: list[Result]  # one per submitted request, in submission order
    metrics: dict  # see workload.summarize


_WARM = SamplingParams(temperature=1.0, top_k=1, top_p=0.5)  # compiles every sampling path


def _placed_shapes(tree):
    """Each array's shape, dtype and sharding (`KVCache.warm_up` makes zeros of them); no
    sharding for an array not committed to its device (a jitted function compiles once more
    for a committed argument where it saw an uncommitted one)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=a.sharding if a.committed else None), tree)


def _same_shardings(tree, shardings) -> bool:
    """Every array of `tree` is placed as `shardings` (a matching tree; None: converted and
    placed by the step itself, so not compared) says."""
    treedef = jax.tree_util.tree_structure(tree)
    return all(s is None or (getattr(x, "sharding", None) is not None
                             and x.sharding.is_equivalent_to(s, x.ndim))
               for x, s in zip(treedef.flatten_up_to(tree), treedef.flatten_up_to(shardings)))


def _zeros_like(args: tuple) -> tuple:
    """Real zero arrays (placed as the specs say) for ShapeDtypeStruct leaves."""
    def zeros(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        z = jnp.zeros(x.shape, x.dtype)
        return z if x.sharding is None else jax.device_put(z, x.sharding)

    return jax.tree.map(zeros, args)


def _check_lengths(name: str, lengths: Sequence[int], max_len: int,
                   need: int) -> tuple[int, ...]:
    """Sorted lengths in 1..max_len whose largest is at least `need`."""
    out = tuple(sorted({int(n) for n in lengths}))
    if not out or out[0] < 1 or out[-1] > max_len or out[-1] < need:
        raise ValueError(f"{name} {out} must lie in 1..max_len={max_len} and reach {need}")
    return out


def _as_model(model: Model | FunctionModel | TransformerConfig | str) -> Model | FunctionModel:
    if isinstance(model, (Model, FunctionModel)):
        return model
    if isinstance(model, str):
        model = get_config(model)
    if isinstance(model, TransformerConfig):
        return build(model)
    raise TypeError(f"model must be a Model, a model from functions (models.from_functions), "
                    f"a TransformerConfig or a preset name, got {type(model).__name__}")
