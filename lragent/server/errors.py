"""OpenAI-style error objects: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status."""

from __future__ import annotations

import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lragent.lora.adapter import AdapterError

log = logging.getLogger("lragent.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the client should see as an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return ErrorResponse(self.body(), status_code=self.status)


class ErrorResponse(JSONResponse):
    """ASCII-only JSON: an error message that quotes odd client text (a lone surrogate) still encodes."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def internal_error(where: str, exc: BaseException | None = None) -> APIError:
    """A 500 that tells the client nothing about the failure (it may hold paths, shapes, values) but a reference
    to find it in the server log, where the traceback goes."""
    ref = uuid.uuid4().hex[:16]
    log.error("internal error %s while serving %s", ref, where, exc_info=exc or True)
    return APIError(500, f"internal server error (reference {ref})", None, "internal_error")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def from_engine_error(exc: Exception, param: str | None = None) -> APIError:
    """Map a validation error raised by `LLMEngine.add_request` / `SamplingParams` / the adapter registry."""
    if isinstance(exc, AdapterError) and str(exc).startswith("unknown adapter"):
        return APIError(404, str(exc), "model", "model_not_found")
    return bad_request(str(exc), param)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


def install_handlers(app: FastAPI, on_error=None) -> None:
    """Every error leaves as an OpenAI error object; `on_error(status)` counts them."""

    def note(status: int) -> None:
        if on_error is not None:
            on_error(status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        note(exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        note(400)
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        note(exc.status_code)
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        note(500)
        return internal_error(request.url.path, exc).response()
