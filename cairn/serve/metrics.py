"""Counters for Prometheus' text format (written by hand: four metric families do not
need a client library).

Labelled by repository (``/alice/laptop``), method and status: requests, errors
(status ≥ 400), bytes received and bytes sent.
"""

from __future__ import annotations

from collections import Counter

_HELP = {
    "cairn_serve_requests_total": "HTTP requests answered, by repository, method and status.",
    "cairn_serve_errors_total": "Requests answered with a status of 400 or more.",
    "cairn_serve_received_bytes_total": "Object bytes stored, by repository and kind.",
    "cairn_serve_sent_bytes_total": "Object bytes sent, by repository and kind.",
}


class Metrics:
    """In-memory counters; one server process, no persistence."""

    def __init__(self) -> None:
        self._counters: dict[str, Counter[tuple[tuple[str, str], ...]]] = {
            name: Counter() for name in _HELP
        }

    def request(
        self, repo: str, method: str, status: int, kind: str, sent: int, received: int
    ) -> None:
        """Count one answered request."""
        self._counters["cairn_serve_requests_total"][
            (("repo", repo), ("method", method), ("status", str(status)))
        ] += 1
        if status >= 400:
            self._counters["cairn_serve_errors_total"][
                (("repo", repo), ("status", str(status)))
            ] += 1
        if received:
            self._counters["cairn_serve_received_bytes_total"][
                (("repo", repo), ("kind", kind))
            ] += received
        if sent:
            self._counters["cairn_serve_sent_bytes_total"][(("repo", repo), ("kind", kind))] += sent

    def render(self) -> str:
        """The exposition text (``text/plain; version=0.0.4``)."""
        lines = []
        for name, help_text in _HELP.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} counter")
            for labels, value in sorted(self._counters[name].items()):
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{name}{{{text}}} {value}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
