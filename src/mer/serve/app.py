"""`mer serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over one scheduler.

Requests are validated and tokenized on the event loop, then handed to the
continuous-batching scheduler, whose engine thread runs every forward pass;
its outputs (token ids) come back to the request's coroutine through an asyncio
queue, where `TextStream` turns them into text and cuts it at a stop string, as
`Model.generate` does: the request is then cancelled. A client that goes away
cancels its request too, which frees its sequence and KV blocks at the next step.

Liveness: `/health` answers 503 with the reason while the scheduler is dead or
stuck (`Scheduler.health`), and generation requests get a 503 then. Should the
engine thread die, every waiting client gets an error and `serve` stops the
server and raises, so `mer serve` exits 1 and a supervisor can restart it (a
fresh process rather than a restarted thread: the state a bug left is not
trusted). Anything unexpected in a request is an OpenAI-shaped 500, never a
plain-text one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from mer.api import Model
from mer.engine.sampling import InvalidSamplingParam
from mer.engine.scheduler import Output, Scheduler, SchedulerDown
from mer.engine.scheduler import Request as EngineRequest
from mer.engine.steering import Steering, TokenLogprob
from mer.engine.text import TextStream
from mer.errors import BudgetError, ConfigError, MerError
from mer.grammar import GrammarError, Grammars
from mer.serve import protocol
from mer.serve import tools as wire_tools
from mer.serve.metrics import render_metrics
from mer.serve.protocol import ApiError, GenerationRequest
from mer.tool_syntax import syntax_for


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_concurrent: int = 64  # requests admitted at once (running and queued)
    max_request_bytes: int = 1 << 20


class Server:
    def __init__(self, model: Model, scheduler: Scheduler, settings: ServerSettings) -> None:
        self.model, self.scheduler, self.settings = model, scheduler, settings
        self.started = int(time.time())
        self.http_errors = 0
        self._grammars: Grammars | None = None  # built on the first constrained request

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{name:path}", self.model_info, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        handlers = {404: self.not_found, 405: self.bad_method, Exception: self.internal_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # ---- plain endpoints ----

    async def health(self, request: Request) -> Response:
        if (reason := self.scheduler.health()) is not None:
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        if err := self._auth_error(request):
            return err
        text = render_metrics(self.model, self.scheduler, self.http_errors)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        if err := self._auth_error(request):
            return err
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: Request) -> Response:
        if err := self._auth_error(request):
            return err
        if request.path_params["name"] != self.settings.model_name:
            return self._error(self._unknown_model(request.path_params["name"]))
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {
            "id": self.settings.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "mer",
            "max_model_len": self.model.config.max_position_embeddings,
        }

    async def not_found(self, request: Request, exc) -> Response:
        return self._error(ApiError(404, f"no route {request.url.path}", code="not_found"))

    async def bad_method(self, request: Request, exc) -> Response:
        return self._error(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    async def internal_error(self, request: Request, exc: Exception) -> Response:
        """A bug: still an OpenAI-shaped answer, and the server goes on."""
        message = f"internal error: {type(exc).__name__}: {exc}"
        return self._error(ApiError(500, message, type="server_error"))

    # ---- generation ----

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, protocol.parse_chat, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, protocol.parse_completion, chat=False)

    async def _generate(self, request: Request, parse, chat: bool) -> Response:
        try:
            self._authorize(request)
            body = protocol.parse_json(await self._read_body(request))
            req = parse(body)
            if req.model != self.settings.model_name:
                raise self._unknown_model(req.model)
            tools = self._tools(body, req) if chat else None
            prompt = self._prompt_ids(req, tools)
            constraint = await self._constraint(req, tools)
            if (reason := self.scheduler.health()) is not None:
                raise ApiError(503, reason, type="server_error")
            if self.scheduler.n_running + self.scheduler.n_waiting >= self.settings.max_concurrent:
                raise ApiError(
                    429,
                    f"server is at its limit of {self.settings.max_concurrent} concurrent "
                    "requests; retry later",
                    type="rate_limit_error",
                )
            calling = tools is not None and tools.choice != "none"
            # Tool-call markers may be special tokens: the parser sees them, the user not.
            engine_req, outputs, text = self._submit(req, prompt, constraint, calling)
            if req.echo:  # the prompt's text (and logprobs) come before the first tokens
                text.echo = req.prompt if isinstance(req.prompt, str) else self._decode(prompt)
                text.prompt = prompt
            if calling:
                syntax = syntax_for(self.model.chat_template.source, self.model.config.model_type)
                clean = self.model.tokenizer.strip_special
                text.tools = wire_tools.ToolStream(syntax, tools.parallel, clean)
        except ApiError as e:
            return self._error(e)
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            events = self._stream(rid, req, chat, engine_req, outputs, text)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            return await self._complete(request, rid, chat, engine_req, outputs, text)
        finally:  # ended at a stop string, or failed here: the engine need not go on
            engine_req.cancel()

    def _tools(self, body: dict, req: GenerationRequest) -> wire_tools.ToolRequest | None:
        """The request's tools, with the tool-call history added to its messages."""
        tools = wire_tools.parse_tools(body)
        wire_tools.add_history(body["messages"], req.messages)
        return tools

    def _prompt_ids(
        self, req: GenerationRequest, tools: wire_tools.ToolRequest | None = None
    ) -> list[int]:
        try:
            if req.messages is not None:
                listed = tools.template_tools() if tools is not None else None
                if listed and not self.model.chat_template.takes_tools:
                    raise ApiError(
                        400, "this model's chat template does not take tools", param="tools"
                    )
                if listed:
                    return self.model.chat_prompt(req.messages, tools=listed)
                return self.model.chat_prompt(req.messages)
            if isinstance(req.prompt, list):
                vocab = self.model.config.vocab_size
                if not all(0 <= t < vocab for t in req.prompt):
                    raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
                return req.prompt
            return self.model.tokenizer.encode(req.prompt)
        except ConfigError as e:
            raise ApiError(400, str(e), param="messages") from None

    async def _constraint(self, req: GenerationRequest, tools=None):
        """The request's output constraint (a compiled grammar), or None."""
        forced = tools.forced if tools is not None else None
        if forced is not None and req.json_output:
            raise ApiError(
                400,
                "response_format cannot be combined with a forced tool call (tool_choice "
                f"{tools.choice!r})",
                param="response_format",
            )
        if not req.json_output and forced is None:
            return None
        if self._grammars is None:  # seconds for a large vocabulary: off the event loop
            model = self.model
            self._grammars = await asyncio.to_thread(
                Grammars,
                model.store.path / "tokenizer.json",
                model.config.vocab_size,
                tuple(model.config.eos_token_ids),
            )
        if forced is not None:
            syntax = syntax_for(self.model.chat_template.source, self.model.config.model_type)
            source = syntax.grammar(forced, tools.parallel, self.model.tokenizer.special_tokens)
            if source is None:
                raise ApiError(
                    400,
                    f"tool_choice {tools.choice!r} cannot be forced in the {syntax.name} "
                    "tool-call syntax" + (" with parallel_tool_calls" if tools.parallel else ""),
                    param="tool_choice",
                )
            try:
                return self._grammars.constraint(self._grammars.lark(source))
            except GrammarError as e:
                raise ApiError(400, str(e), param="tools") from None
        try:
            return self._grammars.constraint(self._grammars.json_schema(req.json_schema))
        except GrammarError as e:
            raise ApiError(400, str(e), param="response_format") from None

    def _submit(
        self, req: GenerationRequest, prompt: list[int], constraint=None, keep_special=False
    ):
        context = self.model.config.max_position_embeddings
        room = min(context, self.scheduler.pool.n_blocks * self.scheduler.pool.block_size)
        if len(prompt) >= context:
            raise ApiError(
                400,
                f"prompt of {len(prompt)} tokens does not fit the context of {context} tokens",
                param="messages" if req.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else max(room - len(prompt), 1)
        try:
            params = self.model.sampling_params(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=req.seed,
            )
        except InvalidSamplingParam as e:
            raise ApiError(400, str(e), param=e.param) from None
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()

        def deliver(out: Output) -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, out)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                engine_req.cancel()

        stream = TextStream(self.model.tokenizer, req.stop, params.stop_token_ids, keep_special)
        text = _Text(stream, asked_logprobs=req.logprobs is not None)
        steering = None
        if req.logprobs is not None or constraint is not None:
            steering = Steering(constraint, req.logprobs)
        engine_req = EngineRequest(
            prompt,
            params,
            on_output=deliver,
            steering=steering,
            prompt_logprobs=req.logprobs if req.echo else None,
        )
        try:
            self.scheduler.submit(engine_req)
        except (ConfigError, BudgetError) as e:
            raise ApiError(
                400, str(e), param="max_tokens", code="context_length_exceeded"
            ) from None
        except SchedulerDown as e:
            raise ApiError(503, str(e), type="server_error") from None
        return engine_req, outputs, text

    async def _complete(self, request, rid, chat, engine_req, outputs, text) -> Response:
        collect = asyncio.ensure_future(_collect(outputs, text))
        gone = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if collect not in done:
            collect.cancel()
            return Response(status_code=499)
        gone.cancel()
        completion, reason, last = collect.result()
        if reason == "error":
            return self._error(
                ApiError(500, last.error or "generation failed", type="server_error")
            )
        use = protocol.usage(last.prompt_tokens, text.tokens, last.cached_tokens)
        choice = {"index": 0, "finish_reason": reason, "logprobs": self._logprobs(text, chat, 0)}
        if chat:
            choice["message"] = {"role": "assistant", "content": completion}
            if text.tools is not None:
                content = text.tools.push(completion)
                rest, calls = text.tools.finish()
                choice["message"]["content"] = (content + rest) or None
                if calls:
                    choice["message"]["tool_calls"] = wire_tools.openai_calls(calls)
                    choice["finish_reason"] = "tool_calls" if reason == "stop" else reason
            kind = "chat.completion"
        else:
            choice["text"] = completion
            kind = "text_completion"
        return JSONResponse(
            {
                "id": rid,
                "object": kind,
                "created": int(time.time()),
                "model": self.settings.model_name,
                "choices": [choice],
                "usage": use,
            }
        )

    async def _stream(self, rid, req: GenerationRequest, chat: bool, engine_req, outputs, text):
        name, sent = self.settings.model_name, 0
        try:
            if chat:
                yield _sse(
                    protocol.chat_chunk(rid, name, {"role": "assistant", "content": ""}, None)
                )
            while True:
                out = await outputs.get()
                try:
                    piece, reason = text.add(out)
                except Exception as e:  # a decoding fault: this request's, as the engine's are
                    out, reason = Output([], "error", f"{type(e).__name__}: {e}"), "error"
                if reason == "error":
                    yield _sse(ApiError(500, out.error or "failed", type="server_error").body())
                    break
                if piece or reason or text.logprobs:
                    logprobs = self._logprobs(text, chat, sent)
                    sent += len(piece)
                    if chat:
                        delta, calls = _tool_delta(text, piece, reason)
                        if calls:  # content first, then the calls, then why it ended
                            if delta:
                                yield _sse(protocol.chat_chunk(rid, name, delta, None))
                            yield _sse(protocol.chat_chunk(rid, name, {"tool_calls": calls}, None))
                            delta, reason = {}, "tool_calls" if reason == "stop" else reason
                        chunk = protocol.chat_chunk(rid, name, delta, reason)
                        chunk["choices"][0]["logprobs"] = logprobs
                        yield _sse(chunk)
                    else:
                        yield _sse(protocol.completion_chunk(rid, name, piece, reason, logprobs))
                if reason:
                    if req.include_usage:
                        chunk = (
                            protocol.chat_chunk(rid, name, {}, None)
                            if chat
                            else (protocol.completion_chunk(rid, name, "", None))
                        )
                        chunk["choices"] = []
                        chunk["usage"] = protocol.usage(
                            out.prompt_tokens, text.tokens, out.cached_tokens
                        )
                        yield _sse(chunk)
                    break
            yield "data: [DONE]\n\n"
        finally:  # normal end, a stop string, or the client went away (the generator is closed)
            engine_req.cancel()

    # ---- helpers ----

    def _logprobs(self, text: _Text, chat: bool, offset: int) -> dict | None:
        """The logprobs of the tokens `text` consumed since the last call, OpenAI-shaped,
        or None when the request asked for none."""
        if not text.asked_logprobs:
            return None
        entries, text.logprobs = text.logprobs, []
        token_text = self._token_text
        if chat:
            return protocol.chat_logprobs(entries, token_text)
        return protocol.completion_logprobs(entries, token_text, offset)

    def _token_text(self, token: int) -> str:
        return self.model.tokenizer.decode([token])

    def _decode(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _auth_error(self, request: Request) -> Response | None:
        try:
            self._authorize(request)
        except ApiError as e:
            return self._error(e)
        return None

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "invalid or missing API key", code="invalid_api_key")

    def _unknown_model(self, name: str) -> ApiError:
        return ApiError(
            404,
            f"model {name!r} does not exist; this server serves {self.settings.model_name!r}",
            param="model",
            code="model_not_found",
        )

    def _error(self, e: ApiError) -> Response:
        self.http_errors += 1
        return JSONResponse(e.body(), status_code=e.status)


