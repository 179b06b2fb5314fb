"""The FastAPI app: OpenAI routes, vLLM's utility routes (/health, /metrics, /tokenize, ...), middleware, lifespan."""
from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from mixquant import __version__
from mixquant.engine.llm_engine import LLMEngine
from mixquant.server.async_engine import AsyncEngine
from mixquant.server.chat import ChatEndpoint, render_chat
from mixquant.server.completions import CompletionsEndpoint
from mixquant.server.config import ServerConfig
from mixquant.server.errors import bad_request, error_response, install_error_handlers
from mixquant.server.metrics import ServerMetrics
from mixquant.server.middleware import APIKeyMiddleware, RequestBodyMiddleware
from mixquant.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ResponsesRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from mixquant.server.responses import ResponsesEndpoint, ResponseStore
from mixquant.server.serving import ServingContext


def build_app(engine: LLMEngine, config: ServerConfig) -> FastAPI:
    """An app serving `engine`; the engine thread starts with the app's lifespan and stops with it."""
    metrics = ServerMetrics(config.served_model_names[0], engine.max_model_len)
    async_engine = AsyncEngine(engine, metrics, config.max_pending_requests)
    metrics.watch_engine(lambda: async_engine.stats, engine.config.describe_precisions())
    ctx = ServingContext(async_engine, config, engine.tokenizer, engine.max_model_len)
    completions = CompletionsEndpoint(ctx)
    chat = ChatEndpoint(ctx)
    responses = ResponsesEndpoint(ctx, chat, ResponseStore(config.max_stored_responses))
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown()
            engine.shutdown()

    app = FastAPI(title="mixquant", version=__version__, lifespan=lifespan)
    app.state.engine = async_engine
    app.state.metrics = metrics
    install_error_handlers(app)
    # The last middleware added runs first: the key is checked before a large body is read.
    app.add_middleware(RequestBodyMiddleware, max_bytes=config.max_request_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)

    @app.get("/health")
    async def health() -> Response:
        if async_engine.dead_error is not None:
            return error_response(503, str(async_engine.dead_error))
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__, "mixquant": engine.config.describe_precisions()}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=started, root=config.model_path,
                                         max_model_len=engine.max_model_len,
                                         mixquant=engine.config.describe_precisions())
                               for name in config.served_model_names])

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, http_request: Request) -> Response:
        return await completions(request, http_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, http_request: Request) -> Response:
        return await chat(request, http_request)

    @app.post("/v1/responses")
    async def create_response(request: ResponsesRequest, http_request: Request) -> Response:
        return await responses.create(request, http_request)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> Response:
        return responses.retrieve(response_id)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        ctx.model_name(request.model)
        if request.messages is not None:
            template_kwargs = {**config.default_chat_template_kwargs, **(request.chat_template_kwargs or {})}
            text = render_chat(ctx, request.messages, request.tools, template_kwargs, request.add_generation_prompt)
            add_special_tokens = bool(request.add_special_tokens)  # the template wrote the special tokens already
        else:
            text = request.prompt
            add_special_tokens = request.add_special_tokens is not False
        ids = engine.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                                token_strs=engine.tokenizer.convert_ids_to_tokens(ids)
                                if request.return_token_strs else None)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        ctx.model_name(request.model)
        vocab = len(engine.tokenizer)
        bad = [token for token in request.tokens if not 0 <= token < vocab]
        if bad:
            raise bad_request(f"tokens must be ids in [0, {vocab}), got {bad[:5]}", "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(request.tokens))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> TokenizerInfo:
        tokenizer = engine.tokenizer
        return TokenizerInfo(tokenizer_class=type(tokenizer).__name__, eos_token=tokenizer.eos_token,
                             bos_token=tokenizer.bos_token, pad_token=tokenizer.pad_token,
                             chat_template=config.chat_template or tokenizer.chat_template,
                             model_max_length=engine.max_model_len, vocab_size=len(tokenizer))

    return app
