"""OpenTelemetry tracing: a span per request and per step, W3C trace context in and out.

A caller's `traceparent` is continued (or a new trace begins), every stage of a request
gets a span (validation, cache, each chain step, each backend call), and the context goes
on to Triton in the `traceparent` header of each inference call. The trace id is put in the
audit record and in log events, so a decision can be found from a trace and the other way.

The exporter is chosen in settings (`AIGW_TRACE_EXPORTER`): `none` (the default: ids are
made and propagated, and only callers' sampled requests are recorded), `console`, or `otlp`
(OTLP over HTTP to `AIGW_OTLP_ENDPOINT`, batched off the request path). Each app has its own
tracer provider.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.settings import Settings

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """The app's tracer, and helpers to continue, record and pass on a trace."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("gateway")

    @contextlib.contextmanager
    def request_span(self, name: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """A server span continuing the caller's trace context, if it sent one."""
        parent = _PROPAGATOR.extract(dict(headers))
        token = otel_context.attach(parent)
        try:
            with self.tracer.start_as_current_span(name, kind=trace.SpanKind.SERVER) as span:
                yield span
        finally:
            otel_context.detach(token)

    def span(self, name: str, **attributes: Any) -> Any:
        """A child span of whatever span is current."""
        return self.tracer.start_as_current_span(name, attributes=attributes or None)

    def shutdown(self) -> None:
        self.provider.shutdown()


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits, or None outside a trace."""
    span_context = trace.get_current_span().get_span_context()
    return f"{span_context.trace_id:032x}" if span_context.is_valid else None


def trace_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate`) for an outgoing call, from the current span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def tracing_from(settings: Settings) -> Tracing:
    # With no exporter, a request is recorded only when its caller sampled it (so its
    # decision travels on); the rest get non-recording spans, which still carry trace ids
    # to Triton, the audit record and the logs, for a fraction of the cost.
    root = ALWAYS_OFF if settings.trace_exporter == "none" else ALWAYS_ON
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(root=root),
    )
    exporter = _exporter(settings)
    if exporter is not None:
        processor = (
            SimpleSpanProcessor(exporter)
            if settings.trace_exporter == "console"
            else BatchSpanProcessor(exporter)
        )
        provider.add_span_processor(processor)
    return Tracing(provider)


def _exporter(settings: Settings) -> SpanExporter | None:
    if settings.trace_exporter == "console":
        return ConsoleSpanExporter()
    if settings.trace_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    return None