class _Text:
    """One request's engine outputs as text, cut at its stop strings; `tokens` counts the
    generated tokens up to the one that ended the text (the engine, which knows no text,
    goes on until the request is cancelled)."""

    def __init__(self, stream: TextStream, asked_logprobs: bool = False) -> None:
        self.stream, self.tokens = stream, 0
        self.asked_logprobs = asked_logprobs
        self.tools: wire_tools.ToolStream | None = None  # set when tool calls are parsed
        self.logprobs: list = []  # `TokenLogprob`s of the tokens counted, not yet sent
        self.echo: str | None = None  # the prompt's text, when a completion asked it back
        self.prompt: list[int] = []  # ... and its token ids, for its logprobs

    def add(self, out: Output) -> tuple[str, str | None]:
        """The text `out` adds, and the completion's finish reason once it has ended."""
        if out.finish_reason == "error":
            return "", "error"
        stream, pieces = self.stream, []
        if self.echo is not None:  # the first output: the prompt comes first
            pieces.append(self.echo)
            if self.asked_logprobs:  # nothing predicts the first prompt token: null
                first = TokenLogprob(self.prompt[0], None, None)
                self.logprobs += [first, *(out.prompt_logprobs or [])]
            self.echo = None
        for i, token in enumerate(out.token_ids):
            if stream.finish_reason is not None:
                break
            self.tokens += 1
            if out.logprobs:
                self.logprobs.append(out.logprobs[i])
            pieces.append(stream.push(token))
        if stream.finish_reason is None and out.finish_reason is not None:
            pieces.append(stream.finish(out.finish_reason))  # the held-back text, if any
        return "".join(pieces), stream.finish_reason


