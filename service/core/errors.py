"""Domain errors, and the one place that turns them into OpenAI-style HTTP errors.

    PrefloopError                   500 server_error
    ├── InvalidRequestError         400 invalid_request_error   (bad input; names the `param`)
    │   └── PayloadTooLargeError    413 request_too_large
    ├── AuthenticationError         401 authentication_error    (no key, unknown or revoked key)
    ├── PermissionDeniedError       403 permission_error        (the key's role or scope)
    ├── RateLimitError              429 rate_limit_error        (per key; Retry-After)
    ├── NotFoundError               404 not_found_error
    │   └── ModelNotFoundError      404 model_not_found
    ├── ConflictError               409 conflict_error          (clashes with stored state:
    │                                                            a reused idempotency key, a
    │                                                            pair already used in training)
    ├── OverloadedError             503 overloaded              (queue full; Retry-After)
    │   ├── NotReadyError           503 not_ready               (model still loading)
    │   ├── UpstreamUnavailableError 503 upstream_unavailable   (no vLLM replica reachable)
    │   ├── EngineSleepingError     503 engine_sleeping         (vLLM asleep for a refresh)
    │   └── DatabaseUnavailableError 503 database_unavailable   (nothing was stored)
    └── EngineError                 500 engine_error            (generation failed)
        ├── BadGatewayError         502 bad_gateway             (vLLM failed or broke a stream)
        └── GatewayTimeoutError     504 gateway_timeout         (vLLM did not answer in time)

The adapter registry's own errors (`adapters.registry`, which cannot import this module) map to
404 (unknown version), 409 (illegal transition, concurrent change) and 400 (bad adapter).

Code raises these; routes never build error responses themselves and nothing matches error text.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters import registry

log = logging.getLogger(__name__)


class PrefloopError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None
    retry_after_s: int | None = None  # set: the response says when to try again

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str] | None:
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(self.retry_after_s)}


class InvalidRequestError(PrefloopError):
    status_code = 400
    type = "invalid_request_error"


class PayloadTooLargeError(InvalidRequestError):
    status_code = 413
    code = "request_too_large"


class AuthenticationError(PrefloopError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PermissionDeniedError(PrefloopError):
    status_code = 403
    type = "permission_error"


class RateLimitError(PrefloopError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class NotFoundError(PrefloopError):
    status_code = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class ConflictError(PrefloopError):
    status_code = 409
    type = "conflict_error"


class OverloadedError(PrefloopError):
    status_code = 503
    type = "overloaded_error"
    code = "overloaded"
    retry_after_s = 2


class NotReadyError(OverloadedError):
    code = "not_ready"


class DatabaseUnavailableError(OverloadedError):
    code = "database_unavailable"
    retry_after_s = 5


class EngineError(PrefloopError):
    type = "engine_error"


# --- the vLLM engine's upstream failures (service.engines.vllm)
class UpstreamUnavailableError(OverloadedError):
    code = "upstream_unavailable"


class EngineSleepingError(OverloadedError):
    code = "engine_sleeping"
    retry_after_s = 30


class BadGatewayError(EngineError):
    status_code = 502
    code = "bad_gateway"


class GatewayTimeoutError(EngineError):
    status_code = 504
    code = "gateway_timeout"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: PrefloopError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=exc.headers,
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # Union members tagged "type=..." (see `service.api.schemas`) are not part of the field's name.
    loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith("type=")]
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error") or first.get("msg", "")
        return (
            f"the request body is not valid JSON ({why}); send a JSON object with the header "
            "content-type: application/json",
            None,
        )
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    extra = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}" if param else msg) + extra, param


def from_registry_error(exc: registry.RegistryError) -> PrefloopError:
    message = str(exc)
    if isinstance(exc, registry.VersionNotFound):
        return NotFoundError(message, code="adapter_not_found")
    if isinstance(exc, registry.IllegalTransition):
        return ConflictError(message, code="illegal_transition")
    if isinstance(exc, registry.PromotionConflict):
        return ConflictError(message, code="concurrent_change")
    return InvalidRequestError(message)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(registry.RegistryError)
    async def _registry(_req: Request, exc: registry.RegistryError) -> JSONResponse:
        return error_response(from_registry_error(exc))

    @app.exception_handler(PrefloopError)
    async def _prefloop(_req: Request, exc: PrefloopError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("request failed: %s", exc.message)
        return error_response(exc)

    @app.exception_handler(DBAPIError)
    async def _database(_req: Request, exc: DBAPIError) -> JSONResponse:
        # OperationalError (cannot connect, disk I/O, locked too long) and a dropped connection
        # are the database being away, not a bug: 503, and the client may retry. Anything else
        # from the driver (a constraint, a bad statement) is a bug: the 500 below.
        from sqlalchemy.exc import DataError, InterfaceError, OperationalError

        if isinstance(exc, DataError):
            # A value the database cannot hold, e.g. a NUL character (Postgres text refuses it;
            # SQLite stores it): the request's fault, and nothing was stored.
            return error_response(
                InvalidRequestError(
                    f"the database cannot store a value in this request ({exc.orig}); "
                    "remove NUL characters (\\u0000) and retry. Nothing was stored."
                )
            )
        if isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated:
            log.warning("database unavailable: %s", exc.orig)
            return error_response(
                DatabaseUnavailableError(
                    "the database is unavailable; nothing was stored. Retry in a few seconds; "
                    f"operators: check the database ({type(exc.orig).__name__})"
                )
            )
        log.exception("database error")
        return error_response(PrefloopError("internal server error; see the server log"))

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse(
            error_body(detail, type_), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            error_body("internal server error; see the server log", "server_error"),
            status_code=500,
        )
