"""Scraping /metrics the way Prometheus does (real HTTP(S), the text format parsed by prometheus_client)."""

from __future__ import annotations

import ssl
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.serving import ServerThread

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=10, context=context) as reply:
        assert reply.status == 200
        return reply.read().decode()


def samples_of(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(url: str, context: ssl.SSLContext | None = None) -> Samples:
    """Every sample of one scrape, keyed by sample name and label set."""
    return samples_of(scrape_text(url, context))


def families_of(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """Exposed family name (counters with `_total`) -> (type, samples)."""
    out: dict[str, tuple[str, list[Sample]]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = (family.type, family.samples)
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def metrics_url(server: ServerThread, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{server.app.metrics_port}/metrics"
