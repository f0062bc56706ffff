"""OpenAI request validation: a JSON body becomes prompt ids + one SamplingParams per choice, or a RequestError
that names the field at fault and how to fix it (the server turns it into a 4xx with an OpenAI-style body).

Plain functions over dicts: the API surface is a dozen fields, too few to justify a schema library. Unknown
fields are ignored, as OpenAI-compatible servers usually do, so stock clients that send extras still work; but
the fields that change what an answer means and that this server cannot honour (tools, tool_choice other than
"none", response_format other than text) get a 400, never a silently different answer. Extensions beyond
OpenAI's fields (as vLLM has them): top_k, min_tokens, and ignore_eos (exact output lengths, for benchmarks).

Log-probabilities are the model's own: log_softmax of the softcapped logits, before penalties, logit_bias,
temperature and top-k/top-p (vLLM's default "raw" mode). /v1/completions takes a batch of prompts (strings or
token-id lists; token ids are used as given, a string gets <|bos|> in front), and with `echo` returns each
prompt's text and, with `logprobs`, its tokens' logprobs (the server's <|bos|> is not echoed); max_tokens 0
with echo scores the prompt without generating (what lm-evaluation-harness's loglikelihood tasks send).

Whatever a client sends ends as a RequestError, never as another exception: bodies that are not UTF-8, nest
deeper than the parser recurses or hold NaN; values of any type and size (messages quote them through reprlib,
so a huge or deep value costs nothing to report); lone surrogates (JSON's "\ud800" escape), which no encoder or
tokenizer accepts. A prompt whose length alone shows it cannot fit the context is refused before tokenization,
whose work grows with the text (see `_fit_chars`).

Tool calls travel as text: the model's <|python_start|> ... <|python_end|> and <|output_start|> ...
<|output_end|> tokens decode to those marker strings, the web UI styles them, and when a client sends the
conversation back, `assistant_parts` turns the markers into the tokenizer's python / python_output parts so
the model sees the same tokens it produced.
"""
import json
import reprlib
from dataclasses import dataclass

from fastchat_core.engine import SamplingParams
from fastchat_core.tokenizer import assistant_parts

MAX_STOP = 4    # as OpenAI: up to 4 stop strings
MAX_N = 16      # choices per request
MAX_BODY_BYTES = 4 << 20   # default request body limit (--max-body-bytes): a long chat is tens of KiB
MAX_LOGPROBS = 20   # top alternatives per token, as OpenAI's top_logprobs
MAX_PROMPTS = 256   # prompts in one /v1/completions batch
MAX_LOGIT_BIAS = 300   # entries of logit_bias, as OpenAI


