"""Structured logs: one JSON object per line, with whatever `extra` fields an event carries."""

from __future__ import annotations

import logging
import sys
import time

import orjson

from gateway.tracing import current_trace_id

_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        trace_id = current_trace_id()
        if trace_id is not None:
            event["trace_id"] = trace_id
        event.update((k, v) for k, v in vars(record).items() if k not in _STANDARD_ATTRIBUTES)
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(event, default=str).decode()


CALLER_TRACE_STATE_LOGGER = "opentelemetry.trace.span"


def configure_logging(level: str = "info") -> None:
    """Send every log record, uvicorn's included, to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # OpenTelemetry warns of every malformed `tracestate` member, echoing it: any caller,
    # before authentication, could write its own text into the log on every request. The
    # member is dropped either way; the warning says nothing an operator can act on.
    logging.getLogger(CALLER_TRACE_STATE_LOGGER).setLevel(logging.ERROR)
