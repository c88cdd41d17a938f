"""OpenTelemetry: one tracer provider per process, exported over OTLP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, and W3C trace context carried in NATS
message headers so that one checkout is one trace across services and events.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_provider: TracerProvider | None = None


def configure_tracing(
    service: str, extra_processors: tuple[SpanProcessor, ...] = ()
) -> TracerProvider:
    """Install the process's tracer provider once; later calls add nothing
    but the processors they bring (tests attach an in-memory exporter)."""
    global _provider  # noqa: PLW0603 - the tracer provider is process-wide
    if _provider is None:
        resource = Resource.create(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME", f"cornucopia-{service}"),
                "service.namespace": "cornucopia",
            }
        )
        _provider = TracerProvider(resource=resource)
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        ):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter,
            )

            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(_provider)
    for processor in extra_processors:
        _provider.add_span_processor(processor)
    return _provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.force_flush()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_trace_headers(headers: MutableMapping[str, str], ctx: Context | None = None) -> None:
    """Write ``traceparent`` (and ``tracestate``) of the current or given
    context into a header map."""
    propagate.inject(headers, context=ctx)


def extract_trace_context(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(headers or {}))


def current_traceparent() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context.get_current())
    return carrier