def _tool_delta(text: _Text, piece: str, reason: str | None) -> tuple[dict, list[dict]]:
    """A chat chunk's content delta, with tool calls held back; at the end, the calls."""
    if text.tools is None:
        return ({"content": piece} if piece else {}), []
    piece = text.tools.push(piece)
    calls = []
    if reason is not None:
        rest, found = text.tools.finish()
        piece += rest
        calls = wire_tools.openai_calls(found, stream=True)
    return ({"content": piece} if piece else {}), calls


async def _collect(outputs: asyncio.Queue, text: _Text) -> tuple[str, str, Output]:
    """The whole completion, why it ended, and the last engine output read."""
    pieces = []
    while True:
        out = await outputs.get()
        piece, reason = text.add(out)
        pieces.append(piece)
        if reason is not None:
            return "".join(pieces), reason, out


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def serve(
    model: Model,
    scheduler: Scheduler,
    settings: ServerSettings,
    host: str,
    port: int,
    announce: Callable[[str], None] = lambda url: None,
):
    """Run until interrupted; the scheduler and model are closed on the way out. The socket
    is bound first, so `announce` gets the real address (port 0 picks a free one)."""
    import uvicorn

    server = Server(model, scheduler, settings)
    try:
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.create_server((host, port), family=family)
        except OSError as e:
            raise MerError(f"cannot serve on {host}:{port}: {e}") from None
        bound = sock.getsockname()[1]
        announce(f"http://{host}:{bound}/v1")
        config = uvicorn.Config(server.app(), log_level="warning", access_log=False)
        http = uvicorn.Server(config)

        def stop_when_the_engine_stops() -> None:
            scheduler.stopped.wait()
            http.should_exit = True  # in-flight requests, already failed, still get answers

        threading.Thread(target=stop_when_the_engine_stops, daemon=True).start()
        try:
            http.run(sockets=[sock])
        except (OSError, SystemExit) as e:
            raise MerError(f"cannot serve on {host}:{bound}: {e}") from None
        finally:
            sock.close()
    finally:
        scheduler.close()
        model.close()
    if scheduler.died is not None:
        raise MerError(f"the scheduler thread died ({scheduler.died}); the server stopped")
