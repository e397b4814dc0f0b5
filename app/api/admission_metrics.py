"""Admission control at scrape time: `lamina:admission_rejected_total{reason}` and the
work admitted now (`lamina:admitted_sequences`, `lamina:admitted_tokens`), read from the
controller's own counts, like the connection metrics (app/server/connections.py)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.api.admission import REJECT_REASONS, AdmissionController
from app.metrics import PREFIX


class AdmissionCollector(Collector):
    def __init__(self, model_name: str, controller: AdmissionController) -> None:
        self._model_name = model_name
        self._controller = controller

    def collect(self) -> Iterable[Metric]:
        m, controller = self._model_name, self._controller
        rejected = CounterMetricFamily(
            PREFIX + "admission_rejected",
            "Generation requests refused by admission control, by the bound hit: requests, "
            "sequences, tokens, client_share (429) or too_large (413).",
            labels=["model_name", "reason"],
        )
        for reason in REJECT_REASONS:
            rejected.add_metric([m, reason], controller.rejected[reason])
        yield rejected
        for name, doc, value in (
            ("admitted_sequences", "Sequences of admitted generation requests.",
             controller.num_seqs),
            ("admitted_tokens", "Estimated tokens (prompt + max_tokens per sequence) of "
             "admitted generation requests.", controller.num_tokens),
        ):  # fmt: skip
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric([m], value)
            yield gauge