class RequestError(Exception):
    """A request the server refuses; `body()` is OpenAI's error object."""

    def __init__(self, message, param=None, code=None, status=400, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    prompts: list[list[int]]        # token ids: one prompt (chat), or a batch (completions)
    params: list[SamplingParams]    # one per choice: n for each prompt in turn (choice i answers prompts[i // n])
    stream: bool
    include_usage: bool             # stream_options.include_usage: a last chunk with token counts
    model: str                      # the name the answer reports: the one asked for, else the server's first
    n: int = 1
    echo: list[int] | None = None   # completions' echo: per prompt, its first token to echo (1 after the
                                    # server's <|bos|>, 0 for token ids as sent); None without echo


def parse_json(raw: bytes) -> dict:
    try:   # decoded strictly here: json.loads(bytes) would guess UTF-16/32 and let encoded surrogates through
        body = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError is a ValueError
        why = "it nests arrays or objects deeper than this server parses" if isinstance(e, RecursionError) else e
        raise RequestError(f"the request body is not valid JSON ({why}): send a JSON object, UTF-8 encoded, "
                           "with Content-Type: application/json", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_kind(body)}", code="invalid_json")
    return body


def _not_json(name):
    raise ValueError(f"{name} is not a JSON number")


def chat_request(body: dict, tokenizer, context: int, token_chars: int, models: list[str]) -> GenerationRequest:
    """POST /v1/chat/completions. `context`: the most tokens (prompt + output) one sequence may hold;
    `token_chars`: the most characters one token stands for (the longest token's bytes); `models`: the names
    this server answers to."""
    model = _model(body, models)
    _unsupported(body)
    if "messages" not in body:
        raise RequestError("'messages' is required: a list of {\"role\", \"content\"} objects", "messages")
    messages = _messages(body["messages"])
    _fit_chars(sum(map(_chars, messages)), context, token_chars, "messages")
    try:
        prompt_ids = tokenizer.render_for_completion(messages)
    except ValueError as e:   # roles out of order, a conversation that ends on the assistant, ...
        raise RequestError(str(e), "messages") from None
    if _bool(body.get("logprobs"), "logprobs"):
        logprobs = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        logprobs = None
    return _generation(body, [prompt_ids], context, "messages", model, logprobs)


def completion_request(body: dict, tokenizer, context: int, token_chars: int, models: list[str]) -> GenerationRequest:
    """POST /v1/completions: raw text continuation (no chat template) of one prompt or a batch: strings, which
    get <|bos|> in front, or token-id lists, taken as they are."""
    model = _model(body, models)
    _unsupported(body)
    prompts = _prompts(body.get("prompt"), tokenizer.vocab_size)
    for text in prompts:
        if isinstance(text, str):
            _fit_chars(len(text), context, token_chars, "prompt")
    ids = [tokenizer.encode(p, prepend=tokenizer.bos_id) if isinstance(p, str) else p for p in prompts]
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = _bool(body.get("echo"), "echo")
    req = _generation(body, ids, context, "prompt", model, logprobs, echo=echo)
    if echo:   # the prompt as the client sent it: not a <|bos|> the server put in front
        req.echo = [int(isinstance(p, str)) for p in prompts]
    return req


def _model(body, models: list[str]) -> str:
    """The model name the request asks for (absent: the server's first); an unknown one is a 404."""
    if body.get("model") is None:
        return models[0]
    model = _string(body["model"], "model")
    if model not in models:
        raise RequestError(f"the model {reprlib.repr(model)} does not exist: this server serves "
                           f"{', '.join(map(repr, models))} (GET /v1/models lists them)", "model",
                           code="model_not_found", status=404)
    return model


def _unsupported(body):
    """Refuse what this server would otherwise ignore, changing what the answer means."""
    tools = body.get("tools") or body.get("functions")
    if tools:
        raise RequestError("tools / function calling are not supported by this server: send the request "
                           "without 'tools' (describe the tools in a message instead)", "tools")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise RequestError(f"'{name}' is not supported by this server (it has no tools): leave it out",
                               name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError(f"'response_format' {_kind(fmt)} is not supported: this server has no structured "
                           "output (JSON mode or schemas); leave it out or send {\"type\": \"text\"}",
                           "response_format")


def _prompts(value, vocab: int) -> list:
    """/v1/completions' prompt: a string, a token-id list, or a non-empty list of either (a batch)."""
    what = "a string, a list of token ids, or a list of those (a batch)"
    single = isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value))
    if single:
        value = [value]
    if not isinstance(value, list) or not value:
        raise RequestError(f"'prompt' must be {what}, got {_kind(value)}", "prompt")
    if len(value) > MAX_PROMPTS:
        raise RequestError(f"'prompt' holds {len(value)} prompts; send at most {MAX_PROMPTS} per request", "prompt")
    for i, p in enumerate(value):
        param = "prompt" if single else f"prompt[{i}]"
        if isinstance(p, str):
            _unicode(p, param)
        elif not (isinstance(p, list) and p and all(type(t) is int and 0 <= t < vocab for t in p)):
            raise RequestError(f"{param} must be a string or a non-empty list of token ids in [0, {vocab}), "
                               f"got {_kind(p)}", param)
    return value


# ---- fields -------------------------------------------------------------------------------------------

def _kind(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {reprlib.repr(value)}"[:80]


def _string(value, param, what="a string") -> str:
    if not isinstance(value, str):
        raise RequestError(f"'{param}' must be {what}, got {_kind(value)}", param)
    return _unicode(value, param)


def _unicode(text: str, param) -> str:
    if text.isascii():   # O(1) in CPython, and no surrogate is ASCII
        return text
    try:   # a lone surrogate can be neither UTF-8 encoded nor tokenized
        text.encode()
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} holds a lone surrogate {text[e.start]!r} at index {e.start}, which is not "
                           "text: send UTF-8, and pair each \\ud800-\\udbff escape with a \\udc00-\\udfff one",
                           param) from None
    return text


def _fit_chars(chars: int, context: int, token_chars: int, param):
    """Refuse, before tokenizing it, a prompt that cannot fit: no token stands for more than `token_chars`
    bytes, and a character is at least one byte. The tokenizer holds the GIL while it encodes a text, so this
    also keeps a multi-megabyte prompt from stalling every stream for seconds."""
    at_least = -(-chars // token_chars)
    if at_least >= context:
        raise _too_long(f"at least {at_least}", context, param)


def _chars(message) -> int:
    """Characters of a message's text (an assistant's tool-call markers become special tokens: not counted)."""
    content = message["content"]
    return len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)


