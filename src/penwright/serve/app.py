"""The HTTP server: an OpenAI-compatible API under /v1, a health check, and the web page at /.

    app = create_app(ServeConfig(model=["runs/book"]))     # or create_app(cfg, {"book": writer})

Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a fitting status.
Model names from requests are only ever keys of the dict of loaded models, never paths.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..config import SampleConfig, ServeConfig
from ..errors import PenwrightError
from ..generate import Chat, Writer, load
from ..quantize import BACKENDS, int8_activations, int8_products
from ..words import plural
from .requests import ChatRequest, CompletionRequest, Sampling
from .worker import Job, TurnWorker, Worker

STATIC = Path(__file__).parent / "static"
MAX_SAMPLES = 64  # prompts x n in one request; more is a denial of service, not a use
DISCONNECT_POLL_S = 0.25  # how often a plain request's wait looks for a client that left
HEAD_TOKENS = 2  # what a row may hold before its prompt: the leading EOS and a label


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, PenwrightError):
        return ApiError(400, str(e))
    if isinstance(e, HTTPException):  # unknown paths and methods
        return ApiError(e.status_code, str(e.detail))
    return ApiError(500, f"internal error: {e}", kind="server_error")


def load_writers(cfg: ServeConfig, log=print) -> dict[str, Writer]:
    if not cfg.model:
        raise PenwrightError("no model given: pass --model runs/NAME (repeatable; --model NAME=PATH names it)")
    # as `penwright generate` loads them: penwright's engine and int8 where it can, else transformers
    writers = {name: load(path, cfg.precision, cfg.device, cfg.allow_pickle, log=log, quantize=cfg.quantize,
                          engine=cfg.engine) for name, path in cfg.models().items()}
    for name, writer in writers.items():
        if int8_activations(writer.model):  # where exact: a batch's rows share the int8 products' speed
            backend = BACKENDS[int8_products()].__name__
            log(f"{name}: int8 activations too ({backend}, exact int8 products on this CPU), for batches of writers")
    return writers


def worker_for(name: str, writer: Writer, cfg: ServeConfig) -> Worker:
    """Continuous batching where penwright's engine writes; batches and turns on transformers'."""
    from ..engine import Model

    if isinstance(writer.model, Model):
        from .batcher import Batcher

        return Batcher(name, writer, cfg.max_batch, cfg.prefill_chunk, longest_row(writer, cfg))
    return TurnWorker(name, writer, cfg.max_batch)


def longest_row(writer: Writer, cfg: ServeConfig) -> int:
    """The most tokens a row can hold on this server: the leading EOS and a label, the longest prompt and
    the most new tokens it takes, within the model's context. The batcher's cache keeps that many per slot,
    not the whole context, which for SmolLM2's 8,192 tokens would take 6 GB at --max-batch 16."""
    return min(writer.context, HEAD_TOKENS + cfg.max_prompt_tokens + cfg.max_tokens_cap)


