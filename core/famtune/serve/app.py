"""The ``famtune serve`` web application: OpenAI's ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions``, plus the chat page at ``/``.

Every tokenizer and model call runs on one worker thread, so concurrent requests wait their turn
and a generation is never interleaved with another (the served models share one set of weights
and switch adapters per request). A streaming client that goes away cancels its generation at
the next token; a waiting one is dropped before it starts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from famtune.chat import ChatSession, Generation
from famtune.errors import FamtuneError
from famtune.serve.models import ServedModel
from famtune.serve.protocol import ApiError, ChatRequest, CompletionRequest, Message, Sampling

STATIC = Path(__file__).with_name("static")
#: max_tokens when a chat request gives none (capped by what the context leaves)
DEFAULT_MAX_TOKENS = 512
ROLES = ("system", "user", "assistant")


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed as soon as the response ends or the client
    leaves, so its ``finally`` cancels the generation right away."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def create_app(models: dict[str, ServedModel], *, api_key: str | None = None) -> FastAPI:
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="famtune-generate")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="famtune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.models = models
    #: the last generations (model, finish_reason, completion_tokens), newest last
    app.state.finished = collections.deque(maxlen=256)

    def record(name: str, gen: Generation) -> None:
        app.state.finished.append(
            {"model": name, "finish_reason": gen.finish_reason, "completion_tokens": len(gen.new_ids)}
        )

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(
                    ApiError(
                        401,
                        "Incorrect API key provided; pass it as 'Authorization: Bearer KEY'",
                        type="invalid_request_error",
                        code="invalid_api_key",
                    )
                )
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        return _error(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = (
            f"Unknown request URL: {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        )
        return _error(ApiError(exc.status_code, message, code="unknown_url" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return _error(ApiError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error"))

    async def on_worker(request: Request, fn: Callable[[], Any], cancel: threading.Event) -> Any:
        """``fn()`` on the worker thread; gives up (and cancels) when the client disconnects."""
        future = asyncio.get_running_loop().run_in_executor(worker, fn)
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.2)
            if done:
                return future.result()
            if await request.is_disconnected():
                cancel.set()
                return None

    def pick(name: str) -> ServedModel:
        if name not in models:
            raise ApiError(
                404,
                f"The model {name!r} does not exist; this server has: {', '.join(models)}",
                param="model",
                code="model_not_found",
            )
        return models[name]

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "famtune",
                    "famtune": {"kind": m.kind, "family": m.session.family.name, "source": m.source},
                }
                for m in models.values()
            ],
        }

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        m = pick(name)
        return {"id": m.name, "object": "model", "created": 0, "owned_by": "famtune"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        served = pick(body.model)
        session = served.session
        messages = _messages(body.messages)
        stops = body.stop_strings()
        cancel = threading.Event()

        def prepare() -> list[int]:
            try:
                return session.prompt_ids(messages)
            except FamtuneError as exc:
                raise ApiError(400, f"messages: {exc}", param="messages") from None

        ids = await on_worker(request, prepare, cancel)
        if ids is None:
            return None
        max_tokens = _fit(session, len(ids), body.max_tokens or body.max_completion_tokens, "messages")
        settings = _settings(session, body)
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def head(**fields) -> dict:
            return {
                "id": reply_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": served.name,
                **fields,
            }

        if body.stream:

            def chunk(i: int, delta: dict, finish: str | None = None) -> dict:
                return head(choices=[{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}])

            return _stream(
                body,
                served,
                ids,
                settings,
                max_tokens,
                stops,
                cancel,
                record,
                start=lambda i: chunk(i, {"role": "assistant", "content": ""}),
                piece=lambda i, text: chunk(i, {"content": text}),
                finish=lambda i, gen: chunk(i, {}, _finish(gen)),
                usage_only=lambda usage: head(choices=[], usage=usage),
            )

        def work() -> list[Generation]:
            return _generate_n(session, served.name, ids, settings, max_tokens, stops, body, cancel, record)

        gens = await on_worker(request, work, cancel)
        if gens is None:
            return None
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": created,
            "model": served.name,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": g.text},
                    "logprobs": None,
                    "finish_reason": _finish(g),
                }
                for i, g in enumerate(gens)
            ],
            "usage": _usage(len(ids), gens),
        }

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        served = pick(body.model)
        session = served.session
        stops = body.stop_strings()
        cancel = threading.Event()
        if body.stream and (body.logprobs is not None or _prompt_count(body.prompt) > 1):
            raise ApiError(
                400, "stream: streaming supports one prompt without logprobs; send stream=false", param="stream"
            )

        def prepare() -> list[list[int]]:
            return _prompt_ids(session, body.prompt)

        prompts = await on_worker(request, prepare, cancel)
        if prompts is None:
            return None
        for ids in prompts:
            _fit(session, len(ids), body.max_tokens, "prompt")
        settings = _settings(session, body)
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def head(**fields) -> dict:
            return {"id": reply_id, "object": "text_completion", "created": created, "model": served.name, **fields}

        if body.stream:
            ids = prompts[0]

            def chunk(i: int, text: str, finish: str | None = None) -> dict:
                return head(choices=[{"index": i, "text": text, "logprobs": None, "finish_reason": finish}])

            return _stream(
                body,
                served,
                ids,
                settings,
                body.max_tokens,
                stops,
                cancel,
                record,
                start=lambda i: chunk(i, session.tokenizer.decode(ids) if body.echo else ""),
                piece=lambda i, text: chunk(i, text),
                finish=lambda i, gen: chunk(i, "", _finish(gen)),
                usage_only=lambda usage: head(choices=[], usage=usage),
            )

        def work() -> list[dict]:
            choices: list[dict] = []
            for ids in prompts:
                gens = _generate_n(session, served.name, ids, settings, body.max_tokens, stops, body, cancel, record)
                for gen in gens:
                    choices.append(_completion_choice(session, ids, gen, body, len(choices)))
            return choices

        choices = await on_worker(request, work, cancel)
        if choices is None:
            return None
        usage = {
            "prompt_tokens": sum(len(p) for p in prompts),
            "completion_tokens": sum(c.pop("_new_tokens") for c in choices),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": reply_id,
            "object": "text_completion",
            "created": created,
            "model": served.name,
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage,
        }

    def _stream(
        body: Sampling,
        served: ServedModel,
        ids,
        settings,
        max_tokens,
        stops,
        cancel,
        on_done,
        *,
        start,
        piece,
        finish,
        usage_only,
    ) -> EventStream:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the server is shutting down
                cancel.set()

        def put_piece(i: int, text: str) -> None:
            put(("piece", i, text))

        def work() -> None:
            try:
                if body.seed is not None:
                    import torch

                    torch.manual_seed(body.seed)
                for i in range(body.n):
                    put(("start", i, None))
                    gen = served.session.generate(
                        ids,
                        settings,
                        max_new_tokens=max_tokens,
                        stop=stops,
                        on_text=functools.partial(put_piece, i),
                        cancel=cancel,
                    )
                    on_done(served.name, gen)
                    put(("done", i, gen))
                    if cancel.is_set():
                        break
            except Exception as exc:  # reported in the stream: its 200 header is already sent
                put(("error", 0, exc))
            finally:
                put(("end", 0, None))

        async def sse():
            gens: list[Generation] = []
            try:
                loop.run_in_executor(worker, work)
                while True:
                    kind, i, value = await events.get()
                    if kind == "start":
                        yield _sse(start(i))
                    elif kind == "piece":
                        yield _sse(piece(i, value))
                    elif kind == "done":
                        gens.append(value)
                        last = finish(i, value)
                        if len(gens) == body.n:
                            last["usage"] = _usage(len(ids), gens)
                        yield _sse(last)
                    elif kind == "error":
                        yield _sse(
                            ApiError(
                                500, f"generation failed ({type(value).__name__}: {value})", type="server_error"
                            ).body()
                        )
                    else:
                        break
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield _sse(usage_only(_usage(len(ids), gens)))
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        return EventStream(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return ApiError(
            400,
            f"We could not parse the JSON body of your request ({first.get('msg')}); send a JSON object",
            code="invalid_json",
        )
    param = _param(first.get("loc", ()))
    if first.get("type") == "missing":
        return ApiError(400, f"{param}: required field missing", param=param)
    value = first.get("input")
    shown = json.dumps(value, ensure_ascii=False)[:80] if isinstance(value, (str, int, float, bool, list)) else ""
    return ApiError(
        400,
        f"{param or 'body'}: {first.get('msg', 'invalid value')}" + (f" (got {shown})" if shown else ""),
        param=param,
    )


def _param(loc) -> str | None:
    """``messages[0].content`` from pydantic's ``("body", "messages", 0, "content", "str")``: for a
    union field pydantic names each alternative it tried; the field is what helps the user."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper():
            break
        else:
            out += f".{part}" if out else part
    return out or None


