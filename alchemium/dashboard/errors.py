"""What the dashboard answers with a 4xx or 503 instead of a page: one exception per kind.

Each carries its HTTP ``status`` and a stable ``code`` (the ``error.code`` of the JSON
API's error body); the message says what was wrong and what was expected::

    AlchemiumError
    └── DashboardError
        ├── DashboardConfigurationError   create_app was called with options that cannot work
        └── DashboardRequestError         a request the dashboard refuses (4xx, 503)
            ├── InvalidParameterError     400: a malformed or unknown query / form parameter
            ├── NotAuthenticatedError     401: no valid token or the auth hook said no
            ├── ActionRefusedError        403: read-only, CSRF token or origin missing/wrong
            ├── UnknownResourceError      404: unknown event, destination, page past the end
            ├── UnsupportedMediaError     415: an API action without a JSON body
            └── UnavailableError          503: database down, tables missing

A change made meanwhile (409) is :class:`alchemium.events.outbox_admin.DeliveryChangedError`.
"""

from __future__ import annotations

from alchemium.errors import AlchemiumError

__all__ = [
    "ActionRefusedError",
    "DashboardConfigurationError",
    "DashboardError",
    "DashboardRequestError",
    "InvalidParameterError",
    "NotAuthenticatedError",
    "UnavailableError",
    "UnknownResourceError",
    "UnsupportedMediaError",
]


class DashboardError(AlchemiumError):
    """Base of the dashboard's errors."""


class DashboardConfigurationError(DashboardError):
    """``create_app`` options that cannot work together (actions without a token, ...)."""


class DashboardRequestError(DashboardError):
    """A request the dashboard refuses; ``status`` is its HTTP status, ``code`` a stable name."""

    status = 400
    code = "bad_request"


class InvalidParameterError(DashboardRequestError):
    """A query or form parameter is malformed or not known to the endpoint."""

    code = "invalid_parameter"

    def __init__(self, parameter: str, problem: str) -> None:
        self.parameter = parameter
        super().__init__(f"parameter {parameter!r}: {problem}")


class NotAuthenticatedError(DashboardRequestError):
    """The request carries no valid token (or the auth hook returned None)."""

    status = 401
    code = "not_authenticated"


class ActionRefusedError(DashboardRequestError):
    """An action the dashboard refuses: read-only, or a CSRF token / origin that fails."""

    status = 403
    code = "forbidden"


class UnknownResourceError(DashboardRequestError):
    """No such event, destination or page."""

    status = 404
    code = "not_found"


class UnsupportedMediaError(DashboardRequestError):
    """An API action whose body is not ``application/json``."""

    status = 415
    code = "unsupported_media_type"


class UnavailableError(DashboardRequestError):
    """The database cannot answer (down, or a table the page needs does not exist)."""

    status = 503
    code = "unavailable"