class Server:
    """What the API does, one method per concern: authorize, parse a body, check its settings, run it
    and reply in OpenAI's shape. `create_app` binds the routes to these methods."""

    def __init__(self, cfg: ServeConfig, writers: dict[str, Writer]):
        self.cfg, self.writers = cfg, writers
        self.workers = {name: worker_for(name, writer, cfg) for name, writer in writers.items()}
        self.started = int(time.time())

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()

    async def authorize(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.cfg.api_key}".encode()):  # constant time
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def parse(self, request: Request, schema: type[Sampling]) -> Sampling:
        """The JSON body as `schema`, refusing bodies over --max-body-bytes before reading them all."""
        limit = self.cfg.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            data = json.loads(body)
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(map(str, first["loc"])) or None
            raise ApiError(400, f"{param or 'the request body'}: {first['msg']}", param=param) from None

    def pick(self, name: str | None) -> tuple[str, Writer]:
        if name is None and len(self.writers) == 1:
            name = next(iter(self.writers))
        if name not in self.writers:
            known = ", ".join(self.writers)
            if name is None:
                raise ApiError(400, f"model is required: one of {known}", param="model")
            raise ApiError(404, f"the model {name!r} does not exist; this server has: {known}",
                           param="model", code="model_not_found")
        return name, self.writers[name]

    def settings(self, request: Sampling, writer: Writer, prompts: list[str | None]) -> SampleConfig:
        """Check the request against the server's limits and return its sampling settings."""
        cfg, sampling = self.cfg, request.sampling(self.cfg.max_batch)
        if sampling.max_new_tokens > cfg.max_tokens_cap:
            raise ApiError(400, f"max_tokens is {sampling.max_new_tokens}; this server writes at most "
                                f"{cfg.max_tokens_cap} (--max-tokens-cap)", param="max_tokens")
        if len(prompts) * sampling.num_samples > MAX_SAMPLES:
            raise ApiError(400, f"prompts x n is more than {MAX_SAMPLES}; split the request", param="n")
        if sampling.label is not None and sampling.label not in writer.labels:
            known = ", ".join(sorted(writer.labels)) or "none"
            raise ApiError(400, f"unknown label {sampling.label!r}; this model knows: {known}", param="label")
        room = min(cfg.max_prompt_tokens, writer.context - HEAD_TOKENS - 1)  # and one new token
        for prompt in prompts:
            if (size := count_tokens(writer, prompt)) > room:
                raise ApiError(400, f"the prompt is {plural(size, 'token')}; this server takes at most {room}",
                               param="prompt", code="context_length_exceeded")
            # what the context holds after the leading EOS and label (none before a chat reply) and a prompt token;
            # a longer prompt keeps its last tokens, as `penwright generate` does
            most = writer.context - 1 - (0 if isinstance(prompt, Chat) else 1 + (sampling.label is not None))
            if sampling.max_new_tokens > most:
                raise ApiError(400, f"max_tokens is {sampling.max_new_tokens}; this model's "
                                    f"{writer.context}-token context holds at most {most} new tokens",
                               param="max_tokens", code="context_length_exceeded")
        return sampling

    def chat_prompt(self, name: str, writer: Writer, body: ChatRequest) -> str:
        """The conversation rendered with the run's chat template, ready for the reply (which the writer
        ends at the template's end-of-turn token)."""
        if not writer.template:
            raise ApiError(400, f"the model {name!r} has no chat template, so it cannot chat; "
                                "use /v1/completions with a prompt instead", param="model", code="chat_not_supported")
        try:
            return writer.render([m.model_dump() for m in body.messages])
        except PenwrightError as e:  # a template may refuse these messages, e.g. roles out of order
            raise ApiError(400, f"messages: {e}", param="messages") from None

    async def events(self, job: Job, deadline: float, request: Request | None = None):
        """The job's events until it finishes; leaving early (timeout, or `request`'s client gone) cancels it."""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(504, f"the request took longer than {self.cfg.timeout:g} s (--timeout)",
                                   code="timeout", kind="timeout")
                try:  # wake up now and then to notice a client that left
                    event = await asyncio.wait_for(job.events.get(), min(left, DISCONNECT_POLL_S))
                except TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if event[0] == "error":
                    raise event[1]
                yield event
                if event[0] in ("samples", "done"):
                    return
        finally:
            job.cancelled = True

    async def answer(self, request: Request, body: Sampling, name: str, writer: Writer, prompts: list[str | None],
                     chat: bool, echo: bool = False):
        """Run a checked request and reply in OpenAI's shape, whole or as server-sent events."""
        sampling = self.settings(body, writer, prompts)
        reply = Reply(chat, name, [(p or "") if echo else "" for p in prompts for _ in range(sampling.num_samples)],
                      sum(count_tokens(writer, p) for p in prompts))
        deadline = time.monotonic() + self.cfg.timeout
        worker = self.workers[name]
        if worker.queued >= self.cfg.max_queue:  # the event loop alone submits, so the check holds
            wait = worker.retry_after()
            raise ApiError(429, f"the server is busy: {plural(worker.queued, 'request')} already wait for "
                                f"{name!r} (--max-queue); retry in {plural(wait, 'second')}",
                           code="rate_limit_exceeded", kind="requests", headers={"Retry-After": str(wait)})
        job = worker.submit(prompts, sampling, body.stream)
        if not body.stream:
            samples = [event[1] async for event in self.events(job, deadline, request)]
            if not samples:  # the client left: nobody reads the answer
                return Response(status_code=499)
            return reply.whole(samples[0])
        return StreamingResponse(reply.stream(self.events(job, deadline), job, body.stream_options.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def models(self) -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.started, "owned_by": "penwright",
             "labels": sorted(writer.labels), "chat": bool(writer.template),
             "context_length": writer.context} for name, writer in self.writers.items()]}

    def health(self) -> dict:
        return {"status": "ok", "models": {name: w.health() for name, w in self.workers.items()},
                "auth": self.cfg.api_key is not None,
                "limits": {"max_tokens_cap": self.cfg.max_tokens_cap, "max_prompt_tokens": self.cfg.max_prompt_tokens}}


