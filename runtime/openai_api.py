"""The OpenAI HTTP API as plain data: a request body parsed and checked into what the engine
runs, chat messages into a prompt, generated tokens into text (with stop strings), and the
JSON of the answers and of their server-sent-event chunks. No JAX and no web framework, so
every rule here is tested without a socket; `runtime/server.py` puts it on HTTP.

    >>> from meshwright.models.demo import ByteTokenizer
    >>> text = ModelText(ByteTokenizer())
    >>> limits = Limits(max_len=128, vocab_size=256, max_tokens=64)
    >>> spec = parse_completion({"model": "m", "prompt": "In the", "max_tokens": 4,
    ...                          "temperature": 0}, "m", limits, text)
    >>> spec.prompt, spec.max_tokens, spec.sampling.greedy
    ((73, 110, 32, 116, 104, 101), 4, True)
    >>> try:
    ...     parse_completion({"model": "m", "prompt": "x", "top_p": 2}, "m", limits, text)
    ... except ApiError as e:
    ...     print(e.status, e.body())
    400 {'error': {'message': 'top_p must be a number in (0, 1], got 2', 'type': 'invalid_request_error', 'param': 'top_p', 'code': None}}

What is refused rather than run otherwise than asked: a field this server does not know, and
the OpenAI options it does not implement when set to anything but their neutral value (`n` or
`best_of` above 1, `logprobs`, `echo`, `suffix`, penalties, `logit_bias`, tools, a
`response_format` other than text). Defaults follow OpenAI: `temperature` 1 and `top_p` 1,
`max_tokens` 16 for completions and all the room left (up to the server's bound) for chat;
an absent `seed` is drawn at random per request. `top_k` is an extension (0 or -1: no limit).
"""

from __future__ import annotations

import json
import math
import numbers
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshwright.runtime.request import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI


class ApiError(Exception):
    """A request the server answers with an error: HTTP `status` and OpenAI's error object."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message, status, type, param, code)

    def body(self) -> dict:
        """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What any request must fit in."""

    max_len: int  # KV length of a slot: prompt + max_tokens
    vocab_size: int  # token ids are in [0, vocab_size)
    max_tokens: int  # the most tokens one request may ask for (the server's bound)
    completion_max_tokens: int = 16  # a completion's max_tokens when it gives none (OpenAI)


@dataclass(frozen=True)
class GenerationSpec:
    """One checked request: what the engine runs and how the answer is shaped."""

    endpoint: str  # "completions" | "chat"
    prompt: tuple[int, ...]  # token ids
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]  # stop strings: the text ends before the first one generated
    stream: bool
    include_usage: bool  # stream: one more chunk with only `usage` (stream_options)


# ---------------------------------------------------------------------------------------------
# Text: tokenizer and chat template


PLAIN_TEMPLATE_DOC = ('each message as "<role>: <content>" on its own line, then "assistant:" '
                      "(the model continues from there)")


def plain_chat_prompt(messages: Sequence[dict]) -> str:
    """The chat template of a model without one: each message as "role: content" and a line
    break, then "assistant:" for the model to continue.

        >>> plain_chat_prompt([{"role": "system", "content": "Be brief."},
        ...                    {"role": "user", "content": "Hello"}])
        'system: Be brief.\\nuser: Hello\\nassistant:'
    """
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class ChatTemplate:
    """A checkpoint's Jinja chat template, rendered in a sandbox (jinja2's
    ImmutableSandboxedEnvironment: no attribute access to Python internals, no mutation of
    the arguments), never as code. The variables are Hugging Face's: `messages`,
    `add_generation_prompt` (True), `bos_token`, `eos_token`, and `raise_exception(msg)`,
    which a template calls to refuse a conversation (the request gets a 400)."""

    def __init__(self, source: str, bos_token: str | None = None,
                 eos_token: str | None = None) -> None:
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError("this checkpoint's chat template needs jinja2: pip install "
                              "'meshwright[hf]'") from None

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: time.strftime(fmt))
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"the checkpoint's chat template does not parse: {e}") from None
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""

    def render(self, messages: Sequence[dict]) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:  # includes the sandbox's SecurityError
            raise ApiError(f"the model's chat template refused these messages: {e}",
                           param="messages") from None


@dataclass
class ModelText:
    """How the served model's text becomes tokens and back, and messages a prompt.

    `tokenizer`: encode(str) -> ids (or an object with `.ids`, as `tokenizers` returns) and
    decode(ids) -> str; None for a model without one (a model from the user's functions, a
    checkpoint without tokenizer.json): it takes prompts as token ids only, refuses text
    prompts, chat and stop strings (400), and its answers carry the generated `token_ids`
    (their text is empty). Generated `eos_token_ids` end a request (finish reason "stop") and are
    not part of its text. `chat_template`: None for the plain template
    (`plain_chat_prompt`)."""

    tokenizer: Any
    eos_token_ids: tuple[int, ...] = ()
    chat_template: ChatTemplate | None = None
    note: str = ""  # how text is handled, for the server's start-up lines

    @property
    def token_ids_only(self) -> bool:
        """No tokenizer: token ids in, token ids out."""
        return self.tokenizer is None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. A chat prompt is encoded without the tokenizer's own special
        tokens: the template writes those it wants (as Hugging Face does)."""
        if self.tokenizer is None:
            raise ApiError(NO_TOKENIZER + "send the prompt as a list of token ids",
                           param="prompt")
        try:
            out = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except TypeError:  # a tokenizer without that option
            out = self.tokenizer.encode(text)
        return list(getattr(out, "ids", out))

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        if self.eos_token_ids:
            ids = [i for i in ids if i not in self.eos_token_ids]
        return self.tokenizer.decode(ids)

    def chat_prompt(self, messages: Sequence[dict]) -> str:
        if self.chat_template is None:
            return plain_chat_prompt(messages)
        return self.chat_template.render(messages)


