"""TGI's error envelope `{"error": ..., "error_type": ...}`, its status codes, the one mapping from
an exception during a request to its answer (`api_error`), and the handlers that make every other
failure (bad JSON, wrong types, bugs outside a request's lifecycle) answer in that envelope."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from tgserve.api.shared.sse import sse_data
from tgserve.api.shared.validation import ValidationError
from tgserve.core.errors import EngineStopped, GenerationError, RequestRejected

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered in TGI's envelope; `status_code` is what a non-streaming route returns."""

    def __init__(self, status_code: int, error_type: str, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.message = message

    def body(self) -> dict[str, str]:
        """The envelope, as JSON-ready dict."""
        return {"error": self.message, "error_type": self.error_type}

    def sse_event(self) -> bytes:
        """The envelope as one SSE event, the way TGI reports errors inside a stream."""
        return sse_data(self.body())


class ClientDisconnected(ApiError):
    """The client hung up before its answer was ready; the answer goes nowhere (nginx's 499)."""

    def __init__(self) -> None:
        super().__init__(499, "dropped", "Client disconnected")


def validation_error(error: ValidationError | str) -> ApiError:
    """422 "validation", with TGI's "Input validation error: " prefix."""
    return ApiError(422, "validation", f"Input validation error: {error}")


def overloaded_error() -> ApiError:
    """429 "overloaded": more than --max-concurrent-requests in flight."""
    return ApiError(429, "overloaded", "Model is overloaded")


def generation_error(message: str) -> ApiError:
    """424 "generation": the engine failed this request."""
    return ApiError(424, "generation", f"Request failed during generation: {message}")


def shutting_down_error() -> ApiError:
    """503: the server is draining after SIGTERM and takes no new requests."""
    return ApiError(503, "unhealthy", "The server is shutting down")


def incomplete_generation_error(is_stream: bool) -> ApiError:
    """500: the engine's event stream ended without a finished token."""
    if is_stream:
        return ApiError(500, "incomplete_generation_stream", "Incomplete generation stream")
    return ApiError(500, "incomplete_generation", "Incomplete generation")


def internal_error(error: BaseException) -> ApiError:
    """500 "internal": a bug in tgserve (TGI has no status for it); the traceback goes to the log."""
    return ApiError(500, "internal", f"Internal server error: {error!r}")


def api_error(error: Exception) -> ApiError:
    """The answer to `error`, raised while serving a request: the only place exceptions get a status.

    422 only for what the client caused (the API's own `ValidationError`, the engine's typed
    `RequestRejected`); 424 for the engine's `GenerationError`; 503 while draining. Anything else,
    a `ValueError` included, is a bug: logged with its traceback and answered 500.
    """
    if isinstance(error, ApiError):
        return error
    if isinstance(error, (ValidationError, RequestRejected)):
        return validation_error(str(error))
    if isinstance(error, GenerationError):
        return generation_error(str(error))
    if isinstance(error, EngineStopped):
        return shutting_down_error()
    logger.error("unexpected error while serving a request", exc_info=error)
    return internal_error(error)


def envelope_response(error: ApiError) -> JSONResponse:
    """The JSON response for `error`."""
    return JSONResponse(error.body(), status_code=error.status_code)


def _describe_request_error(exc: RequestValidationError) -> str:
    """One line naming the first offending field, like axum's Json rejection does."""
    errors = exc.errors()
    if not errors:
        return "Failed to deserialize the JSON body into the target type"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"Failed to parse the request body as JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    location = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    where = f"{location}: " if location else ""
    return f"Failed to deserialize the JSON body into the target type: {where}{first['msg']}"


def install_error_handlers(app: FastAPI) -> None:
    """Route every error path to the TGI envelope."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return envelope_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        return envelope_response(validation_error(_describe_request_error(exc)))

    @app.exception_handler(HTTPException)
    async def _undecodable_body(request: Request, exc: HTTPException) -> Response:
        # FastAPI answers a body that is not UTF-8 or nests too deep with a bare 400; make it the
        # same 422 as malformed JSON. Other HTTP errors (404, 405) keep FastAPI's answer.
        if exc.status_code == 400 and exc.__cause__ is not None:
            return envelope_response(validation_error(f"Failed to parse the request body as JSON: {exc.__cause__}"))
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return envelope_response(internal_error(exc))
