"""`mlx-mixtral serve`: an HTTP server for editors, agents and chat front ends, speaking OpenAI's
Chat Completions and Responses APIs and Anthropic's Messages API.

Built on Starlette (routing, requests, responses) served by uvicorn (the reference ASGI server),
both small, pure-Python and widely deployed: the `serve` extra installs them. Server-sent events
are written by `EventStream`, which also watches the connection, so a client that goes away
cancels its generation at the next token even while it waits in the queue.

Endpoints: POST /v1/chat/completions, POST /v1/completions, POST /v1/responses (and GET
/v1/responses/ID), POST /v1/messages and /v1/messages/count_tokens (each also without /v1),
GET /v1/models, GET /health. Each protocol's module (`openai_api`, `responses_api`,
`anthropic_api`) turns its body into the one `request.Request` and shapes the reply; requests are
queued and run by `scheduler`, and reuse the KV state of earlier conversations through
`prompt_pool`, whichever protocol they came in.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..arguments import add_model_args, add_sampling_args, kv_from_args, load_from_args, sampling_from_args
from ..distributed.group import single_process
from ..errors import MixtralError
from ..tokenizer import BASE_MODEL_NOTE, tool_syntax
from ..units import gb, parse_size
from . import anthropic_api, responses_api
from .openai_api import parse
from .openai_reply import Reply
from .output import ProtocolReply
from .prompt_pool import PromptPool
from .request import APIError, Defaults, Request, bad
from .response_store import ResponseStore
from .scheduler import Busy, Done, Failed, Job, Piece, Scheduler, Started, incident

# Browser pages served from this machine may call the API; any other origin only when named with
# --allow-origin (any web page the user visits could otherwise read the local model).
LOOPBACK_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
MAX_BODY_BYTES = 8 * 2**20  # a 32k-token conversation is a few hundred KB of JSON
# Seconds for a whole request body to arrive (uvicorn itself closes idle keep-alive connections
# after 5 s); MLX_MIXTRAL_BODY_TIMEOUT changes it.
BODY_TIMEOUT = float(os.environ.get("MLX_MIXTRAL_BODY_TIMEOUT", "30"))
DEFAULT_PROMPT_CACHE = "2GB"
DEFAULT_QUEUE = 8

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import ClientDisconnect
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
except ImportError:  # the `serve` extra is not installed: `run` says so in one line
    Starlette = None


class ClientGone(Exception):
    """The client hung up before its request was read: nobody to answer, nothing went wrong."""


async def _read_json(request: HTTPRequest) -> Any:
    """The body as JSON, refusing bodies over MAX_BODY_BYTES before reading them all, and bodies
    that trickle in slower than BODY_TIMEOUT allows (a client must not hold a slot forever)."""
    too_big = APIError(413, f"the request body is over the limit of {MAX_BODY_BYTES // 2**20} MB", param=None,
                       code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big

    async def read() -> bytearray:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise too_big
        return body

    try:
        body = await asyncio.wait_for(read(), BODY_TIMEOUT)
    except ClientDisconnect:
        raise ClientGone() from None
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT:.0f} s", code="request_timeout") from None
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("the request body is not UTF-8") from None
    except RecursionError:
        raise bad("the request body is JSON nested too deeply") from None
    except ValueError as e:
        raise bad(f"the request body is not valid JSON: {e}") from None


async def _disconnected(receive) -> None:
    """Returns when the client has gone away (the body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next(events: asyncio.Queue, gone: asyncio.Task):
    """The job's next event, or None once the client is gone."""
    get = asyncio.ensure_future(events.get())
    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    return None


class EventStream:
    """A reply streamed as server-sent events (an ASGI response), each protocol's events shaped by
    its reply (`output.ProtocolReply`); a failure mid-way sends the protocol's error event, so a
    partial reply never looks finished."""

    headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]

    def __init__(self, reply: ProtocolReply, job: Job, events: asyncio.Queue):
        self.reply, self.job, self.events = reply, job, events

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            async for data in self._events(gone):
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke while writing
            pass
        finally:
            gone.cancel()
            self.job.cancel()  # no-op once the job is done; else frees its slot at the next token

    async def _events(self, gone: asyncio.Task):
        reply = self.reply
        for data in reply.opening():
            yield data
        while (event := await _next(self.events, gone)) is not None:
            for data in _handler(reply, event)(event):
                yield data
            if isinstance(event, (Done, Failed)):
                return


