"""The operations dashboard: the outbox's state on web pages and a JSON API, and its fixes.

::

    from alchemium.dashboard import create_app

    app.mount("/ops", create_app(engine))                       # read-only
    app.mount("/ops", create_app(engine, actions=True, auth=current_operator))

or ``alchemium dashboard --url ... --port 8000`` (binds 127.0.0.1). Pages: overview
(counts per destination, throughput), dead letters (requeue, discard), one event with
its deliveries, blocked aggregates, relays holding leases, the audit log and the
record of operator actions; each also under ``/api/...`` as JSON (docs/dashboard.md).

Needs the ``dashboard`` extra (Starlette and Jinja2; uvicorn for the command):
``pip install 'alchemium[dashboard]'``. Every asset ships in the package: no CDN, no
build step, pages work offline.
"""

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "alchemium.dashboard needs Starlette and Jinja2: pip install 'alchemium[dashboard]'"
    ) from err

from alchemium.dashboard.app import create_app
from alchemium.dashboard.errors import (
    ActionRefusedError,
    DashboardConfigurationError,
    DashboardError,
    DashboardRequestError,
    InvalidParameterError,
    NotAuthenticatedError,
    UnavailableError,
    UnknownResourceError,
    UnsupportedMediaError,
)
from alchemium.dashboard.security import AuthHook

__all__ = [
    "ActionRefusedError",
    "AuthHook",
    "DashboardConfigurationError",
    "DashboardError",
    "DashboardRequestError",
    "InvalidParameterError",
    "NotAuthenticatedError",
    "UnavailableError",
    "UnknownResourceError",
    "UnsupportedMediaError",
    "create_app",
]
