"""The serving scheduler: a device-free state machine (pure Python, no JAX).

It decides, once per iteration, which requests to prefill into which KV slots, which slots
decode, on how many rows (the bucket), and which KV rows to move; the engine carries the
decisions out on the devices and reports the sampled tokens back with `update`.

    >>> from meshwright.runtime.request import Request
    >>> s = Scheduler(max_slots=4, max_queue=8, policy="fused", max_len=64, vocab_size=256)
    >>> seq = s.submit(Request(prompt=(5, 6, 7), max_tokens=2), now=0.0)
    >>> out = s.schedule(now=0.0)
    >>> [(p.request_id, p.slot) for p in out.prefills], out.decode_slots
    ([(0, 0)], [])
    >>> _ = s.update(out, {0: 42}, now=0.1)          # the prefill's first token
    >>> out = s.schedule(now=0.1)
    >>> out.bucket, out.decode_slots, out.tokens, out.positions
    (1, [0], [42], [3])
    >>> [r.tokens for r in s.update(out, {0: 9}, now=0.2)]   # max_tokens reached: delivered
    [[42, 9]]

Policies (one scheduler, so the baselines run in the same engine):

- "fused": Flover's temporal fusion. Requests join the running batch at the next iteration and
  leave as soon as they finish; the live rows are kept in the smallest bucket by the memory
  shuffle (`plan_moves`). With `shuffle=False` nothing moves and the bucket is the highest
  occupied slot + 1, rounded up to a bucket.
- "static": when nothing runs, take up to max_slots waiting requests as one batch and run it
  until every member has finished; no request joins a running batch. The bucket stays the
  batch's size (finished rows idle in it, as in FasterTransformer's static batching); a
  finished member's result is still delivered at once.
- "dynamic": like static, but a batch starts only when max_slots requests wait or the oldest
  has waited `window_s` (Triton/FasterTransformer dynamic batching).

`abort(request_id, now)` takes a waiting or running request out between iterations (a client
that went away): its slot counts as free at the next `schedule`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshwright.runtime.request import Request, Result, validate_request

POLICIES = ("fused", "static", "dynamic")
QUEUE_FULL = "queue full"  # how a refusal for a full queue begins (an HTTP server answers 429)


# ---------------------------------------------------------------------------------------------
# Buckets and the memory shuffle


def doubling(start: int, limit: int) -> tuple[int, ...]:
    """start, 2 start, 4 start, ... below `limit`, then `limit`: the sizes every kind of bucket
    is compiled for (rows, KV window lengths, prompt lengths).

    >>> doubling(1, 8), doubling(8, 20), doubling(64, 64)
    ((1, 2, 4, 8), (8, 16, 20), (64,))
    """
    sizes, n = [], start
    while n < limit:
        sizes.append(n)
        n *= 2
    return (*sizes, limit)


def bucket_sizes(max_slots: int) -> tuple[int, ...]:
    """Batch sizes steps are compiled for: powers of two below max_slots, then max_slots.

    >>> bucket_sizes(8), bucket_sizes(6)
    ((1, 2, 4, 8), (1, 2, 4, 6))
    """
    if max_slots < 1:
        raise ValueError(f"max_slots must be >= 1, got {max_slots}")
    return doubling(1, max_slots)


def bucket_for(rows: int, max_slots: int) -> int:
    """The smallest bucket with at least `rows` rows (0 for 0 rows).

    >>> bucket_for(5, 8), bucket_for(5, 6), bucket_for(0, 8)
    (8, 6, 0)
    """
    if rows > max_slots:
        raise ValueError(f"{rows} rows do not fit in max_slots={max_slots}")
    return next((b for b in bucket_sizes(max_slots) if b >= rows), 0) if rows else 0


def plan_moves(occupied: Iterable[int], window: int,
               offsets: Iterable[int] = (0,)) -> tuple[int, list[tuple[int, int]]]:
    """Flover's memory shuffle: the fewest moves that bring every occupied slot into one window.

    Among the candidate windows [o, o + window) for o in `offsets`, take the one that already
    holds the most occupied slots (ties: the smallest offset), and move each occupied slot
    outside it into the window's free slots (sources and holes both in increasing order).
    Returns (offset, [(src, dst), ...]).

    It is minimal: whatever the final placement inside a window W, every occupied slot
    outside W must move at least once, so no plan does better than
    len(occupied) - max_W |occupied ∩ W|, which is what this one does (tested against brute
    force). The engine anchors the window at slot 0 (its compiled buckets are prefixes of
    the cache); the offsets argument is Flover's general sliding window.

    >>> plan_moves({1, 4, 5, 6}, window=4)                     # anchored at slot 0
    (0, [(4, 0), (5, 2), (6, 3)])
    >>> plan_moves({1, 4, 5, 6}, window=4, offsets=range(5))   # Flover's sliding window
    (3, [(1, 3)])
    """
    live = sorted(set(occupied))
    if len(live) > window:
        raise ValueError(f"{len(live)} occupied slots do not fit in a window of {window}")
    best_offset, best_inside = None, -1
    for o in offsets:
        inside = sum(o <= s < o + window for s in live)
        if inside > best_inside:
            best_offset, best_inside = o, inside
    if best_offset is None:
        raise ValueError("plan_moves needs at least one candidate offset")
    lo, hi = best_offset, best_offset + window
    outside = [s for s in live if not lo <= s < hi]
    holes = [s for s in range(lo, hi) if s not in set(live)]
    return best_offset, list(zip(outside, holes))


# ---------------------------------------------------------------------------------------------
# State and output


@dataclass
class SequenceState:
    """The scheduler's record of one request while it waits or runs."""

    request_id: int
    request: Request
    arrival_s: float
    status: str = "waiting"  # waiting -> running -> finished
    slot: int | None = None  # KV slot while running
    tokens: list[int] = field(default_factory=list)  # generated so far
    token_times_s: list[float] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def position(self) -> int:
        """The KV position the next decode step writes: that of the last generated token."""
        return self.prompt_len + len(self.tokens) - 1


