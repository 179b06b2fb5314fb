"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}, with vLLM's type names."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class ClientDisconnected(Exception):
    """The client went away before its response was ready (its requests were aborted): nobody to answer."""


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def describe_validation_error(error: dict) -> tuple[str, str | None]:
    """One pydantic/FastAPI error as (message, param), e.g. ("max_tokens: Input should be a valid integer", ...)."""
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        reason = error.get("ctx", {}).get("error", "malformed JSON")
        return f"the request body is not valid JSON: {reason}", None
    if not loc:
        return f"the request body {error.get('msg', 'is invalid').lower()}", None
    param = ".".join(loc)
    message = f"{param}: {error.get('msg', 'invalid value')}"
    if error.get("type") not in ("missing", "extra_forbidden") and "input" in error:
        shown = repr(error["input"])
        message += f" (got {shown[:80] + '...' if len(shown) > 80 else shown})"
    return message, param


def install_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(ClientDisconnected)
    async def client_disconnected(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        described = [describe_validation_error(error) for error in exc.errors()]
        message = "; ".join(text for text, _ in described)
        return error_response(400, message, described[0][1] if described else None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}")