@dataclass
class Reply:
    """One request's answer in OpenAI's shape: a whole body, or server-sent events."""

    chat: bool
    model: str
    shown: list[str]  # what each choice starts with: its prompt (echo) or nothing
    prompt_tokens: int
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def head(self) -> dict:
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict:
        return {"usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": self.prompt_tokens + completion_tokens}}

    def whole(self, samples) -> dict:
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion",
                "choices": [choice(self.chat, i, self.shown[i] + s.text, s.finish_reason)
                            for i, s in enumerate(samples)],
                **self.usage(sum(s.new_tokens for s in samples))}

    def sse(self, choices: list[dict], **extra) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps({**self.head, 'object': kind, 'choices': choices, **extra})}\n\n"

    async def stream(self, events, job: Job, include_usage: bool):
        written = 0
        try:
            for index, text in enumerate(self.shown):
                if self.chat or text:
                    yield self.sse([choice(self.chat, index, text, None, True, True)])
            async for event in events:
                if event[0] == "text":
                    yield self.sse([choice(self.chat, event[1], event[2], None, True)])
                elif event[0] == "end":
                    written += event[2].new_tokens
                    yield self.sse([choice(self.chat, event[1], "", event[2].finish_reason, True)])
            if include_usage:  # OpenAI's way to count a stream's tokens
                yield self.sse([], **self.usage(written))
        except Exception as e:  # noqa: BLE001 (the status line is sent: report it in the stream)
            yield f"data: {json.dumps(as_api_error(e).body())}\n\n"
        finally:
            job.cancelled = True  # also when the client hung up while we were sending
        yield "data: [DONE]\n\n"


def create_app(cfg: ServeConfig, writers: dict[str, Writer] | None = None, log=print) -> FastAPI:
    server = Server(cfg, load_writers(cfg, log) if writers is None else writers)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="penwright", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    for kind in (ApiError, PenwrightError, HTTPException, Exception):
        app.add_exception_handler(kind, error_reply)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(server.authorize)])

    @v1.post("/completions")
    async def completions(request: Request):
        body = await server.parse(request, CompletionRequest)
        name, writer = server.pick(body.model)
        return await server.answer(request, body, name, writer, body.prompts(), chat=False, echo=body.echo)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await server.parse(request, ChatRequest)
        name, writer = server.pick(body.model)
        return await server.answer(request, body, name, writer, [server.chat_prompt(name, writer, body)], chat=True)

    v1.add_api_route("/models", server.models, methods=["GET"])
    app.include_router(v1)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/", lambda: FileResponse(STATIC / "index.html"), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def error_reply(request, e: Exception) -> JSONResponse:
    error = as_api_error(e)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def choice(chat: bool, index: int, text: str, reason: str | None, delta: bool = False, start: bool = False) -> dict:
    """One entry of `choices`: text for completions; a message (or, streaming, a delta) for chat."""
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    content = {"role": "assistant", "content": text} if start or not delta else {"content": text}
    return {"index": index, "delta" if delta else "message": content, "logprobs": None, "finish_reason": reason}


def count_tokens(writer: Writer, text: str | None) -> int:
    # The Rust tokenizer only reads its state here, so the event loop may use it beside the worker.
    return len(writer.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids) if text else 0