def _handler(reply: ProtocolReply, event):
    return {Started: reply.started, Piece: reply.piece, Done: reply.done, Failed: reply.failed}[type(event)]


def create_app(scheduler: Scheduler, served: str, defaults: Defaults, api_key: str | None = None,
               allow_origins: Sequence[str] = ()) -> Starlette:
    """The ASGI app around a started `scheduler` (its model and tokenizer are loaded).

    Long on purpose: the route handlers are closures over one scheduler, key and model name, each
    a few lines; the request and response shapes live in `openai_api`."""
    model, tokenizer = scheduler.model, scheduler.tokenizer
    context, vocab = model.config.max_position_embeddings, model.config.vocab_size
    started = int(time.time())

    store = ResponseStore()

    def check_key(request: HTTPRequest) -> None:
        """The key, as OpenAI's clients send it (Authorization: Bearer) or Anthropic's (x-api-key),
        compared in constant time."""
        if api_key is None:
            return
        bearer = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        header = request.headers.get("x-api-key", "").encode("utf-8", "surrogateescape")
        if not (hmac.compare_digest(bearer, f"Bearer {api_key}".encode()) | hmac.compare_digest(header, api_key.encode())):
            raise APIError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY' "
                                "(or 'x-api-key: KEY')", "authentication_error", code="invalid_api_key")

    async def answer(request: HTTPRequest, req: Request, reply: ProtocolReply) -> Response | EventStream:
        """Queue `req`; stream its reply, or wait for all of it (the client may leave meanwhile)."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(req.prompt, req.max_tokens, req.sampling, req.seed, req.stop,
                  send=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                  grammar=req.grammar, logprobs=req.logprobs, shown=req.shown)
        try:
            scheduler.submit(job)
        except Busy as e:
            raise APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        if req.stream:
            return EventStream(reply, job, events)
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            while (event := await _next(events, gone)) is not None:
                if isinstance(event, Failed):
                    raise APIError(event.status, event.message, "server_error")
                _handler(reply, event)(event)
                if isinstance(event, Done):
                    return JSONResponse(reply.whole())
            return Response(status_code=499)  # the client is gone: nobody reads this
        finally:
            gone.cancel()
            job.cancel()

    async def read(request: HTTPRequest, parse_body, *args):
        """The request's body, checked and parsed by `parse_body` (tokenizing a multi-megabyte
        prompt takes seconds: off the event loop, so /health and the other clients are answered)."""
        check_key(request)
        body = await _read_json(request)
        return await asyncio.to_thread(parse_body, body, *args, tokenizer, served, context, vocab, defaults)

    async def chat_completions(request: HTTPRequest) -> Response | EventStream:
        req = await read(request, parse, True)
        return await answer(request, req, Reply(req, tokenizer.token_bytes))

    async def text_completions(request: HTTPRequest) -> Response | EventStream:
        req = await read(request, parse, False)
        return await answer(request, req, Reply(req, tokenizer.token_bytes))

    async def responses(request: HTTPRequest) -> Response | EventStream:
        asked = await read(request, responses_api.parse, store)
        reply = responses_api.ResponseReply(asked, tokenizer.token_bytes, store)
        if asked.failure is not None:
            return Response(reply.refused(), media_type="text/event-stream")
        return await answer(request, asked.request, reply)

    async def stored_response(request: HTTPRequest) -> Response:
        check_key(request)
        return JSONResponse(store.response(request.path_params["id"]))

    async def messages(request: HTTPRequest) -> Response | EventStream:
        req = await read(request, anthropic_api.parse)
        return await answer(request, req, anthropic_api.MessageReply(req))

    async def count_tokens(request: HTTPRequest) -> Response:
        req = await read(request, anthropic_api.parse_count)
        return JSONResponse({"input_tokens": len(req.prompt)})

    def model_card() -> dict[str, Any]:
        return {"id": served, "object": "model", "created": started, "owned_by": "mlx-mixtral"}

    async def models(request: HTTPRequest) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: HTTPRequest) -> Response:
        check_key(request)
        return JSONResponse(model_card())  # any name is the one model, as for completions

    # The model as Ollama's /api/tags and /api/show describe one (for clients set up that way).
    quantization = model.config.quantization or {}
    ollama_card = {"name": served, "model": served, "modified_at": _iso(started), "size": _weights_bytes(model),
                   "digest": "", "details": {"format": "mlx", "family": "mixtral", "families": ["mixtral"],
                                             "parameter_size": f"{_parameters(model) / 1e9:.1f}B",
                                             "quantization_level": f"Q{quantization['bits']}"
                                             if quantization.get("bits") else "F16"}}

    async def ollama_tags(request: HTTPRequest) -> Response:
        check_key(request)
        return JSONResponse({"models": [ollama_card]})

    async def ollama_show(request: HTTPRequest) -> Response:
        check_key(request)
        card = ollama_card
        return JSONResponse({"modelfile": "", "parameters": "", "template": "", "details": card["details"],
                             "model_info": {"general.architecture": "mixtral",
                                            "mixtral.context_length": context},
                             "capabilities": ["completion", "tools"], "modified_at": card["modified_at"]})

    async def health(request: HTTPRequest) -> Response:
        pool = scheduler.pool
        return JSONResponse({
            "status": "ok", "model": served, "chat_format": scheduler.tokenizer.chat_format.name,
            "tool_calls": tool_syntax(scheduler.tokenizer.chat_format).name,
            "active": scheduler.active is not None,
            "queued": scheduler.queued, **scheduler.counts,
            "prompt_cache": {"conversations": len(pool.entries), "bytes": pool.nbytes, "budget": pool.budget},
        })

    async def api_error(request: HTTPRequest, e: APIError) -> Response:
        """The error in the shape of the protocol the client speaks."""
        if anthropic_api.speaks(request.url.path):
            status, body = anthropic_api.error(e)
            return JSONResponse(body, status_code=status, headers=e.headers)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def http_error(request: HTTPRequest, e: HTTPException) -> Response:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return await api_error(request, APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind))

    async def client_gone(request: HTTPRequest, e: ClientGone) -> Response:
        print(f"note: a client hung up while sending {request.method} {request.url.path}", file=sys.stderr, flush=True)
        return Response(status_code=499)  # nobody reads it

    async def server_error(request: HTTPRequest, e: Exception) -> Response:
        return await api_error(request, APIError(500, incident(e), "server_error"))

    routes = [Route("/health", health, methods=["GET"]),
              Route("/api/tags", ollama_tags, methods=["GET"]),
              Route("/api/show", ollama_show, methods=["POST", "GET"])]
    for prefix in ("/v1", ""):  # clients given the base URL with or without /v1
        routes += [Route(f"{prefix}/chat/completions", chat_completions, methods=["POST"]),
                   Route(f"{prefix}/completions", text_completions, methods=["POST"]),
                   Route(f"{prefix}/models", models, methods=["GET"]),
                   Route(f"{prefix}/models/{{name:path}}", one_model, methods=["GET"]),
                   Route(f"{prefix}/responses", responses, methods=["POST"]),
                   Route(f"{prefix}/responses/{{id}}", stored_response, methods=["GET"]),
                   Route(f"{prefix}/messages", messages, methods=["POST"]),
                   Route(f"{prefix}/messages/count_tokens", count_tokens, methods=["POST"])]
    if "*" in allow_origins:  # asked for by name: any page may call the API
        origins: dict[str, Any] = {"allow_origins": ["*"]}
    else:
        origins = {"allow_origins": list(allow_origins), "allow_origin_regex": LOOPBACK_ORIGINS}
    middleware = [Middleware(CORSMiddleware, **origins, allow_methods=["GET", "POST", "OPTIONS"],
                             allow_headers=["*"], max_age=600)]
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={APIError: api_error, HTTPException: http_error, ClientGone: client_gone,
                                         Exception: server_error})


# --------------------------------------------------------------------------------------------
# The front door
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only); 0.0.0.0 "
                        "lets anyone who can reach this machine use the model")
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--model-name", default=None,
                   help="the model name clients ask for (default: the --model folder's name, or the "
                        "repo id)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API (advised off loopback)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_QUEUE,
                   help="requests that may wait for the model; beyond, 429 (default: %(default)s)")
    p.add_argument("--prompt-cache-size", default=DEFAULT_PROMPT_CACHE, metavar="SIZE",
                   help="memory for the KV state of recent conversations, reused when a client sends "
                        "one again (default: %(default)s; 0 turns it off)")
    add_sampling_args(p, temp=0.7, max_tokens=None)
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://my.app; repeatable; '*' for any) call the "
                        "API from a browser; pages on this machine (localhost, 127.0.0.1, [::1]) always may")
    p.epilog = "Sampling flags set the defaults for requests that leave those fields out."


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails in a second."""
    if not 0 <= port <= 65535:
        raise MixtralError(f"--port must be from 0 to 65535, got {port}")
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # from now on clients queue up (they are answered once uvicorn runs)
    except OSError as e:
        sock.close()
        hint = "pick another with --port" if e.errno in (48, 98) else "check --host"
        raise MixtralError(f"cannot listen on {host}:{port}: {e.strerror or e}; {hint}") from None
    return sock


