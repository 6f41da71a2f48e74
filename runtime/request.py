"""Requests, sampling settings and results of the serving runtime. Plain data, no JAX.

    >>> from meshwright.runtime.request import Request, SamplingParams, validate_request
    >>> r = Request(prompt=(1, 2, 3), max_tokens=4, sampling=SamplingParams(temperature=0.8,
    ...             top_p=0.9, seed=7), stop_tokens=(0,))
    >>> validate_request(r, max_len=64, vocab_size=256) is None
    True
    >>> validate_request(Request(prompt=(), max_tokens=4), max_len=64, vocab_size=256)
    'empty prompt: a request needs at least one prompt token'
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "refused", "aborted")


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token. The default is greedy.

    Sampling is deterministic: token i of a request uses the random key
    fold_in(PRNGKey(seed), i), so the same request gives the same tokens alone or in any batch.
    """

    temperature: float = 0.0  # 0: greedy (argmax); > 0: softmax(logits / temperature)
    top_k: int = 0  # keep the k most likely tokens; 0: no limit
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p, (0, 1]
    seed: int = 0  # per-request random seed, 0 <= seed < 2**32

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


@dataclass(frozen=True)
class Request:
    """One generation request: prompt token ids in, up to `max_tokens` token ids out.

    The request ends at the first token in `stop_tokens` (that token is included in the
    output, finish reason "stop") or after `max_tokens` tokens (finish reason "length").
    """

    prompt: Sequence[int]  # token ids, 1 <= len(prompt); prompt + max_tokens <= max_len
    max_tokens: int = 16  # tokens to generate at most, >= 1
    sampling: SamplingParams = GREEDY
    stop_tokens: Sequence[int] = ()  # generation stops after emitting any of these
    name: str | None = None  # caller's label, carried into the Result


@dataclass
class Result:
    """What became of one request. Times are seconds on the engine's clock."""

    request_id: int  # assigned by the scheduler in submission order
    prompt: tuple[int, ...]
    tokens: list[int]  # generated ids (the stop token included when finish_reason == "stop")
    finish_reason: str  # "stop" | "length" | "refused" | "aborted" (the tokens so far)
    error: str | None  # why the request was refused; None otherwise
    arrival_s: float  # when the request was submitted
    finish_s: float  # when its last token was produced (refused: when it was refused)
    token_times_s: list[float] = field(default_factory=list)  # when each token was produced
    name: str | None = None  # Request.name
    text: str | None = None  # the generated tokens decoded, when the engine has a tokenizer

    @property
    def ok(self) -> bool:
        """Ran to its end: neither refused nor aborted."""
        return self.finish_reason in ("stop", "length")

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: arrival to the first generated token."""
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def latency_s(self) -> float:
        """Arrival to the last token (or to the refusal)."""
        return self.finish_s - self.arrival_s

    @property
    def per_token_s(self) -> float | None:
        """Mean time between consecutive generated tokens (None with fewer than 2 tokens)."""
        times = self.token_times_s
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def validate_request(request: Request, *, max_len: int | None,
                     vocab_size: int | None) -> str | None:
    """None when `request` can run; otherwise a sentence saying what is wrong and what to do.

    Checked: an empty prompt, non-integer or out-of-vocabulary ids, max_tokens < 1, a prompt
    (or prompt + max_tokens) longer than max_len, temperature < 0, top_k < 0, top_p outside
    (0, 1], a seed outside [0, 2**32), stop tokens outside the vocabulary.
    """
    if not isinstance(request, Request):
        return f"expected a Request, got {type(request).__name__}"
    try:
        prompt = list(request.prompt)
    except TypeError:
        return f"prompt must be a sequence of token ids, got {type(request.prompt).__name__}"
    if not prompt:
        return "empty prompt: a request needs at least one prompt token"
    bad = [t for t in prompt if not _is_int(t)]
    if bad:
        return f"prompt ids must be integers, got {bad[0]!r}"
    if vocab_size is not None:
        out = [t for t in prompt if not 0 <= t < vocab_size]
        if out:
            return (f"prompt id {out[0]} is outside the vocabulary [0, {vocab_size}) "
                    f"({len(out)} such ids)")
    if not _is_int(request.max_tokens) or request.max_tokens < 1:
        return f"max_tokens must be an integer >= 1, got {request.max_tokens!r}"
    if max_len is not None:
        if len(prompt) > max_len:
            return f"prompt of {len(prompt)} tokens is longer than max_len={max_len}"
        if len(prompt) == max_len:
            return (f"prompt of {len(prompt)} tokens fills max_len={max_len} and leaves no "
                    f"room for output: shorten it to at most {max_len - 1} tokens")
        if len(prompt) + request.max_tokens > max_len:
            return (f"prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) = "
                    f"{len(prompt) + request.max_tokens} exceeds max_len={max_len}; lower "
                    f"max_tokens to {max_len - len(prompt)} or less")
    s = request.sampling
    if not isinstance(s, SamplingParams):
        return f"sampling must be a SamplingParams, got {type(s).__name__}"
    if not isinstance(s.temperature, numbers.Real) or not math.isfinite(s.temperature) \
            or s.temperature < 0:
        return f"temperature must be a finite number >= 0 (0 = greedy), got {s.temperature!r}"
    if not isinstance(s.top_p, numbers.Real) or not 0 < s.top_p <= 1:
        return f"top_p must be in (0, 1], got {s.top_p!r}"
    if not _is_int(s.top_k) or s.top_k < 0:
        return f"top_k must be an integer >= 0 (0 = no limit), got {s.top_k!r}"
    if not _is_int(s.seed) or not 0 <= s.seed < 2**32:
        return f"seed must be an integer in [0, 2**32), got {s.seed!r}"
    try:
        stops = list(request.stop_tokens)
    except TypeError:
        return f"stop_tokens must be a sequence of token ids, got {request.stop_tokens!r}"
    for t in stops:
        if not _is_int(t) or (vocab_size is not None and not 0 <= t < vocab_size):
            return f"stop token {t!r} is not an id in the vocabulary [0, {vocab_size})"
    return None
