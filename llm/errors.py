"""One error hierarchy for the whole service.

Every error a client can cause is a ``ServiceError`` subclass carrying its HTTP status and a short machine
readable ``type``; one Flask handler renders them all as ``{"error": {"message", "type", "status"}}`` (or
OpenAI's shape under ``/v1``), so no endpoint invents its own format.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error that is reported to a client."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        self.param = param

    def to_dict(self) -> dict:
        """The JSON body every endpoint sends for this error."""
        return {"error": {"message": self.message, "type": self.type, "status": self.status}}


class BadRequest(ServiceError):
    status = 400
    type = "invalid_request"


class Unauthorized(ServiceError):
    status = 401
    type = "unauthorized"


class NotFound(ServiceError):
    status = 404
    type = "not_found"


class Gone(ServiceError):
    """Something that existed but is no longer kept (an answer past its resume window)."""

    status = 410
    type = "gone"


class PayloadTooLarge(ServiceError):
    """A prompt or body that cannot fit, even after trimming history."""

    status = 413
    type = "prompt_too_large"


class FileTooLarge(PayloadTooLarge):
    """An upload over a limit: its bytes, pages or passages, or what it would unpack to."""

    type = "file_too_large"


class UnsupportedType(ServiceError):
    """An upload of a kind the service does not read."""

    status = 415
    type = "unsupported_media_type"


class Unprocessable(ServiceError):
    """Well-formed input the service cannot honour (e.g. a schema keyword it cannot enforce)."""

    status = 422
    type = "unsupported"


class TooManyRequests(ServiceError):
    status = 429
    type = "rate_limited"


class Overloaded(ServiceError):
    """Every slot and the whole queue are taken; the client should retry later."""

    status = 503
    type = "overloaded"

    def __init__(self, message: str = "The service is busy; please retry shortly.", retry_after: int = 2):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class TimedOut(ServiceError):
    """An answer that did not finish within LLM_REQUEST_TIMEOUT (usually a saturated engine)."""

    status = 504
    type = "timeout"


class GenerationFailed(ServiceError):
    """The engine could not produce a complete answer (e.g. a JSON value cut off by the token limit)."""

    status = 500
    type = "generation_failed"


class ConfigError(Exception):
    """Bad settings or data files; stops start-up with a message naming the culprit."""


class IncompleteOutput(Unprocessable):
    """Constrained output that ran out of tokens before the value was complete: never sent truncated."""

    type = "incomplete_output"
