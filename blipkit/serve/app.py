"""The HTTP API (FastAPI): caption, ask, embed, OpenAI chat completions, health and the model list; every
refusal is a JSON error ``{"error": {"message", "type"}}``."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from blipkit.errors import BlipkitError, one_line
from blipkit.serve.chat import completion, completion_chunks, parse_chat
from blipkit.serve.errors import RequestError, error_body
from blipkit.serve.payloads import Fields, ImageReader, parse_json
from blipkit.serve.service import Generation, ModelService
from blipkit.serve.settings import ServeSettings
from blipkit.version import __version__

__all__ = ["create_app"]

MAX_TEXT_CHARS = 4000
MAX_OUTPUTS = 10
_KINDS = {401: "authentication_error", 404: "not_found_error", 503: "server_error"}

router = APIRouter()


def create_app(service: ModelService, settings: ServeSettings) -> FastAPI:
    """The API over ``service``'s model; its batcher runs while the app does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        yield
        await run_in_threadpool(service.batcher.stop)

    app = FastAPI(title="blipkit", version=__version__, lifespan=lifespan)
    app.state.service = service
    app.state.settings = settings
    app.state.reader = ImageReader(settings.max_image_pixels, settings.max_body_bytes, settings.allow_url_fetch,
                                   settings.fetch_timeout_s)
    app.state.started = time.time()
    app.include_router(router)
    app.add_exception_handler(BlipkitError, _request_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(Gate, max_bytes=settings.max_body_bytes, api_key=settings.api_key)
    return app


class Gate:
    """ASGI middleware in front of every route: the API key (when the server has one) and the body size
    limit, checked before any route reads the body."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int, api_key: str | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.api_key = api_key

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[Any]], send: Callable[..., Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self._refusal(scope["path"], headers)
        if refusal is None:
            body, refusal = await self._read_body(receive)
        if refusal is not None:
            await JSONResponse(error_body(refusal.args[0], refusal.kind), refusal.status)(scope, receive, send)
            return
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _refusal(self, path: str, headers: dict[str, str]) -> RequestError | None:
        if self.api_key is not None and path != "/health":
            if not hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {self.api_key}".encode()):
                return RequestError("missing or wrong API key; send the header 'Authorization: Bearer KEY'", 401,
                                    "authentication_error")
        declared = headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            return self._too_large()
        return None

    async def _read_body(self, receive: Callable[..., Awaitable[Any]]) -> tuple[bytes, RequestError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", RequestError("the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks), None

    def _too_large(self) -> RequestError:
        return RequestError(
            f"the body is over the server's limit of {self.max_bytes / 2**20:g} MiB; send a smaller image "
            "(or start the server with a larger --max-body-mb)", 413,
        )


async def _request_error(request: Request, err: Exception) -> JSONResponse:
    status, kind = (err.status, err.kind) if isinstance(err, RequestError) else (400, "invalid_request_error")
    return JSONResponse(error_body(str(err), kind), status)


async def _http_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, HTTPException)
    detail = err.detail if isinstance(err.detail, str) else str(err.detail)
    if err.status_code == 404:
        detail = f"no such endpoint: {request.method} {request.url.path}; see GET /docs for the API"
    elif err.status_code == 405:
        allowed = {key.lower(): value for key, value in (err.headers or {}).items()}.get("allow", "another method")
        detail = f"{request.url.path} does not take {request.method}; it takes {allowed}"
    kind = _KINDS.get(err.status_code, "server_error" if err.status_code >= 500 else "invalid_request_error")
    return JSONResponse(error_body(detail, kind), err.status_code, headers=err.headers)


async def _validation_error(request: Request, err: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"malformed request: {one_line(str(err))[:300]}", "invalid_request_error"), 400)


async def _unexpected_error(request: Request, err: Exception) -> JSONResponse:
    message = f"internal error ({type(err).__name__}: {one_line(str(err))[:200]}); this is a bug in blipkit or a plugin, please report it"
    return JSONResponse(error_body(message, "server_error"), 500)


async def read_fields(request: Request) -> Fields:
    """The request's named values: a JSON object, or a form's fields (files as bytes; repeated names as lists)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        value = parse_json(await request.body())
        if not isinstance(value, dict):
            raise RequestError("the body must be a JSON object of named fields")
        return Fields(value)
    if media not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise RequestError(
            f"content type '{media or 'none'}' is not accepted; send JSON (application/json) or a form "
            "(multipart/form-data)", 415,
        )
    limit = request.app.state.settings.max_body_bytes
    try:
        async with request.form(max_part_size=limit) as form:
            values: dict[str, Any] = {}
            for key in form.keys():
                entries = [await entry.read() if hasattr(entry, "read") else entry for entry in form.getlist(key)]
                values[key] = entries[0] if len(entries) == 1 else entries
    except HTTPException as err:
        raise RequestError(f"malformed form data ({err.detail}); send a valid multipart/form-data body") from None
    except (ValueError, KeyError, UnicodeDecodeError) as err:
        raise RequestError(f"malformed form data ({one_line(str(err))[:200]}); send a valid multipart/form-data body") from None
    return Fields(values, from_form=True)


async def read_image(request: Request, value: Any, name: str = "image") -> Image.Image:
    """A request's image decoded off the event loop."""
    return await run_in_threadpool(request.app.state.reader.read, value, name)


async def outcome(future: Future) -> Any:
    """The result of queued model work; a model's own user error becomes a 400."""
    try:
        return await asyncio.wrap_future(future)
    except BlipkitError as err:
        if isinstance(err, RequestError):
            raise
        raise RequestError(str(err)) from None


def _text(fields: Fields, name: str, required: bool = False, allow_empty: bool = False) -> str | None:
    value = fields.text(name, required=required, allow_empty=allow_empty)
    if value is not None and len(value) > MAX_TEXT_CHARS:
        raise RequestError(f"'{name}' has {len(value)} characters; send at most {MAX_TEXT_CHARS}")
    return value


def generation_settings(fields: Fields, settings: ServeSettings, prompt: bool, count: str | None) -> Generation:
    """Generation settings from a request's fields: beams, length, sampling, and (when ``prompt``) the
    caption prompt and (when ``count`` names a field) the number of outputs."""
    sample = fields.flag("sample")
    if not sample and ("top_p" in fields or "temperature" in fields):
        raise RequestError("'top_p' and 'temperature' go with \"sample\": true")
    return Generation(
        prompt=_text(fields, "prompt", allow_empty=True) if prompt else None,
        num_beams=fields.integer("num_beams", None, 1, MAX_OUTPUTS),
        max_new_tokens=fields.integer("max_new_tokens", None, 1, settings.max_new_tokens),
        n=fields.integer(count, 1, 1, MAX_OUTPUTS) if count else 1,
        sample=sample,
        top_p=fields.number("top_p", None, 0.001, 1.0) if sample else None,
        temperature=fields.number("temperature", None, 0.01, 2.0) if sample else None,
    )


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness, the model, and the batcher's counts."""
    service: ModelService = request.app.state.service
    return {"status": "ok", "model": service.name, **service.describe(),
            "uptime_s": round(time.time() - request.app.state.started, 3), "batching": service.batcher.stats()}


def _model_card(service: ModelService) -> dict[str, Any]:
    return {"id": service.name, "object": "model", "created": service.created, "owned_by": "blipkit",
            **service.describe()}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The served model, in OpenAI's model-list shape."""
    return {"object": "list", "data": [_model_card(request.app.state.service)]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> dict[str, Any]:
    """One model by id, in OpenAI's shape."""
    service: ModelService = request.app.state.service
    if model_id != service.name:
        raise RequestError(f"model '{model_id}' is not served here; this server serves '{service.name}'", 404,
                           "not_found_error")
    return _model_card(service)


@router.post("/v1/caption")
async def caption(request: Request) -> dict[str, Any]:
    """Caption one image: ``image`` plus optional prompt, num_beams, max_new_tokens, num_captions, sample,
    top_p, temperature."""
    fields = await read_fields(request)
    generation = generation_settings(fields, request.app.state.settings, prompt=True, count="num_captions")
    image = await read_image(request, fields.raw("image", required=True))
    result = await outcome(request.app.state.service.caption(image, generation))
    return {"model": request.app.state.service.name, "caption": result.texts[0], "captions": result.texts}


@router.post("/v1/ask")
async def ask(request: Request) -> dict[str, Any]:
    """Answer ``question`` about ``image`` (optional num_beams, max_new_tokens, sample, top_p, temperature)."""
    fields = await read_fields(request)
    question = _text(fields, "question", required=True)
    generation = generation_settings(fields, request.app.state.settings, prompt=False, count=None)
    image = await read_image(request, fields.raw("image", required=True))
    result = await outcome(request.app.state.service.ask(image, question, generation))
    return {"model": request.app.state.service.name, "question": question, "answer": result.texts[0]}


@router.post("/v1/embed")
async def embed(request: Request) -> dict[str, Any]:
    """Embeddings in the bridge's image-text space: ``image``/``images`` ([Q, E] each) and/or
    ``text``/``texts`` ([E] each), and their similarity when both are given."""
    service: ModelService = request.app.state.service
    fields = await read_fields(request)
    limit = request.app.state.settings.max_items
    image_values, texts = fields.items("image", "images", limit), fields.items("text", "texts", limit)
    if not image_values and not texts:
        raise RequestError("give 'image' or 'images' (to embed images) and/or 'text' or 'texts'")
    for number, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
            raise RequestError(f"texts[{number}] must be a non-empty string of at most {MAX_TEXT_CHARS} characters")
    images = [await read_image(request, value, f"images[{n}]" if len(image_values) > 1 else "image")
              for n, value in enumerate(image_values)]
    futures = [service.embed_image(image) for image in images] + [service.embed_text(text) for text in texts]
    embeds = [await outcome(future) for future in futures]
    image_embeds, text_embeds = embeds[: len(images)], embeds[len(images) :]
    reply: dict[str, Any] = {"model": service.name}
    if image_embeds:
        reply["image_embeddings"] = [e.tolist() for e in image_embeds]
    if text_embeds:
        reply["text_embeddings"] = [e.tolist() for e in text_embeds]
    if image_embeds and text_embeds:
        reply["similarity"] = await run_in_threadpool(service.similarity, image_embeds, text_embeds)
    return reply


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> dict[str, Any] | StreamingResponse:
    """OpenAI's chat completions: one ``image_url`` part (a data URL, or an http(s) URL when the server
    fetches them); the last user message's text is the question, and without text the image is captioned."""
    service: ModelService = request.app.state.service
    chat = parse_chat(await read_fields(request), request.app.state.settings.max_new_tokens, MAX_OUTPUTS)
    if chat.model != service.name:
        raise RequestError(f"model '{chat.model[:100]}' is not served here; this server serves '{service.name}' "
                           "(GET /v1/models)", 404, "not_found_error")
    if chat.question is not None and len(chat.question) > MAX_TEXT_CHARS:
        raise RequestError(f"the question has {len(chat.question)} characters; send at most {MAX_TEXT_CHARS}")
    image = await read_image(request, chat.image, "image_url")
    if chat.question is None:
        future = service.caption(image, chat.generation)
    else:
        future = service.ask(image, chat.question, chat.generation)
    result = await outcome(future)
    if chat.stream:
        return StreamingResponse(completion_chunks(chat, result), media_type="text/event-stream")
    return completion(chat, result)
