"""`gpt-fpga serve`: the OpenAI completions API and a page that streams text, over one device.

The HTTP layer only: request rules and response bodies are host/serve_api.py's pure functions, the
device and its queue host/serve_worker.py's. Starlette routes, uvicorn serves (both pure Python, so
they install on the board's Python 3.10).

    GET  /                      the page (host/serve_page.html): prompt, settings, streamed text
    GET  /health                backend, model, queue and, for rtl/pynq, the engine's identity (no key)
    GET  /v1/models             the one model served
    POST /v1/completions        OpenAI completions, streamed as server-sent events with "stream": true
    POST /v1/chat/completions   refused with a reason: a base model has no chat format (docs/serve.md)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import sys
import time
from importlib.resources import files
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from gpt_fpga.host.backends import Backend
from gpt_fpga.host.serve_api import (DEFAULT_MAX_BODY, DEFAULT_QUEUE, SSE_DONE, ApiError, CompletionRequest,
                                     ModelFacts, chunk_body, choice, completion_body, completion_id, error_body,
                                     models_body, parse_completion_request, parse_json_object, sse_event, usage)
from gpt_fpga.host.serve_worker import DeviceWorker, DoneEvent, ErrorEvent, Job, QueueFull, TokenEvent

log = logging.getLogger("gpt_fpga.serve")


def model_facts(backend: Backend, model_id: str) -> ModelFacts:
    encode = backend.codec.encode if backend.codec is not None else None
    return ModelFacts(model_id, backend.config.vocab_size, backend.config.n_ctx, encode)


def engine_identity(backend: Backend) -> dict | None:
    """The identity registers the driver read at start (rtl, pynq); None for the golden models."""
    return getattr(getattr(backend, "model", None), "identity", None)


# ---- HTTP helpers ---------------------------------------------------------------------------------
def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def check_key(request: Request, api_key: str | None):
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                            "server's --api-key" if given else "this server needs an API key: send the header "
                            "'Authorization: Bearer KEY'", code="invalid_api_key", kind="authentication_error")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused past `limit` bytes before more of it is read."""
    too_big = ApiError(400, f"the request body exceeds this server's limit of {limit} bytes (--max-body)",
                       code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def cancel_on_disconnect(receive, job: Job):
    """Cancel the job when the client goes away (its generation stops at the next token)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def device_error(message: str) -> ApiError:
    return ApiError(500, message, code="device_error", kind="server_error")


class EventStream:
    """The SSE response of a streamed completion: a chunk per token, the finish, usage, `[DONE]`.

    Sent only once the first token is there, so a request that fails before it still gets a 500; an
    error after it can only be told in the stream, as an `error` event (as vLLM does)."""

    def __init__(self, job: Job, first, watcher: asyncio.Task, cid: str, model_id: str):
        self.job, self.first, self.watcher, self.cid, self.model_id = job, first, watcher, cid, model_id
        self.created = int(time.time())

    def chunk(self, text: str, finish_reason: str | None, extra: dict | None = None) -> bytes:
        return sse_event(chunk_body(self.cid, self.model_id, self.created, [choice(text, finish_reason)], extra))

    def encode(self, event) -> list[bytes]:
        req = self.job.request
        if isinstance(event, TokenEvent):
            return [self.chunk(event.text, None, {"engine": event.engine} if event.engine else None)]
        if isinstance(event, ErrorEvent):
            return [sse_event(device_error(event.message).body()), SSE_DONE]
        out = [self.chunk(event.text, event.finish_reason)]
        if req.include_usage:
            out.append(sse_event(chunk_body(self.cid, self.model_id, self.created, [],
                                            {"usage": usage(len(req.prompt_ids), event.completion_tokens)})))
        return out + [SSE_DONE]

    async def events(self):
        event = self.first
        while True:
            yield event
            if not isinstance(event, TokenEvent):
                return
            event = await self.job.events.get()

    async def __call__(self, scope, receive, send):
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for event in self.events():
                for data in self.encode(event):
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send
            pass
        finally:
            self.watcher.cancel()
            self.job.cancel()  # no-op once finished; otherwise the generation stops at its next token


# ---- the application -------------------------------------------------------------------------------
class Server:
    """The routes over one backend and its worker."""

    def __init__(self, backend: Backend, model_id: str, api_key: str | None = None,
                 max_waiting: int = DEFAULT_QUEUE, max_body: int = DEFAULT_MAX_BODY):
        self.backend, self.model_id, self.api_key, self.max_body = backend, model_id, api_key, max_body
        self.facts = model_facts(backend, model_id)
        self.worker = DeviceWorker(backend, max_waiting)
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [Route("/", self.page), Route("/health", self.health),
                  Route("/v1/models", self.api(self.models)),
                  Route("/v1/completions", self.api(self.completions), methods=["POST"]),
                  Route("/v1/chat/completions", self.api(self.chat), methods=["POST"])]

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.worker.start()
            yield
            self.worker.stop()

        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={HTTPException: self.http_error})

    def api(self, handler):
        """An API route: the key checked first, an ApiError answered as OpenAI's error object."""
        async def route(request: Request):
            try:
                check_key(request, self.api_key)
                return await handler(request)
            except ApiError as e:
                return error_response(e)
        return route

    async def http_error(self, request: Request, exc: HTTPException):
        """Starlette's own 404 and 405, as error objects too."""
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error"),
                            status_code=exc.status_code, headers=exc.headers)

    async def page(self, request: Request):
        return HTMLResponse(files("gpt_fpga.host").joinpath("serve_page.html").read_text(encoding="utf-8"))

    async def health(self, request: Request):
        cfg, worker = self.backend.config, self.worker
        body = {"status": "ok", "backend": self.backend.name, "model": self.model_id, "n_ctx": cfg.n_ctx,
                "vocab_size": cfg.vocab_size, "tokenizer": self.backend.codec is not None,
                "queue": {"running": worker.running is not None, "waiting": worker.waiting,
                          "limit": worker.max_waiting, "served": worker.served},
                "api_key": self.api_key is not None}
        identity = engine_identity(self.backend)
        if identity is not None:
            body["engine"] = {**identity, "clock_hz": worker.clock_hz}
        return JSONResponse(body)

    async def models(self, request: Request):
        return JSONResponse(models_body(self.model_id, self.created))

    async def chat(self, request: Request):
        raise ApiError(404, "this server runs a base model, which was never trained on a chat format: "
                            "/v1/chat/completions is not offered (docs/serve.md says why); use /v1/completions "
                            "with the text to continue", code="chat_not_supported")

    async def completions(self, request: Request):
        req = parse_completion_request(parse_json_object(await read_body(request, self.max_body)), self.facts)
        job = Job(req, asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise ApiError(503, str(e), code="queue_full", kind="server_error",
                           headers={"Retry-After": str(e.retry_after)}) from None
        watcher = asyncio.create_task(cancel_on_disconnect(request.receive, job))
        try:
            first = await job.events.get()
            if isinstance(first, ErrorEvent):
                raise device_error(first.message)
            if req.stream:
                stream, watcher = EventStream(job, first, watcher, completion_id(), self.model_id), None
                return stream
            return JSONResponse(await self.collect(job, req, first))
        finally:
            if watcher is not None:  # the stream owns it from here on
                watcher.cancel()
                job.cancel()

    async def collect(self, job: Job, req: CompletionRequest, event) -> dict:
        parts = []
        while isinstance(event, TokenEvent):
            parts.append(event.text)
            event = await job.events.get()
        if isinstance(event, ErrorEvent):
            raise device_error(event.message)
        assert isinstance(event, DoneEvent)
        return completion_body(completion_id(), self.model_id, "".join(parts) + event.text, event.finish_reason,
                               len(req.prompt_ids), event.completion_tokens)


def create_app(backend: Backend, model_id: str, **kw) -> Starlette:
    return Server(backend, model_id, **kw).app()


def serve(image: str | Path, backend_name: str, overlay: str | None, host: str, port: int, api_key: str | None,
          max_waiting: int = DEFAULT_QUEUE, max_body: int = DEFAULT_MAX_BODY):
    """Open the backend, then serve until Ctrl-C."""
    import uvicorn

    from gpt_fpga.host.backends import open_backend

    backend = open_backend(backend_name, image, overlay=overlay)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"gpt-fpga serve: warning: listening on {host} without --api-key: anyone who can reach this "
              f"port can use the device", file=sys.stderr)
    app = create_app(backend, Path(image).stem, api_key=api_key, max_waiting=max_waiting, max_body=max_body)
    logging.basicConfig(level=logging.INFO, format="gpt-fpga serve: %(message)s")
    print(f"gpt-fpga serve: {Path(image).stem} on --backend {backend_name}, http://{host}:{port}/",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
