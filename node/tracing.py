"""OpenTelemetry tracing of client validations (``--trace``).

One span per validation call, with the request id, kind, final status, consensus
sequence and agreeing validators as attributes; the trace id is returned to the client
in the response metadata (``trace_id``) so a slow call can be found in the exported
spans. Exporters: ``stderr`` or a file of JSON spans (one per line) that any
OpenTelemetry collector's file receiver, or ``jq``, can read.
"""

from __future__ import annotations

import sys
from typing import IO

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter


def make_tracer(node_id: str, cluster_id: str, target: str, version: str) -> tuple[trace.Tracer, TracerProvider | None]:
    """``target``: ``off``, ``stderr`` or a file path. A provider per node (not the
    global one), so several nodes in one process keep their spans apart."""
    if target == "off":
        return trace.NoOpTracer(), None
    out: IO[str] = sys.stderr if target == "stderr" else open(target, "a", buffering=1)
    provider = TracerProvider(resource=Resource.create({
        "service.name": "hypermesh-consensus", "service.version": version,
        "hypermesh.node_id": node_id, "hypermesh.cluster_id": cluster_id,
    }))
    exporter = ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    return provider.get_tracer("hypermesh.node"), provider


def trace_id_of(span: trace.Span) -> str | None:
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None