class TextStream:
    """Text out of a growing list of generated tokens: the part that is safe to send now,
    and where a stop string ends it.

    Decoding is incremental (as vLLM's detokenizer): each push decodes only the tokens since
    the last settled point, with the tokens before them as context (a tokenizer may render a
    token differently at the start of a text), so a long answer costs O(its length), not
    O(length squared). Held back until the next tokens settle them: a trailing incomplete
    character (a byte of a multi-byte UTF-8 character decodes to U+FFFD until the rest
    arrives), and a tail that could be the start of a stop string. The pieces sent, joined,
    equal the text of all the tokens (up to a stop string), so streaming and not streaming
    answer the same.

        >>> s = TextStream(lambda ids: bytes(ids).decode(errors="replace"), stop=("\\n\\n",))
        >>> s.push(list(b"Amen.\\n")), s.push(list(b"\\nAnd")), s.stopped, s.text
        ('Amen.', '', True, 'Amen.')
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self.tokens: list[int] = []
        self._context = 0  # tokens[_context:_settled] were decoded already: context only
        self._settled = 0  # tokens before this are part of `_decoded`
        self._decoded = ""  # the settled text
        self._sent = 0  # characters of `_decoded` sent
        self.stopped = False  # a stop string was generated; `text` ends before it

    @property
    def text(self) -> str:
        """The text sent so far."""
        return self._decoded[:self._sent]

    def push(self, tokens: Sequence[int]) -> str:
        """Take new tokens; return the new text that may be sent (possibly "")."""
        if self.stopped:
            return ""
        self.tokens.extend(tokens)
        self._decode_new(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: the rest of the text, nothing held back."""
        if self.stopped:
            return ""
        self._decode_new(final=True)
        return self._release(final=True)

    def _decode_new(self, final: bool) -> None:
        if self._settled == len(self.tokens):
            return
        before = self._decode(self.tokens[self._context:self._settled])
        after = self._decode(self.tokens[self._context:])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return  # an incomplete character (or nothing new yet): wait for the next token
        self._decoded += after[len(before):]
        self._context, self._settled = self._settled, len(self.tokens)

    def _release(self, final: bool) -> str:
        text, start = self._decoded, self._sent
        if not self._stop:
            self._sent = len(text)
            return text[start:]
        # Nothing sent can hold a stop string's start (that tail was held back).
        found = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        upto = len(text)
        if found:
            upto, self.stopped = min(found), True
        elif not final:
            for k in range(min(self._longest - 1, upto - start), 0, -1):
                if any(s.startswith(text[upto - k:]) for s in self._stop):
                    upto -= k
                    break
        self._sent = max(start, upto)
        return text[start:self._sent]


