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
    """The app's tracer, and helpers to continue, record and pass on a trace.

    A request that will not be recorded (no exporter and no sampled caller, or a caller that
    did not sample it) gets a non-recording server span made here, with the same ids the SDK
    would give it, and no child spans at all: the span machinery per stage (sampler, span
    objects, context attach and detach) is skipped, while the trace id still reaches the
    audit record, the logs and Triton's `traceparent`.
    """

    def __init__(self, provider: TracerProvider, records_roots: bool = True) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("gateway")
        # Whether a request without a caller's trace context is recorded (an exporter is on).
        self.records_roots = records_roots
        self._ids = provider.id_generator
        self._random_ids = self._ids.is_trace_id_random()

    @contextlib.contextmanager
    def request_span(self, name: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """A server span continuing the caller's trace context, if it sent one."""
        span, token = self.start_request(name, headers)
        try:
            if span is None:
                with self.tracer.start_as_current_span(name, kind=trace.SpanKind.SERVER) as span:
                    yield span
            else:
                yield span
        finally:
            otel_context.detach(token)

    def start_request(self, name: str, headers: Mapping[str, str]) -> tuple[Any, object]:
        """Attach the caller's context; with it, the unrecorded server span (None: record one).

        The caller detaches the returned token when the request ends."""
        remote = None
        if "traceparent" in headers:
            parent = _PROPAGATOR.extract(headers)
            remote = trace.get_current_span(parent).get_span_context()
            if not remote.is_valid:
                remote = None  # a malformed traceparent: a new trace begins
            elif remote.trace_flags.sampled:
                return None, otel_context.attach(parent)
        if remote is None and self.records_roots:
            return None, otel_context.attach(otel_context.Context())
        span = trace.NonRecordingSpan(self._unrecorded(remote))
        return span, otel_context.attach(trace.set_span_in_context(span, otel_context.Context()))

    def _unrecorded(self, remote: trace.SpanContext | None) -> trace.SpanContext:
        """What the SDK's ParentBased sampler gives an unsampled server span, made directly."""
        if remote is not None:
            trace_id, state = remote.trace_id, remote.trace_state
            random_id = remote.trace_flags.random_trace_id
        else:
            trace_id, state, random_id = self._ids.generate_trace_id(), None, self._random_ids
        flags = trace.TraceFlags(trace.TraceFlags.RANDOM_TRACE_ID if random_id else 0)
        return trace.SpanContext(
            trace_id, self._ids.generate_span_id(), is_remote=False, trace_flags=flags,
            trace_state=state,
        )  # fmt: skip

    def span(self, name: str, **attributes: Any) -> Any:
        """A child span of whatever span is current; none at all under an unrecorded one."""
        if not trace.get_current_span().is_recording():
            return _NO_SPAN
        return self.tracer.start_as_current_span(name, attributes=attributes or None)

    def shutdown(self) -> None:
        self.provider.shutdown()


_NO_SPAN = contextlib.nullcontext()


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
    return Tracing(provider, records_roots=root is ALWAYS_ON)


def _exporter(settings: Settings) -> SpanExporter | None:
    if settings.trace_exporter == "console":
        return ConsoleSpanExporter()
    if settings.trace_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    return None