def _messages(messages: list[Message]) -> list[dict[str, str]]:
    if not messages:
        raise ApiError(400, "messages: must hold at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system role
        if role not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role: {m.role!r} is not supported; use system, user or assistant",
                param=f"messages[{i}].role",
            )
        out.append({"role": role, "content": m.text()})
    if out[-1]["role"] != "user":
        raise ApiError(
            400,
            f"messages[{len(out) - 1}]: the last message must be the user's (got {out[-1]['role']!r})",
            param="messages",
        )
    return out


def _fit(session: ChatSession, n_prompt: int, requested: int | None, what: str) -> int:
    """max_tokens for a prompt of ``n_prompt`` tokens: ``requested`` if it fits the context, else a 400."""
    limit = session.context_length
    if limit is None:
        return requested if requested is not None else DEFAULT_MAX_TOKENS
    if requested is None:
        if n_prompt >= limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens; your {what} resulted "
                f"in {n_prompt} tokens. Please reduce the length of the {what}.",
                param=what,
                code="context_length_exceeded",
            )
        return min(DEFAULT_MAX_TOKENS, limit - n_prompt)
    if n_prompt + requested > limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n_prompt + requested} tokens ({n_prompt} in the {what}, {requested} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            param=what,
            code="context_length_exceeded",
        )
    return requested