# ---------------------------------------------------------------------------------------------
# Parsing and checking a request body


COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
                 "stream", "stream_options", "user", "presence_penalty", "frequency_penalty",
                 "logit_bias", "logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs",
                               "response_format", "tools", "tool_choice", "parallel_tool_calls",
                               "store", "metadata"}
CHAT_ROLES = ("system", "developer", "user", "assistant")

# An OpenAI option this server does not implement is accepted only at a value that asks for
# nothing: field -> (is it neutral?, what to say).
NOT_IMPLEMENTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v in (None, 1), "one choice per request (n=1)"),
    "best_of": (lambda v: v in (None, 1), "best_of above 1"),
    "logprobs": (lambda v: v in (None, False), "logprobs"),
    "top_logprobs": (lambda v: v in (None, 0), "top_logprobs"),
    "echo": (lambda v: v in (None, False), "echo"),
    "suffix": (lambda v: v in (None, ""), "suffix (insertion)"),
    "presence_penalty": (lambda v: v in (None, 0), "presence_penalty"),
    "frequency_penalty": (lambda v: v in (None, 0), "frequency_penalty"),
    "logit_bias": (lambda v: v in (None, {}), "logit_bias"),
    "tools": (lambda v: v in (None, []), "tools (function calling)"),
    "tool_choice": (lambda v: v in (None, "none"), "tool_choice"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "a response_format other than text"),
    "store": (lambda v: v in (None, False), "store"),
}


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object (400 otherwise)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_completion(body: dict, model_id: str, limits: Limits,
                     text: ModelText) -> GenerationSpec:
    """`POST /v1/completions`: prompt as text or token ids (or a list holding one of those)."""
    _check_fields(body, COMPLETION_FIELDS, model_id)
    prompt = _prompt(body.get("prompt", _MISSING), limits, text)
    max_tokens = _max_tokens(body, "max_tokens", len(prompt), limits,
                             default=limits.completion_max_tokens)
    spec = _spec("completions", body, prompt, max_tokens)
    if spec.stop and text.token_ids_only:
        raise ApiError(NO_TOKENIZER + "stop strings are text; leave stop out", param="stop")
    return spec


def parse_chat(body: dict, model_id: str, limits: Limits, text: ModelText) -> GenerationSpec:
    """`POST /v1/chat/completions`: messages rendered by the model's chat template (or the
    plain one) into a prompt."""
    _check_fields(body, CHAT_FIELDS, model_id)
    if text.token_ids_only:
        raise ApiError(NO_TOKENIZER + "chat messages are text; POST /v1/completions with the "
                       "prompt as a list of token ids", param="messages")
    messages = _messages(body.get("messages", _MISSING))
    ids = tuple(text.encode(text.chat_prompt(messages), add_special_tokens=False))
    _check_ids(ids, "messages", limits)
    name = "max_tokens"
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None and body["max_tokens"] != body[
                "max_completion_tokens"]:
            raise ApiError("max_tokens and max_completion_tokens differ; give one",
                           param="max_completion_tokens")
        name = "max_completion_tokens"
    max_tokens = _max_tokens(body, name, len(ids), limits,
                             default=min(limits.max_tokens, limits.max_len - len(ids)))
    return _spec("chat", body, ids, max_tokens)


_MISSING = object()
NO_TOKENIZER = "this model has no tokenizer, so it reads and writes token ids only: "


