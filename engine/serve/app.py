"""The OpenAI-compatible server behind `recipe serve`: FastAPI + uvicorn over engine.serve.models.

Routes: GET /v1/models, POST /v1/chat/completions and /v1/completions (streaming over SSE or not), GET /health,
and the chat page at / (plain static files from engine/serve/static). Every /v1 route checks the API key when
one is set. Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for
anything the request got wrong; a handler that fails answers 500 in the same shape and the server keeps going.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.serve.models import Engine, TextAssembler

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_REQUEST_BYTES = 1_000_000
ROLES = {"system", "user", "assistant", "developer"}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "stop", "seed")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status, headers=headers)


# ---------------------------------------------------------------- request checks


def _number(body: dict, key: str, low: float, high: float, integer: bool = False) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise APIError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:40]}", key)
    if not low <= value <= high:
        raise APIError(400, f"'{key}' must be between {low:g} and {high:g}, got {value}", key)


def check_sampling(body: dict, engine: Engine) -> dict:
    """The request's sampling fields, checked against the limits; None where the request leaves the default."""
    limit = engine.character.config.max_tokens_limit
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
        body["max_tokens"] = body["max_completion_tokens"]
    _number(body, "max_tokens", 1, limit, integer=True)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "top_k", 0, 10_000, integer=True)
    _number(body, "repetition_penalty", 0.01, 10)
    _number(body, "seed", 0, 2**63 - 1, integer=True)
    if body.get("max_tokens") is not None and body["max_tokens"] > limit:
        raise APIError(400, f"max_tokens is {body['max_tokens']}, the most this server allows is {limit}", "max_tokens")
    if body.get("n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", "n")
    stop = body.get("stop")
    if isinstance(stop, str):
        body["stop"] = [stop]
    elif stop is not None and not (isinstance(stop, list) and len(stop) <= 8 and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of at most 8 non-empty strings", "stop")
    requested = {key: body.get(key) for key in SAMPLING_KEYS}
    params = engine.sampling(requested)
    if body.get("top_p") == 0:
        params["temperature"] = 0
    params["seed"] = body.get("seed")
    return params


def message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{index}].content: only text parts are supported", f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts", f"messages[{index}].content")


def check_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"messages[{index}] must be an object with a role of {', '.join(sorted(ROLES))}", f"messages[{index}]")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": message_text(message.get("content"), index)})
    return out


def check_context(engine: Engine, prompt_ids: list[int], params: dict, param: str) -> None:
    total = len(prompt_ids) + int(params["max_tokens"])
    if total > engine.max_context:
        raise APIError(
            400,
            f"This model's maximum context length is {engine.max_context} tokens. However, you requested {total} tokens "
            f"({len(prompt_ids)} in the {param}, {params['max_tokens']} in the completion). Please reduce the length of the "
            f"{param} or completion.",
            param,
            "context_length_exceeded",
        )


# ---------------------------------------------------------------- the app


