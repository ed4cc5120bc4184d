"""Tracing without servers: which requests are recorded, and the ids every request carries."""

from __future__ import annotations

import logging

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from gateway.logs import CALLER_TRACE_STATE_LOGGER, configure_logging
from gateway.settings import Settings
from gateway.tracing import Tracing, current_trace_id, trace_headers, tracing_from

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def recording(root_sampled: bool) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    root = ALWAYS_ON if root_sampled else ALWAYS_OFF
    provider = TracerProvider(sampler=ParentBased(root=root))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider, records_roots=root_sampled), exporter


def traceparent_parts() -> list[str]:
    return trace_headers()["traceparent"].split("-")


def test_an_unrecorded_request_has_a_trace_and_no_child_spans():
    """Without an exporter a request gets a fresh trace id, passed on, and no span is made."""
    tracing, exporter = recording(root_sampled=False)
    with tracing.request_span("POST /v1/predictions", {}) as server:
        trace_id = current_trace_id()
        with tracing.span("validate"):
            assert current_trace_id() == trace_id
            version, sent_trace, parent, flags = traceparent_parts()
    assert not server.is_recording()
    assert trace_id and len(trace_id) == 32 and trace_id != "0" * 32
    assert (version, sent_trace) == ("00", trace_id)
    assert parent == f"{server.get_span_context().span_id:016x}"  # the server span is the parent
    assert int(flags, 16) & 1 == 0  # not sampled: Triton must not record it either
    assert exporter.get_finished_spans() == ()
    assert current_trace_id() is None  # the context is detached afterwards


def test_a_callers_unsampled_trace_continues_with_its_state():
    """A caller's unsampled traceparent keeps its trace id and tracestate, and stays unsampled."""
    tracing, exporter = recording(root_sampled=True)
    headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-00", "tracestate": "vendor=1"}
    with tracing.request_span("POST /v1/predictions", headers) as server, tracing.span("validate"):
        sent = trace_headers()
    assert not server.is_recording()
    version, trace_id, parent, flags = sent["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "00")
    assert parent != CALLER_SPAN
    assert sent["tracestate"] == "vendor=1"
    assert exporter.get_finished_spans() == ()


def test_a_callers_sampled_trace_is_recorded_with_every_stage():
    """A sampled caller's request is recorded: the server span and its child spans."""
    tracing, exporter = recording(root_sampled=False)
    headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
    with tracing.request_span("POST /v1/predictions", headers) as server, tracing.span("validate"):
        _, trace_id, _, flags = traceparent_parts()
        recorded = server.is_recording()
    assert recorded
    assert (trace_id, flags) == (TRACE_ID, "01")
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"POST /v1/predictions", "validate"}
    assert spans["validate"].parent.span_id == spans["POST /v1/predictions"].context.span_id
    assert f"{spans['POST /v1/predictions'].parent.span_id:016x}" == CALLER_SPAN


def test_with_an_exporter_every_request_is_recorded():
    """With an exporter on, a request without trace context starts a recorded trace."""
    tracing, exporter = recording(root_sampled=True)
    bad_context = {"traceparent": "garbage"}
    with tracing.request_span("POST /v1/predictions", bad_context) as server, tracing.span("cache"):
        recorded = server.is_recording()
    assert recorded
    assert [span.name for span in exporter.get_finished_spans()] == [
        "cache",
        "POST /v1/predictions",
    ]


def test_settings_choose_whether_requests_without_context_are_recorded():
    """The `none` exporter records only sampled callers; `console` records every request."""
    assert tracing_from(Settings(trace_exporter="none")).records_roots is False
    assert tracing_from(Settings(trace_exporter="console")).records_roots is True


def test_a_malformed_tracestate_writes_nothing_of_the_callers_into_the_log(caplog):
    """The member is dropped; the caller's text (here with a newline and a forged field)
    reaches no log record, so no caller can write into the log before authentication."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("info")  # the gateway's own logging, as `aigw serve` sets it up
        root.addHandler(caplog.handler)  # which replaced every handler, the capturing one too
        tracing, _ = recording(root_sampled=False)
        hostile = 'bad key\n{"event":"forged"}=1'
        headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-00", "tracestate": hostile}
        with tracing.request_span("POST /v1/predictions", headers):
            sent = trace_headers()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        logging.getLogger(CALLER_TRACE_STATE_LOGGER).setLevel(logging.NOTSET)
    assert "forged" not in caplog.text
    assert "forged" not in sent.get("tracestate", "")