def _check_fields(body: dict, allowed: set[str], model_id: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(f"unknown field {unknown[0]!r}; this server takes: "
                       f"{', '.join(sorted(allowed))}", param=unknown[0])
    for name, (neutral, what) in NOT_IMPLEMENTED.items():
        if name in body and not _safe_call(neutral, body[name]):
            raise ApiError(f"{what} is not supported by this server; leave {name} out",
                           param=name)
    model = body.get("model", _MISSING)
    if model is _MISSING:
        raise ApiError("the request needs a model: this server serves "
                       f"{model_id!r} (GET /v1/models)", param="model")
    if model != model_id:
        raise ApiError(f"the model {model!r} does not exist here; this server serves "
                       f"{model_id!r}", status=404, param="model", code="model_not_found")


def _safe_call(fn: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(fn(value))
    except TypeError:  # an unhashable or odd value: not neutral
        return False


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _prompt(value: Any, limits: Limits, text: ModelText) -> tuple[int, ...]:
    if value is _MISSING or value is None:
        raise ApiError("the request needs a prompt (text or a list of token ids)",
                       param="prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        ids = tuple(text.encode(value))
    elif isinstance(value, list) and all(_is_int(t) for t in value):
        ids = tuple(int(t) for t in value)
    elif isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise ApiError(f"one prompt per request, got {len(value)}: send them as separate "
                       "requests (the server batches them)", param="prompt")
    else:
        raise ApiError("prompt must be a string or a list of integer token ids", param="prompt")
    _check_ids(ids, "prompt", limits)
    return ids


def _check_ids(ids: tuple[int, ...], param: str, limits: Limits) -> None:
    if not ids:
        raise ApiError("the prompt is empty: it needs at least one token", param=param)
    out = [t for t in ids if not 0 <= t < limits.vocab_size]
    if out:
        raise ApiError(f"token id {out[0]} is outside the vocabulary [0, "
                       f"{limits.vocab_size}) ({len(out)} such ids)", param=param)
    if len(ids) >= limits.max_len:
        raise ApiError(f"the prompt is {len(ids)} tokens; this server's max_len is "
                       f"{limits.max_len} for prompt + generated tokens, so a prompt may have "
                       f"at most {limits.max_len - 1}", param=param)


def _max_tokens(body: dict, name: str, prompt_len: int, limits: Limits, default: int) -> int:
    value = body.get(name)
    if value is None:
        return max(1, min(default, limits.max_len - prompt_len))
    if not _is_int(value) or value < 1:
        raise ApiError(f"{name} must be an integer >= 1, got {value!r}", param=name)
    if value > limits.max_tokens:
        raise ApiError(f"{name}={value} is above this server's bound of "
                       f"{limits.max_tokens}", param=name)
    room = limits.max_len - prompt_len
    if value > room:
        raise ApiError(f"the prompt ({prompt_len} tokens) + {name} ({value}) is "
                       f"{prompt_len + value}, above max_len={limits.max_len}; ask for "
                       f"{room} tokens or fewer", param=name)
    return int(value)


def _spec(endpoint: str, body: dict, prompt: tuple[int, ...], max_tokens: int) -> GenerationSpec:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(f"stream must be true or false, got {stream!r}", param="stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError("stream_options is only allowed with stream: true",
                           param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not \
                isinstance(options.get("include_usage", False), bool):
            raise ApiError('stream_options must be {"include_usage": true|false}',
                           param="stream_options")
        include_usage = options.get("include_usage", False)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(f"user must be a string, got {type(user).__name__}", param="user")
    return GenerationSpec(endpoint=endpoint, prompt=prompt, max_tokens=max_tokens,
                          sampling=_sampling(body), stop=_stop(body.get("stop")),
                          stream=stream, include_usage=include_usage)


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise ApiError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}",
                       param="temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(f"top_p must be a number in (0, 1], got {body['top_p']}", param="top_p")
    top_k = body.get("top_k")
    if top_k is None or top_k == -1:
        top_k = 0
    if not _is_int(top_k) or top_k < 0:
        raise ApiError(f"top_k must be an integer >= 0 (0 or -1: no limit), got {top_k!r}",
                       param="top_k")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**32)  # as OpenAI: unseeded requests differ
    elif not _is_int(seed) or not 0 <= seed < 2**32:
        raise ApiError(f"seed must be an integer in [0, 2**32), got {seed!r}", param="seed")
    return SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                          seed=int(seed))


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise ApiError(f"{name} must be a finite number, got {value!r}", param=name)
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError("stop must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}",
                       param="stop")
    return tuple(stops)


def _messages(value: Any) -> list[dict]:
    if value is _MISSING or value is None:
        raise ApiError("the request needs messages: a list of {role, content}",
                       param="messages")
    if not isinstance(value, list) or not value:
        raise ApiError("messages must be a non-empty list of {role, content}",
                       param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(f"{where} must be an object with role and content", param=where)
        unknown = sorted(set(m) - {"role", "content", "name"})
        if unknown:
            raise ApiError(f"{where} has a field this server does not take: {unknown[0]!r}",
                           param=f"{where}.{unknown[0]}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise ApiError(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got "
                           f"{role!r}", param=f"{where}.role")
        message = {"role": role, "content": _content(m.get("content", _MISSING), where, role)}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise ApiError(f"{where}.name must be a string", param=f"{where}.name")
            message["name"] = m["name"]
        out.append(message)
    return out


def _content(value: Any, where: str, role: str) -> str:
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for j, p in enumerate(value):
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(f"{where}.content[{j}]: only text parts "
                               '({"type": "text", "text": ...}) are supported',
                               param=f"{where}.content")
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(f"{where}.content must be a string or a list of text parts",
                   param=f"{where}.content")


# ---------------------------------------------------------------------------------------------
# Answers


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Answer:
    """The identity of one answer: every chunk of a stream repeats it."""

    endpoint: str  # "completions" | "chat"
    model: str
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))
    _delta_parts: tuple[bytes, bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl" if self.endpoint == "chat" else "cmpl"
            self.id = f"{prefix}-{secrets.token_hex(12)}"

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") \
            if self.endpoint == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, use: dict,
             token_ids: list[int] | None = None) -> dict:
        """The whole answer (not streamed); `token_ids` (a model without a tokenizer) go in
        its choice."""
        if self.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = list(token_ids)
        return {**self._head(False), "choices": [choice], "usage": use}

    def chunk(self, text: str | None, finish_reason: str | None = None,
              use: dict | None = None, role: bool = False) -> dict:
        """One streamed piece: new text, or (with `finish_reason`) the last one, which also
        carries `usage`. Chat's first chunk names the role (`role=True`)."""
        if self.endpoint == "chat":
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish_reason}
        out = {**self._head(True), "choices": [choice]}
        if use is not None:
            out["usage"] = use
        return out

    def delta_event(self, text: str, token_ids: list[int] | None = None) -> bytes:
        """`sse(self.chunk(text))`, from bytes rendered once per answer: a stream sends one
        of these per batch of new text, so its cost is the server's per-token cost. With
        `token_ids` (a model without a tokenizer) the choice carries them."""
        if token_ids is not None:
            out = self.chunk(text)
            out["choices"][0]["token_ids"] = list(token_ids)
            return sse(out)
        if self._delta_parts is None:
            head = json.dumps(self._head(True), separators=(",", ":"))[:-1]  # without its }
            field = '"delta":{"content":' if self.endpoint == "chat" else '"text":'
            close = "}" if self.endpoint == "chat" else ""
            self._delta_parts = (f'data: {head},"choices":[{{"index":0,{field}'.encode(),
                                 f'{close},"logprobs":null,"finish_reason":null}}]}}\n\n'
                                 .encode())
        return self._delta_parts[0] + json.dumps(text).encode() + self._delta_parts[1]

    def usage_chunk(self, use: dict) -> dict:
        """stream_options.include_usage: a last chunk with no choices, only usage."""
        return {**self._head(True), "choices": [], "usage": use}


def sse(obj: dict) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