def create_app(engines: dict[str, Engine], api_key: Optional[str] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    app = FastAPI(title="recipe serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _any_error(_request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if api_key is not None:
                header = request.headers.get("authorization", "")
                given = header[7:].strip() if header.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(given.encode(), api_key.encode()):
                    message = "Incorrect API key provided." if given else "Missing API key: send 'Authorization: Bearer <key>'."
                    return error_response(APIError(401, message, code="invalid_api_key"))
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > max_request_bytes):
                return error_response(APIError(413, f"request body over {max_request_bytes} bytes", code="request_too_large"))
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise APIError(413, f"request body over {max_request_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        return data

    def pick(body: dict) -> Engine:
        name = body.get("model")
        if name is None and len(engines) == 1:
            return next(iter(engines.values()))
        if not isinstance(name, str) or name not in engines:
            raise APIError(404, f"The model '{name}' does not exist; this server has: {', '.join(engines)}", "model", "model_not_found")
        return engines[name]

    def model_card(engine: Engine) -> dict:
        c = engine.character
        return {
            "id": c.id,
            "object": "model",
            "created": created,
            "owned_by": "recipe",
            "persona": {
                "name": c.name,
                "first_message": c.first_message if c.config.first_message else None,
                "system_prompt": c.system,
                "defaults": c.defaults(),
                "precision": engine.precision,
                "device": engine.device,
                "max_context": engine.max_context,
                "max_tokens_limit": c.config.max_tokens_limit,
            },
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(engines)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(e) for e in engines.values()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        if model_id not in engines:
            raise APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
        return model_card(engines[model_id])

    async def token_deltas(engine: Engine, prompt_ids: list[int], params: dict, assembler: TextAssembler) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def push(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        if engine.submit(prompt_ids, params, push, cancel) is None:
            raise APIError(503, f"{engine.character.id} has {engine.max_queue} requests waiting; try again shortly", code="server_busy", kind="server_error")
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, Exception):
                    raise APIError(500, f"generation failed: {type(item).__name__}: {item}", kind="server_error")
                delta = assembler.feed(item)
                if delta:
                    yield delta
                if assembler.stopped:
                    cancel.set()
            rest = assembler.flush()
            if rest:
                yield rest
        finally:
            cancel.set()  # a client that went away stops its generation at the next token

    async def first_then_rest(deltas: AsyncIterator[str]) -> tuple[Optional[str], AsyncIterator[str]]:
        """Start generating before the response begins, so a busy queue or a failure is still a status code."""
        try:
            first = await deltas.__anext__()
        except StopAsyncIteration:
            first = None
        return first, deltas

    def sse(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def usage(prompt_ids: list[int], assembler: TextAssembler) -> dict:
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": assembler.completion_tokens, "total_tokens": len(prompt_ids) + assembler.completion_tokens}

    async def respond(body: dict, engine: Engine, prompt_ids: list[int], params: dict, chat: bool) -> Response:
        assembler = TextAssembler(engine.tokenizer, params.get("stop") or [], int(params["max_tokens"]))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        model = engine.character.id
        deltas = token_deltas(engine, prompt_ids, params, assembler)
        prefix = body.get("prompt", "") if (not chat and body.get("echo")) else ""
        if not body.get("stream"):
            text = prefix + "".join([d async for d in deltas])
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": assembler.finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text, "finish_reason": assembler.finish_reason, "logprobs": None}
            return JSONResponse({
                "id": rid, "object": "chat.completion" if chat else "text_completion", "created": now, "model": model,
                "choices": [choice], "usage": usage(prompt_ids, assembler),
            })
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(body.get("stream_options"), dict) else False
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: Optional[str], finish: Optional[str] = None, role: bool = False) -> dict:
            if chat:
                piece: dict = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": piece, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": obj, "created": now, "model": model, "choices": [choice]}

        first, rest = await first_then_rest(deltas)

        async def events():
            try:
                if chat:
                    yield sse(chunk(None, role=True))
                if prefix:
                    yield sse(chunk(prefix))
                if first is not None:
                    yield sse(chunk(first))
                    async for delta in rest:
                        yield sse(chunk(delta))
                yield sse(chunk(None, assembler.finish_reason))
                if include_usage:
                    yield sse({"id": rid, "object": obj, "created": now, "model": model, "choices": [], "usage": usage(prompt_ids, assembler)})
            except APIError as exc:
                yield sse(error_body(exc.message, exc.kind, exc.param, exc.code))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        engine = pick(body)
        messages = check_messages(body)
        params = check_sampling(body, engine)
        system = body.get("system_prompt")  # extensions: override or drop (false/"") the persona parts
        first = body.get("first_message")
        if system is not None and not isinstance(system, (str, bool)):
            raise APIError(400, "'system_prompt' must be a string or false", "system_prompt")
        if first is not None and not isinstance(first, (str, bool)):
            raise APIError(400, "'first_message' must be a string, true or false", "first_message")
        full = engine.chat_messages(messages, None if system is True else system, first)
        try:
            prompt_ids = engine.chat_prompt_ids(full)
        except Exception as exc:  # the chat template rejects the order of roles, ...
            raise APIError(400, f"the chat template cannot render these messages: {exc}", "messages") from None
        check_context(engine, prompt_ids, params, "messages")
        return await respond(body, engine, prompt_ids, params, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        engine = pick(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = body["prompt"] = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (one prompt per request)", "prompt")
        params = check_sampling(body, engine)
        prompt_ids = engine.text_prompt_ids(prompt)
        check_context(engine, prompt_ids, params, "prompt")
        return await respond(body, engine, prompt_ids, params, chat=False)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}")
    async def static(name: str):
        path = STATIC / name
        if name not in {p.name for p in STATIC.iterdir()} or not path.is_file():
            raise APIError(404, f"no static file {name}", kind="not_found_error")
        return FileResponse(path)

    return app