def _too_long(tokens, context, param) -> RequestError:
    return RequestError(f"the prompt is {tokens} tokens but this model's context holds {context} (prompt + "
                        "answer): shorten the conversation", param, code="context_length_exceeded")


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RequestError(f"'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, got "
                           f"{_kind(value)}", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content', got {_kind(m)}",
                               f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")   # OpenAI's newer name for system
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] has unsupported role {reprlib.repr(m.get('role'))}: use 'system', "
                               "'user' or 'assistant'", f"messages[{i}].role")
        text = _content(m.get("content"), f"messages[{i}].content")
        out.append({"role": role, "content": assistant_parts(text) if role == "assistant" else text})
    return out


def _content(value, param) -> str:
    """A string, or OpenAI's list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise RequestError(f"{param} must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts "
                           f"(only text is supported), got {_kind(value)}", param)
    return _unicode(value, param)


def _int(body, name, default, lo, hi=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {_kind(value)}", name)
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise RequestError(f"'{name}' must be {bound}, got {reprlib.repr(value)}", name)
    return value


def _number(body, name, default, lo, hi, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {_kind(value)}", name)
    if not ((lo < value) if lo_open else (lo <= value)) or not value <= hi:
        raise RequestError(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {reprlib.repr(value)}",
                           name)
    return float(value)


def _bool(value, name) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {_kind(value)}", name)
    return value


def _stop(value) -> list[str]:
    if value is None:
        return []
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of them, got {_kind(value)}", "stop")
    if len(stop) > MAX_STOP:
        raise RequestError(f"'stop' has {len(stop)} strings; at most {MAX_STOP} are allowed", "stop")
    return [_unicode(s, "stop") for s in stop]


def _logit_bias(value) -> dict[int, float]:
    if value is None:
        return {}
    if isinstance(value, dict) and len(value) > MAX_LOGIT_BIAS:   # every entry is work in every sampling step
        raise RequestError(f"'logit_bias' has {len(value)} entries; at most {MAX_LOGIT_BIAS} are allowed", "logit_bias")
    if not isinstance(value, dict) or not all(
            k.isascii() and k.isdigit() and len(k) < 10 and not isinstance(v, bool) and isinstance(v, (int, float)) and -100 <= v <= 100
            for k, v in value.items()):
        raise RequestError(f"'logit_bias' must map token ids (as strings) to numbers in [-100, 100], got "
                           f"{_kind(value)}", "logit_bias")
    return {int(k): float(v) for k, v in value.items()}


def _generation(body, prompts, context, prompt_param, model, logprobs, echo=False) -> GenerationRequest:
    n_prompt = max(map(len, prompts))
    if n_prompt >= context:
        raise _too_long(n_prompt, context, prompt_param)
    room = context - n_prompt
    # max_completion_tokens is OpenAI's newer name for the same limit
    key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = _int(body, key, room, 0 if echo else 1)   # 0: score the echoed prompt, generate nothing
    if max_tokens > room:
        raise RequestError(f"'{key}' is {reprlib.repr(max_tokens)} but the prompt takes {n_prompt} of the model's "
                           f"{context} tokens of context: ask for at most {room}", key, code="context_length_exceeded")
    if max_tokens == 0 and logprobs is None:
        raise RequestError(f"'{key}' 0 generates nothing: with echo it is for scoring the prompt, so ask for "
                           "'logprobs' too (or for at least 1 token)", key)
    seed = _int(body, "seed", None, 0, 2**63 - 1 - MAX_N)
    n = _int(body, "n", 1, 1, MAX_N)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(f"'stream_options' must be an object, got {_kind(options)}", "stream_options")
    sampling = dict(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0, 2),
                    top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True), top_k=_int(body, "top_k", 0, 0),
                    stop=_stop(body.get("stop")), ignore_eos=_bool(body.get("ignore_eos"), "ignore_eos"),
                    min_tokens=_int(body, "min_tokens", 0, 0, max_tokens),
                    presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
                    frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
                    logit_bias=_logit_bias(body.get("logit_bias")), logprobs=logprobs,
                    prompt_logprobs=logprobs if echo else None)
    # choice j of each prompt gets seed + j: reproducible, yet the n choices differ
    params = [SamplingParams(**sampling, seed=None if seed is None else seed + j) for _ in prompts for j in range(n)]
    return GenerationRequest(prompts, params, _bool(body.get("stream"), "stream"),
                             _bool((options or {}).get("include_usage"), "stream_options.include_usage"), model, n)
