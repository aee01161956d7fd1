"""OpenAI's chat-completions format: a request's messages into one image and a question, and generated
texts into the response (whole, or as server-sent event chunks)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from blipkit.serve.errors import RequestError
from blipkit.serve.payloads import Fields
from blipkit.serve.service import Generated, Generation

__all__ = ["ChatRequest", "completion", "completion_chunks", "parse_chat"]

_ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass(frozen=True)
class ChatRequest:
    """What blipkit takes from a chat-completions request: the image, the question (None: caption it),
    the generation settings, and how to reply."""

    model: str
    image: str
    question: str | None
    generation: Generation
    stream: bool
    include_usage: bool


def parse_chat(fields: Fields, max_new_tokens: int, max_n: int) -> ChatRequest:
    """Check a chat-completions body. The conversation must hold exactly one image; the text of the last
    user message is the question about it (none: the image is captioned)."""
    model = fields.text("model", required=True)
    messages = fields.raw("messages", required=True)
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects")
    images: list[str] = []
    question = None
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise RequestError(f"messages[{number}] must be an object with a role ({', '.join(sorted(_ROLES))})")
        texts = _content(message.get("content"), f"messages[{number}]", images)
        if message["role"] == "user":
            question = " ".join(t.strip() for t in texts if t.strip()) or None
    if len(images) != 1:
        raise RequestError(
            f"the messages hold {len(images)} images; send exactly one as an image_url content part "
            "(a data URL: data:image/png;base64,...)"
        )
    temperature = fields.number("temperature", None, 0.0, 2.0)
    tokens = fields.integer("max_completion_tokens", None, 1, max_new_tokens)
    if tokens is None:
        tokens = fields.integer("max_tokens", None, 1, max_new_tokens)
    sample = bool(temperature)
    generation = Generation(
        max_new_tokens=tokens,
        n=fields.integer("n", 1, 1, max_n),
        sample=sample,
        top_p=fields.number("top_p", None, 0.001, 1.0) if sample else None,
        temperature=temperature if sample else None,
    )
    options = fields.raw("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object, e.g. {\"include_usage\": true}")
    return ChatRequest(model, images[0], question, generation, fields.flag("stream"),
                       bool((options or {}).get("include_usage")))


def _content(content: Any, where: str, images: list[str]) -> list[str]:
    """The texts of one message's content (a string or a list of parts); image URLs go to ``images``."""
    if isinstance(content, str):
        return [content]
    if content is None:
        return []
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of content parts")
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.strip():
                raise RequestError(f"{where}.content[{number}].image_url must hold a url string")
            images.append(url)
        else:
            raise RequestError(
                f"{where}.content[{number}] must be a text part {{type: text, text}} or an image part "
                "{type: image_url, image_url: {url}}"
            )
    return texts


def _usage(result: Generated) -> dict[str, int]:
    completion_tokens = sum(result.completion_tokens)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": result.prompt_tokens + completion_tokens}


def completion(request: ChatRequest, result: Generated) -> dict[str, Any]:
    """The chat-completion object for ``result``."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {"index": index, "message": {"role": "assistant", "content": text},
             "logprobs": None, "finish_reason": finish}
            for index, (text, finish) in enumerate(zip(result.texts, result.finish_reasons))
        ],
        "usage": _usage(result),
    }


def completion_chunks(request: ChatRequest, result: Generated) -> Iterator[str]:
    """The same answer as server-sent events: per choice its text, then its finish reason; usage when
    asked for; then ``[DONE]``."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": request.model}

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

    for index, (text, finish) in enumerate(zip(result.texts, result.finish_reasons)):
        yield event([{"index": index, "delta": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": None}])
        yield event([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}])
    if request.include_usage:
        yield event([], usage=_usage(result))
    yield "data: [DONE]\n\n"
