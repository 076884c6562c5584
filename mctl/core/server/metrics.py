"""Prometheus metrics at `/metrics`: queue depth, inputs, latencies, containers per function.

Gauges are read from the control plane when scraped; counters and the latency histogram are updated
as inputs arrive and finish.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mctl.core.server.control import ControlPlane, FunctionState


class Metrics:
    def __init__(self, control: ControlPlane) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.control = control
        self.registry = CollectorRegistry()
        self.received = Counter("mctl_inputs_received", "Inputs submitted", ["app", "function"],
                                registry=self.registry)
        self.finished = Counter("mctl_inputs_finished", "Inputs finished, by final status",
                                ["app", "function", "status"], registry=self.registry)
        self.latency = Histogram("mctl_input_latency_seconds",
                                 "Submission to final output, per input", ["app", "function"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5,
                                          5, 10, 30, 60, 300), registry=self.registry)
        self.registry.register(_StateCollector(control))
        control.metrics = self

    @staticmethod
    def _labels(fs: FunctionState) -> tuple[str, str]:
        return fs.app_id, fs.spec.tag

    def inputs_received(self, fs: FunctionState, n: int) -> None:
        self.received.labels(*self._labels(fs)).inc(n)

    def input_finished(self, fs: FunctionState, status: str, seconds: float) -> None:
        app, function = self._labels(fs)
        self.finished.labels(app, function, status).inc()
        self.latency.labels(app, function).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector:
    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily("mctl_queue_depth", "Inputs waiting for a container",
                                  labels=["app", "function", "function_id"])
        running = GaugeMetricFamily("mctl_inputs_running", "Inputs running in containers",
                                    labels=["app", "function", "function_id"])
        containers = GaugeMetricFamily("mctl_containers", "Connected worker containers",
                                       labels=["app", "function", "function_id"])
        for fid, fs in self.control.functions.items():
            labels = [fs.app_id, fs.spec.tag, fid]
            depth.add_metric(labels, fs.n_pending)
            running.add_metric(labels, fs.running)
            containers.add_metric(labels, len(fs.workers))
        yield depth
        yield running
        yield containers