@dataclass(frozen=True)
class Prefill:
    """Prefill one admitted request's prompt into a KV slot."""

    request_id: int
    slot: int  # the KV slot the prompt's K/V go to (after this step's moves)
    prompt: tuple[int, ...]


@dataclass
class SchedulerOutput:
    """Everything the engine does in one iteration, in this order:
    1. grow the cache to `bucket` rows if it is smaller; 2. apply `moves` in order;
    3. shrink the cache to `bucket` rows; 4. run `prefills`; 5. if `decode_slots` is not
    empty, run one decode step on rows 0..bucket-1 with `tokens`/`positions`; 6. report the
    sampled tokens with `Scheduler.update`."""

    step: int  # iteration number, from 0
    bucket: int  # rows of the decode step = KV slots kept on device; 0: nothing is live
    moves: list[tuple[int, int]]  # (src, dst) KV slot copies, applied in order (the shuffle)
    prefills: list[Prefill]  # requests admitted this iteration; they first decode next iteration
    decode_slots: list[int]  # rows whose sampled token is kept (running, not admitted now)
    decode_ids: list[int]  # the request id of each decode slot, same order
    tokens: list[int]  # (bucket,) input token of every row; 0 on idle rows
    positions: list[int]  # (bucket,) KV position every row writes; idle rows get one no live
    #                       request will read before overwriting it
    finished: list[int]  # request ids that finished in the previous update (already delivered)
    refused: list[tuple[int, str]]  # (request id, reason) refused since the previous schedule
    wait_until: float | None = None  # dynamic batching: nothing to do before this time
    aborted: list[int] = field(default_factory=list)  # request ids aborted since the previous
    #                                                   schedule (their slots are free now)

    @property
    def idle(self) -> bool:
        """No prefill and no decode this iteration."""
        return not self.prefills and not self.decode_slots and not self.moves


# ---------------------------------------------------------------------------------------------
# The scheduler