def _default_name(model: str) -> str:
    """What clients call the model: a local folder's name (`~/models/mixtral-4bit` -> `mixtral-4bit`),
    else the hub repo id as given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _weights_bytes(model) -> int:
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def _parameters(model) -> int:
    """Weights of the float model (packed quantized words hold several each)."""
    bits = (model.config.quantization or {}).get("bits", 32)
    total = 0
    for name, a in tree_flatten(model.parameters()):
        if name.endswith((".scales", ".biases")):
            continue
        total += a.size * (32 // bits if a.dtype == mx.uint32 else 1)
    return total


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    if Starlette is None:
        raise MixtralError("serve needs its HTTP stack: pip install 'mlx-mixtral[serve]' (starlette, uvicorn)")
    if args.api_key is not None and not args.api_key.strip():
        raise MixtralError("--api-key is empty: no client could ever authenticate; give a key, or leave the flag out")
    import uvicorn  # the serve extra: present once Starlette is

    single_process("serve")

    sampling = sampling_from_args(args)
    if args.max_queue < 1:
        raise MixtralError(f"--max-queue must be at least 1, got {args.max_queue}")
    cache_size = 0 if args.prompt_cache_size.strip() == "0" else parse_size(args.prompt_cache_size, "--prompt-cache-size")
    served = args.model_name or _default_name(args.model)
    note = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    sock = _bind(args.host, args.port)

    def load():
        model, tokenizer = load_from_args(args, note)
        return model, tokenizer, PromptPool(model, kv_from_args(args, model.config.head_dim), cache_size)

    # SIGTERM (a service manager, `kill`) stops the server as Ctrl-C does, from the moment the
    # socket listens: noted here, acted on by the server's loop (uvicorn also re-raises the signal it
    # handled once it has shut down; this handler then takes it instead of death by signal).
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    scheduler = Scheduler(load, max_queue=args.max_queue)
    scheduler.start()
    app = create_app(scheduler, served, Defaults(args.max_tokens, sampling, args.seed), args.api_key,
                     args.allow_origin)
    host, port = sock.getsockname()[:2]
    if not _loopback(args.host):
        note(f"warning: listening on {args.host}: anyone who can reach this machine can use the model"
             + ("" if args.api_key else " (no --api-key set)"))
    cached = f"prompt cache {gb(cache_size)}" if cache_size else "no prompt cache"
    note(f"serving {served!r} ({scheduler.pool.format.describe()} KV, {cached}, "
         f"chat format: {scheduler.tokenizer.chat_format.name}) "
         f"at http://{host}:{port}/v1")
    if scheduler.tokenizer.chat_format.kind == "none":
        note(BASE_MODEL_NOTE)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # Ctrl-C: end the replies in flight first
            scheduler.stop()
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:  # a SIGTERM that came before uvicorn listened
            if terminated.is_set() and not self.should_exit:
                self.handle_exit(signal.SIGTERM, None)
            return await super().on_tick(counter)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, access_log=False)
    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: stopping is what it asked
        pass
    finally:
        scheduler.stop(wait=10)  # MLX must not be mid-computation when the interpreter exits
        sock.close()
    note("server stopped")
    return 0
