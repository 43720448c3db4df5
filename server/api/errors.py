"""Errors as TGI answers them: `{"error": message, "error_type": kind}` with TGI's status codes."""
from __future__ import annotations

import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(self, status_code: int, message: str, error_type: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


def validation_error(message: str) -> APIError:
    return APIError(422, f"Input validation error: {message}", "validation")


def overloaded() -> APIError:
    return APIError(429, "Model is overloaded", "overloaded")


def unavailable() -> APIError:
    return APIError(503, "The server is shutting down", "unavailable")


def generation_error(message: str) -> APIError:
    return APIError(424, message, "generation")


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def client_message(error: BaseException) -> str:
    """An exception's text as a client may see it: never a memory address."""
    return _ADDRESS.sub("", str(error))


async def api_error_handler(_request: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code)


async def request_validation_handler(_request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return JSONResponse({"error": "Failed to parse the request body as JSON",
                             "error_type": "validation"}, status_code=400)
    described = []
    for problem in problems[:5]:
        where = ".".join(str(part) for part in problem.get("loc", ())[1:]) or "body"
        described.append(f"`{where}`: {problem.get('msg', 'invalid')}")
    return JSONResponse(validation_error("; ".join(described)).body(), status_code=422)


_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed"}


async def http_error_handler(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (an unreadable body, an unknown route) in TGI's error shape."""
    error_type = _HTTP_ERROR_TYPES.get(error.status_code, "validation")
    return JSONResponse({"error": str(error.detail), "error_type": error_type},
                        status_code=error.status_code, headers=getattr(error, "headers", None))