class Scheduler:
    """Admission, slot placement and batching for one engine. See the module docstring.

    `max_queue` bounds the waiting requests: one more is refused ("queue full"), never
    dropped silently. `max_len` and `vocab_size` are the limits requests are validated
    against (None: not checked).
    """

    def __init__(self, max_slots: int, max_queue: int = 1024, policy: str = "fused",
                 window_s: float = 0.0, *, shuffle: bool = True, max_len: int | None = None,
                 vocab_size: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.max_slots = max_slots
        self.buckets = bucket_sizes(max_slots)
        self.max_queue = max_queue
        self.policy = policy
        self.window_s = window_s
        self.shuffle = shuffle
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.waiting: deque[SequenceState] = deque()
        self.slots: list[SequenceState | None] = [None] * max_slots
        self._batch_bucket = 0  # static/dynamic: bucket of the running batch; 0: none runs
        self._next_id = 0
        self._step = 0
        self._pending: SchedulerOutput | None = None  # scheduled, waiting for update()
        self._refused: list[tuple[int, str]] = []
        self._finished: list[int] = []
        self._aborted: list[int] = []

    # ---- queries ------------------------------------------------------------------------
    @property
    def running(self) -> list[SequenceState]:
        return [s for s in self.slots if s is not None]

    def get(self, request_id: int) -> SequenceState | None:
        """The state of a waiting or running request (None once it has left)."""
        for s in self.slots:
            if s is not None and s.request_id == request_id:
                return s
        return next((s for s in self.waiting if s.request_id == request_id), None)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    # ---- submit -------------------------------------------------------------------------
    def submit(self, request: Request, now: float) -> SequenceState | Result:
        """Queue a request. Returns its state, or at once a Result with finish_reason
        "refused" and the reason when it is invalid or the queue is full."""
        request_id = self._next_id
        self._next_id += 1
        reason = validate_request(request, max_len=self.max_len, vocab_size=self.vocab_size)
        if reason is None and len(self.waiting) >= self.max_queue:
            reason = (f"{QUEUE_FULL}: {len(self.waiting)} requests already wait "
                      f"(max_queue={self.max_queue}); retry later")
        if reason is not None:
            self._refused.append((request_id, reason))
            prompt = getattr(request, "prompt", ())
            try:
                prompt = tuple(prompt)
            except TypeError:
                prompt = ()
            return Result(request_id=request_id, prompt=prompt, tokens=[],
                          finish_reason="refused", error=reason, arrival_s=now, finish_s=now,
                          name=getattr(request, "name", None))
        state = SequenceState(request_id=request_id, request=request, arrival_s=now)
        self.waiting.append(state)
        return state

    # ---- schedule -----------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        """Decide one iteration.

        Algorithm:
        1. Admit. fused: waiting requests, first come first served, while a slot is free.
           static: when no batch runs, up to max_slots waiting requests form the next batch.
           dynamic: as static, once max_slots wait or the oldest has waited window_s
           (otherwise report wait_until).
        2. Bucket. fused + shuffle: the smallest bucket P that holds every running and
           admitted request. fused without shuffle: the bucket holding the highest occupied
           slot. static/dynamic: the batch's bucket, fixed until its last member finishes.
        3. Shuffle (fused + shuffle only): running requests in slots >= P move to the free
           slots < P, fewest moves (`plan_moves` with the window anchored at slot 0).
        4. Place: admitted requests take the lowest free slots; they are prefilled now and
           decode from the next iteration on.
        5. Decode: every running request that was not admitted now feeds its last token at
           its own position; other rows of the bucket idle at a harmless position.
        """
        if self._pending is not None:
            raise RuntimeError("schedule() called twice without update(): report the "
                               f"results of step {self._pending.step} first")
        running = [s for s in self.slots if s is not None]
        wait_until = None

        # 1. admit
        admitted: list[SequenceState] = []
        if self.policy == "fused":
            while self.waiting and len(running) + len(admitted) < self.max_slots:
                admitted.append(self.waiting.popleft())
        elif not running and self.waiting:
            oldest_wait = now - self.waiting[0].arrival_s
            if (self.policy == "static" or len(self.waiting) >= self.max_slots
                    or oldest_wait >= self.window_s):
                while self.waiting and len(admitted) < self.max_slots:
                    admitted.append(self.waiting.popleft())
                self._batch_bucket = bucket_for(len(admitted), self.max_slots)
            else:
                wait_until = self.waiting[0].arrival_s + self.window_s

        # 2-3. bucket and shuffle
        moves: list[tuple[int, int]] = []
        if self.policy == "fused" and self.shuffle:
            bucket = bucket_for(len(running) + len(admitted), self.max_slots)
            _, moves = plan_moves([s.slot for s in running], bucket) if bucket else (0, [])
            for src, dst in moves:
                self.slots[dst], self.slots[src] = self.slots[src], None
                self.slots[dst].slot = dst
        # 4. place admitted requests in the lowest free slots
        free = [i for i, s in enumerate(self.slots) if s is None]
        for state, slot in zip(admitted, free):
            state.status, state.slot = "running", slot
            self.slots[slot] = state
        if self.policy == "fused" and not self.shuffle:
            occupied = [i for i, s in enumerate(self.slots) if s is not None]
            bucket = bucket_for(occupied[-1] + 1, self.max_slots) if occupied else 0
        elif self.policy != "fused":
            if not any(self.slots):
                self._batch_bucket = 0
            bucket = self._batch_bucket

        # 5. decode rows
        new_ids = {s.request_id for s in admitted}
        tokens, positions = [0] * bucket, [0] * bucket
        decode_slots, decode_ids = [], []
        for slot in range(bucket):
            state = self.slots[slot]
            if state is None:
                continue  # idle row: writes position 0 of a free slot
            if state.request_id in new_ids:
                # idle this step; writes at the position its first decode overwrites
                positions[slot] = state.prompt_len
                continue
            tokens[slot], positions[slot] = state.tokens[-1], state.position
            decode_slots.append(slot)
            decode_ids.append(state.request_id)

        out = SchedulerOutput(
            step=self._step, bucket=bucket, moves=moves,
            prefills=[Prefill(s.request_id, s.slot, tuple(s.request.prompt)) for s in admitted],
            decode_slots=decode_slots, decode_ids=decode_ids, tokens=tokens,
            positions=positions, finished=self._finished, refused=self._refused,
            wait_until=wait_until, aborted=self._aborted)
        self._finished, self._refused, self._aborted = [], [], []
        self._step += 1
        self._pending = out
        return out

    # ---- abort --------------------------------------------------------------------------
    def abort(self, request_id: int, now: float) -> Result | None:
        """Remove a waiting or running request between iterations; its Result (finish reason
        "aborted", the tokens generated so far), or None when it is not here (never was, or
        has already finished or been refused).

        1. Waiting: it leaves the queue; nothing else changes.
        2. Running: its slot is freed. The next schedule() sees the slot free: fused admits
           into it or shrinks the bucket (moving others in, as when a request finishes);
           static/dynamic keep the batch's bucket until its last member leaves.
        3. The id is reported in the next SchedulerOutput's `aborted`.
        """
        if self._pending is not None:
            raise RuntimeError("abort() between schedule() and update(): report the results "
                               f"of step {self._pending.step} first")
        # 1. waiting
        state = next((s for s in self.waiting if s.request_id == request_id), None)
        if state is not None:
            self.waiting.remove(state)
        else:
            # 2. running
            state = next((s for s in self.slots
                          if s is not None and s.request_id == request_id), None)
            if state is None:
                return None
            self.slots[state.slot] = None
        # 3. report
        self._aborted.append(request_id)
        req = state.request
        return Result(request_id=request_id, prompt=tuple(req.prompt), tokens=state.tokens,
                      finish_reason="aborted", error=None, arrival_s=state.arrival_s,
                      finish_s=now, token_times_s=state.token_times_s, name=req.name)

    # ---- update -------------------------------------------------------------------------
    def update(self, output: SchedulerOutput, sampled_tokens: Mapping[int, int],
               now: float, times: Mapping[int, float] | None = None) -> list[Result]:
        """Record the token sampled for every prefill and decode row of `output` (keyed by
        request id) at time `now` (or at `times[request_id]`, when the engine handed that
        token out earlier in the iteration: a prefill call's first tokens); return the
        requests that finished, which leave at once."""
        if output is not self._pending:
            raise RuntimeError("update() must get the output of the latest schedule()")
        expected = [p.request_id for p in output.prefills] + output.decode_ids
        missing = [i for i in expected if i not in sampled_tokens]
        extra = sorted(set(sampled_tokens) - set(expected))
        if missing or extra:
            raise ValueError(f"step {output.step}: sampled tokens missing for requests "
                             f"{missing}, unexpected for {extra}")
        self._pending = None
        done = []
        for request_id in expected:
            state = self.slots[self._slot_of(output, request_id)]
            token = int(sampled_tokens[request_id])
            state.tokens.append(token)
            state.token_times_s.append(times.get(request_id, now) if times else now)
            req = state.request
            reason = ("stop" if token in req.stop_tokens
                      else "length" if len(state.tokens) >= req.max_tokens else None)
            if reason:
                self.slots[state.slot] = None
                self._finished.append(request_id)
                done.append(Result(
                    request_id=request_id, prompt=tuple(req.prompt), tokens=state.tokens,
                    finish_reason=reason, error=None, arrival_s=state.arrival_s, finish_s=now,
                    token_times_s=state.token_times_s, name=req.name))
        return done

    def _slot_of(self, output: SchedulerOutput, request_id: int) -> int:
        for p in output.prefills:
            if p.request_id == request_id:
                return p.slot
        return output.decode_slots[output.decode_ids.index(request_id)]