def _settings(session: ChatSession, body: Sampling) -> dict[str, Any]:
    if body.temperature == 0:
        return session.settings(greedy=True)
    overrides: dict[str, Any] = {}
    if body.temperature is not None:
        overrides.update(temperature=body.temperature, do_sample=True)
    if body.top_p is not None:
        overrides.update(top_p=body.top_p, do_sample=True)
    return session.settings(**overrides)


def _generate_n(
    session: ChatSession, name: str, ids, settings, max_tokens, stops, body: Sampling, cancel, record
) -> list[Generation]:
    if body.seed is not None:
        import torch

        torch.manual_seed(body.seed)
    gens = []
    for _ in range(body.n):
        if max_tokens == 0:  # scoring only (echo + logprobs)
            gen = Generation("", list(ids), [], "length")
        else:
            gen = session.generate(ids, settings, max_new_tokens=max_tokens, stop=stops, cancel=cancel)
            record(name, gen)
        gens.append(gen)
    return gens


def _finish(gen: Generation) -> str:
    return "stop" if gen.finish_reason == "stop" else "length"


def _usage(n_prompt: int, gens: list[Generation]) -> dict[str, int]:
    completion = sum(len(g.new_ids) for g in gens)
    return {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}


def _prompt_count(prompt) -> int:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return 1
    return len(prompt)


def _prompt_ids(session: ChatSession, prompt) -> list[list[int]]:
    tok = session.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    vocab = len(tok)
    out = []
    for i, p in enumerate(prompt):
        ids = tok(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(
                400, f"prompt[{i}]: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt"
            )
        if not ids:
            raise ApiError(400, f"prompt[{i}]: the prompt is empty; give at least one token", param="prompt")
        out.append(ids)
    return out


def _completion_choice(
    session: ChatSession, ids: list[int], gen: Generation, body: CompletionRequest, index: int
) -> dict:
    tok = session.tokenizer
    stops = set(session.stop_ids)
    shown = []
    for t in gen.new_ids:  # the stop token ends the text and is not part of it
        if t in stops:
            break
        shown.append(t)
    prefix = tok.decode(ids) if body.echo else ""
    choice = {
        "index": index,
        "text": prefix + gen.text,
        "logprobs": None,
        "finish_reason": _finish(gen),
        "_new_tokens": len(gen.new_ids),
    }
    if body.logprobs is not None:
        full = list(ids) + shown
        chosen, tops = session.token_logprobs(full, top=body.logprobs)
        first = 0 if body.echo else len(ids)
        tokens = [tok.decode([t]) for t in full[first:]]
        offsets, at = [], 0
        for piece in tokens:
            offsets.append(at)
            at += len(piece)
        choice["logprobs"] = {
            "tokens": tokens,
            "token_logprobs": chosen[first:],
            "top_logprobs": [
                None if i == 0 else {tok.decode([t]): lp for t, lp in tops[i].items()} for i in range(first, len(full))
            ],
            "text_offset": offsets,
        }
    return choice
