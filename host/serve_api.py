"""The OpenAI completions API as pure functions: request checking, response bodies, server-sent events.

No web framework here: host/serve.py is the thin HTTP layer over these, so each rule (a field's type
and range, the context limit, the error object) is testable with a dict.

The request fields and their defaults follow OpenAI's legacy completions endpoint
(https://platform.openai.com/docs/api-reference/completions), plus `top_k` as vLLM and llama.cpp take
it. Fields OpenAI has that this server cannot honour (several choices, logprobs, penalties, echo) are
accepted at their no-op values only, and refused otherwise: silently ignoring them would answer a
different question than the one asked.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from gpt_fpga.host.generate import Sampling

DEFAULT_QUEUE = 8  # requests waiting behind the running one before 503
DEFAULT_MAX_BODY = 64 * 1024  # bytes: a prompt of a few thousand tokens, with room to spare
DEFAULT_MAX_TOKENS = 16  # OpenAI's default
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: sampling, not greedy (send temperature 0 for greedy)
MAX_STOPS = 4  # OpenAI allows up to 4 stop sequences
MAX_SEED = 2 ** 63 - 1  # numpy's generator takes any non-negative integer; keep it to an int64


class ApiError(Exception):
    """An error answered as OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_field(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


@dataclass(frozen=True)
class ModelFacts:
    """What request checking needs to know about the served model."""

    model_id: str
    vocab_size: int
    n_ctx: int
    encode: Callable[[str], list[int]] | None  # None: the image has no tokenizer (token id prompts only)


@dataclass(frozen=True)
class CompletionRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


# ---- request parsing ----------------------------------------------------------------------------
def parse_json_object(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int_field(body: dict, name: str, default, low: int, high: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise bad_field(name, f"'{name}' must be an integer, got {json.dumps(v)}")
    if v < low or (high is not None and v > high):
        span = f"between {low} and {high}" if high is not None else f">= {low}"
        raise bad_field(name, f"'{name}' must be {span}, got {v}")
    return v


def _number_field(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise bad_field(name, f"'{name}' must be a number, got {json.dumps(v)}")
    if not ((low < v) if low_open else (low <= v)) or v > high:
        raise bad_field(name, f"'{name}' must be in {'(' if low_open else '['}{low:g}, {high:g}], got {v:g}")
    return float(v)


# Fields accepted only at the value that changes nothing (absent and null are always fine).
NO_OP_FIELDS = {
    "n": (lambda v: _is_int(v) and v == 1, "one completion per request"),
    "best_of": (lambda v: _is_int(v) and v == 1, "one completion per request"),
    "echo": (lambda v: v is False, "the prompt is not repeated"),
    "logprobs": (lambda v: False, "log-probabilities are not returned"),
    "suffix": (lambda v: v == "", "no insertion (a base model continues text)"),
    "presence_penalty": (lambda v: _is_number(v) and v == 0, "no penalties"),
    "frequency_penalty": (lambda v: _is_number(v) and v == 0, "no penalties"),
    "logit_bias": (lambda v: v == {}, "no logit bias"),
}
KNOWN_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                "stream_options", "user"} | set(NO_OP_FIELDS)


def check_fields(body: dict):
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field '{unknown[0]}' (this server takes: {', '.join(sorted(KNOWN_FIELDS))})",
                       param=unknown[0], code="unknown_field")
    for name, (is_no_op, why_not) in NO_OP_FIELDS.items():
        v = body.get(name)
        if v is not None and not is_no_op(v):
            raise bad_field(name, f"'{name}' {json.dumps(v)} is not supported: {why_not}")


def check_model(body: dict, facts: ModelFacts):
    model = body.get("model")
    if model is not None and model != facts.model_id:
        raise ApiError(404, f"model '{model}' is not served here; this server runs '{facts.model_id}' "
                            f"(GET /v1/models)", param="model", code="model_not_found")


def prompt_ids(body: dict, facts: ModelFacts) -> list[int]:
    """The prompt as token ids: a string (tokenized) or a list of token ids within the vocabulary."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        if facts.encode is None:
            raise bad_field("prompt", "this model has no tokenizer: give the prompt as a list of token ids")
        ids = facts.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = prompt
        bad = [t for t in ids if not 0 <= t < facts.vocab_size]
        if bad:
            raise bad_field("prompt", f"token id {bad[0]} is out of range: the vocabulary has {facts.vocab_size} "
                                      f"ids (0..{facts.vocab_size - 1})")
    elif prompt is None:
        raise ApiError(400, "'prompt' is required: a string, or a list of token ids", param="prompt",
                       code="missing_field")
    else:
        raise bad_field("prompt", "'prompt' must be a string or a non-empty list of token ids (one prompt per "
                                  "request)")
    if not ids:
        raise bad_field("prompt", "the prompt is empty: give at least one token")
    return list(ids)


def stop_list(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_field("stop", "'stop' must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOPS:
        raise bad_field("stop", f"'stop' has {len(stops)} sequences; at most {MAX_STOPS}")
    return stops


def stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_field("stream", f"'stream' must be true or false, got {json.dumps(stream)}")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise bad_field("stream_options", "'stream_options' applies only with \"stream\": true")
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise bad_field("stream_options", "'stream_options' takes {\"include_usage\": true|false} only")
    return True, options.get("include_usage", False)


def sampling_of(body: dict, vocab_size: int) -> Sampling:
    temperature = _number_field(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0)
    top_p = _number_field(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _int_field(body, "top_k", None, 1, vocab_size)
    seed = _int_field(body, "seed", None, 0, MAX_SEED)
    return Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def parse_completion_request(body: dict, facts: ModelFacts) -> CompletionRequest:
    """Check every field of a /v1/completions request; the first problem raises ApiError naming it."""
    check_fields(body)
    check_model(body, facts)
    max_tokens = _int_field(body, "max_tokens", DEFAULT_MAX_TOKENS, 1)
    sampling = sampling_of(body, facts.vocab_size)
    stop = stop_list(body)
    stream, include_usage = stream_flags(body)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_field("user", "'user' must be a string")
    ids = prompt_ids(body, facts)
    if len(ids) + max_tokens > facts.n_ctx:
        raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {len(ids) + max_tokens} "
                            f"exceeds the model's context of {facts.n_ctx} tokens", param="max_tokens",
                       code="context_length_exceeded")
    return CompletionRequest(ids, max_tokens, sampling, stop, stream, include_usage)


# ---- responses -----------------------------------------------------------------------------------
def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def completion_body(cid: str, model_id: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, created: int | None = None) -> dict:
    return {"id": cid, "object": "text_completion", "created": created or int(time.time()), "model": model_id,
            "choices": [choice(text, finish_reason)], "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(cid: str, model_id: str, created: int, choices: list[dict], extra: dict | None = None) -> dict:
    """One streamed chunk: a text delta (choices), or with choices [] the last one carrying usage."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model_id, "choices": choices,
            **(extra or {})}


def sse_event(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (a JSON string has no raw newline)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse_event("[DONE]")


def models_body(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "gpt-fpga"}]}
