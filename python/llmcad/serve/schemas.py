"""Request bodies of /v1/completions and /v1/chat/completions, checked as OpenAI checks them: strict
types, unknown fields refused ("Unrecognized request argument"), known fields that would change the
output in a way llmcad cannot honour refused, the others ignored. See the README for the list."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from llmcad.serve.errors import APIError, bad_request

MAX_STOPS = 4  # as OpenAI
MAX_SEED = (1 << 63) - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None  # ignored: there is nothing to obfuscate on loopback


class _Common(_Strict):
    """Fields both endpoints take."""

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # extension (vLLM, llama.cpp): None, 0 or -1 = off
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None


class CompletionRequest(_Common):
    prompt: Union[str, List[int], List[str]]
    best_of: Optional[int] = None
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    suffix: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # non-text parts are refused by type below
    type: str
    text: Optional[str] = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[ContentPart]]
    name: Optional[str] = None  # ignored


class ChatCompletionRequest(_Common):
    messages: List[Message]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[List[Any]] = None
    function_call: Optional[Any] = None
    response_format: Optional[Dict[str, Any]] = None
    modalities: Optional[List[str]] = None
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    web_search_options: Optional[Any] = None
    # ignored: they do not change the generated text
    parallel_tool_calls: Optional[bool] = None
    metadata: Optional[Dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None
    prompt_cache_options: Optional[Any] = None
    safety_identifier: Optional[str] = None
    moderation: Optional[Any] = None


@dataclass
class Params:
    """What the engine is asked for; ``max_tokens`` None = as much as the context allows (chat) or the
    endpoint's default."""

    max_tokens: Optional[int]
    do_sample: bool
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    def engine_kwargs(self) -> dict:
        return dict(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    seed=self.seed, stop=self.stop or None)


def parse(model_class, body: bytes):
    """The request object, or APIError 400 naming the first problem."""
    if not body.strip():
        raise bad_request("We could not parse the JSON body of your request: the body is empty")
    try:
        return model_class.model_validate_json(body)
    except ValidationError as exc:
        raise _describe(exc.errors()[0]) from None


def _describe(error: dict) -> APIError:
    loc = [str(p) for p in error["loc"] if isinstance(p, int) or not _is_type_tag(p)]
    name = ".".join(loc) or None
    kind = error["type"]
    if kind == "json_invalid":
        return bad_request(f"We could not parse the JSON body of your request ({error['msg']})")
    if kind == "model_type" and not loc:
        return bad_request("The request body must be a JSON object")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {name}", param=name)
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{name}'", param=name)
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return bad_request(f"Invalid type or value for '{name}': {error['msg']} (got {shown})", param=name)


def _is_type_tag(part) -> bool:
    """Union members in pydantic locations ('str', 'list[int]', 'function-after[...]') are not fields."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none"))


def params(req: _Common, max_tokens) -> Params:
    """The sampling parameters of ``req`` checked against what the engine accepts."""
    _check_range(req, max_tokens)
    greedy = req.temperature is not None and req.temperature == 0
    top_k = req.top_k if req.top_k not in (None, 0, -1) else None
    top_p = req.top_p if req.top_p not in (None, 1, 1.0) else None
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return Params(max_tokens=max_tokens, do_sample=not greedy,
                  temperature=1.0 if req.temperature in (None, 0) else float(req.temperature),
                  top_k=None if greedy else top_k, top_p=None if greedy else top_p, seed=req.seed, stop=stops,
                  stream=bool(req.stream),
                  include_usage=bool(req.stream_options and req.stream_options.include_usage))


def _check_range(req: _Common, max_tokens) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens={max_tokens}: expected an integer >= 1", "max_tokens")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise bad_request(f"temperature={req.temperature}: expected a number in [0, 2]", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise bad_request(f"top_p={req.top_p}: expected a number in (0, 1]", "top_p")
    if req.top_k is not None and req.top_k < -1:
        raise bad_request(f"top_k={req.top_k}: expected an integer >= 1 (0 or -1: off)", "top_k")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise bad_request(f"seed={req.seed}: expected an integer in [0, 2**63)", "seed")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS or not all(stops):
        raise bad_request(f"stop: expected at most {MAX_STOPS} non-empty strings", "stop")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options are only allowed when stream is true", "stream_options")


def refuse_unsupported(req: _Common) -> None:
    """APIError 400 for a field whose value llmcad cannot honour (the output would differ from what it asks)."""
    checks = [("n", req.n not in (None, 1), "only n=1 is supported (one completion per request)"),
              ("presence_penalty", req.presence_penalty not in (None, 0), "penalties are not supported"),
              ("frequency_penalty", req.frequency_penalty not in (None, 0), "penalties are not supported"),
              ("logit_bias", bool(req.logit_bias), "logit_bias is not supported")]
    if isinstance(req, CompletionRequest):
        checks += [("best_of", req.best_of not in (None, 1), "only best_of=1 is supported"),
                   ("echo", bool(req.echo), "echo is not supported"),
                   ("logprobs", req.logprobs is not None, "logprobs are not supported"),
                   ("suffix", bool(req.suffix), "suffix (insertion) is not supported")]
    else:
        fmt = (req.response_format or {}).get("type", "text")
        checks += [("logprobs", bool(req.logprobs) or req.top_logprobs is not None, "logprobs are not supported"),
                   ("tools", bool(req.tools) or bool(req.functions), "tools and function calling are not supported"),
                   ("tool_choice", req.tool_choice not in (None, "none", "auto") or req.function_call is not None,
                    "tools and function calling are not supported"),
                   ("response_format", fmt != "text", f"response_format {fmt!r} is not supported (only 'text')"),
                   ("modalities", any(m != "text" for m in req.modalities or []), "only text output is supported"),
                   ("audio", req.audio is not None, "audio output is not supported"),
                   ("prediction", req.prediction is not None, "predicted outputs are not supported"),
                   ("reasoning_effort", req.reasoning_effort is not None, "this model is not a reasoning model"),
                   ("verbosity", req.verbosity is not None, "verbosity is not supported"),
                   ("web_search_options", req.web_search_options is not None, "web search is not supported")]
    for name, refused, why in checks:
        if refused:
            raise bad_request(f"Unsupported parameter '{name}': {why} by llmcad serve", param=name,
                              code="unsupported_parameter")


def chat_max_tokens(req: ChatCompletionRequest):
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise bad_request("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def chat_messages(req: ChatCompletionRequest) -> list:
    """[{"role", "content": str}] for the chat template; text parts joined, other parts refused."""
    if not req.messages:
        raise bad_request("messages: expected at least one message", "messages")
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            content = m.content
        else:
            bad = [p.type for p in m.content if p.type != "text" or p.text is None]
            if bad:
                raise bad_request(f"messages.{i}.content: only text parts are supported (got {bad[0]!r})",
                                  f"messages.{i}.content")
            content = "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out
