"""The FastAPI application: routes, middleware and error handlers over one engine."""
from __future__ import annotations

import json

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.errors import APIError, api_error_handler, http_error_handler, request_validation_handler
from server.api.limits import openapi_with_limits
from server.api.middleware import ApiKeyMiddleware, MethodsMiddleware, PayloadLimitMiddleware
from server.api.openai_routes import OpenAIRoutes
from server.api.openai_schemas import ChatRequest, CompletionRequest
from server.api.settings import ServerSettings
from server.api.state import ServerState
from server.api.streaming import ClientDisconnected
from server.api.tgi_routes import STREAMED, TGIRoutes
from server.api.tgi_schemas import ErrorResponse, GenerateParameters, GenerateRequest, Info
from server.engine.async_engine import AsyncEngine


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="tgi-py", version=settings.version,
                  description="Text Generation Inference's and OpenAI's APIs over a paged-KV engine.")
    state = ServerState(engine, settings)
    app.state.server = state
    tgi, openai = TGIRoutes(state), OpenAIRoutes(state)
    app.include_router(tgi.router())
    app.include_router(openai.router())

    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    # Nobody is left to read an answer; 499 is what the access logs of proxies call this.
    app.add_exception_handler(ClientDisconnected, lambda _request, _error: Response(status_code=499))

    async def health():
        if not engine.is_alive:
            return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
        return Response(status_code=200)

    health_responses = {200: {"description": "The engine runs (empty body)", "content": {}},
                        503: {"model": ErrorResponse, "description": "The engine has stopped"}}
    for path in ("/health", "/ping", "/"):
        app.add_api_route(path, health, methods=["GET"], response_class=Response, responses=health_responses,
                          tags=["Text Generation Inference"], summary="200 while the engine runs")

    @app.get("/info", response_model=Info, tags=["Text Generation Inference"], summary="The served model and limits")
    async def info():
        return {
            "model_id": settings.model_id, "model_sha": settings.model_sha,
            "model_pipeline_tag": "text-generation", "model_dtype": settings.model_dtype,
            "model_device_type": settings.model_device_type,
            "max_concurrent_requests": settings.max_concurrent_requests, "max_best_of": settings.max_best_of,
            "max_stop_sequences": settings.max_stop_sequences, "max_input_tokens": settings.max_input_tokens,
            "max_total_tokens": settings.max_total_tokens, "validation_workers": 1,
            "max_client_batch_size": settings.max_client_batch_size, "router": "text-generation-router",
            "version": settings.version, "sha": None, "docker_label": None,
            "lora_adapters": list(settings.lora_adapters),
        }

    @app.get("/metrics", response_class=PlainTextResponse, tags=["Text Generation Inference"],
             summary="Prometheus metrics")
    async def metrics():
        state.refresh_gauges()
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/invocations", tags=["Text Generation Inference"], responses=STREAMED,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "anyOf": [{"$ref": f"#/components/schemas/{model.__name__}"}
                            for model in (GenerateRequest, ChatRequest, CompletionRequest)]}}}}},
              summary="SageMaker: a generate, chat or completion body, told apart by its fields")
    async def invocations(request: Request, response: Response):
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "Failed to parse the request body as JSON",
                                 "error_type": "validation"}, status_code=400)
        try:
            if isinstance(body, dict) and "messages" in body:
                return await openai.chat(ChatRequest.model_validate(body), request)
            if isinstance(body, dict) and "prompt" in body:
                return await openai.completions(CompletionRequest.model_validate(body), request)
            return await tgi.compat_generate(GenerateRequest.model_validate(body), request, response)
        except ValidationError as error:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None

    publish_limits(app, settings)
    if settings.cors_allow_origin:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_allow_origin),
                           allow_methods=["GET", "POST"], allow_headers=["content-type", "authorization"])
    app.add_middleware(MethodsMiddleware, documented=lambda: app.openapi()["paths"])
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(PayloadLimitMiddleware, limit=settings.payload_limit)
    return app


def publish_limits(app: FastAPI, settings: ServerSettings) -> None:
    """/openapi.json with the bounds the validators enforce (server/api/limits.py)."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_with_limits(
                plain(), [GenerateRequest, GenerateParameters, ChatRequest, CompletionRequest], settings)
        return app.openapi_schema

    app.openapi = openapi
