"""Model backends, and the one error hierarchy their third-party exceptions become.

Client libraries raise their own exceptions (aiohttp, tritonclient, asyncio). Backends
translate them at this boundary, so the fallback chain reasons about four kinds of
failure only and never imports a client library.
"""


class BackendError(Exception):
    """The backend answered with an error or could not be reached (counts against it)."""

    reason = "backend_error"
    transient = False


class BackendUnavailable(BackendError):
    """Connection refused or reset before an answer: worth one retry within budget."""

    transient = True


class BackendTimeout(BackendError):
    """No answer within the request's remaining budget."""

    reason = "timeout"


class BackendOverloaded(BackendError):
    """The backend shed the call (queue full, 429/503): never retried."""

    reason = "overloaded"


class BackendRejected(BackendError):
    """The backend refused the request as malformed (4xx): a mapping fault, not ill health."""
