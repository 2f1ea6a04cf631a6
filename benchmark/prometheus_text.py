"""A server's Prometheus text format, read into samples: what the sharding benchmark and the tests scrape.

Samples are keyed by (name, labels) with labels as a frozenset of (label, value) pairs; `value` sums
the samples of a name whose labels include the given ones (so `value(s, "x", method="decode")` reads
one series, and `value(s, "x")` adds up every series of "x").
"""
from __future__ import annotations

import re

Samples = dict[tuple[str, frozenset], float]  # (name, {(label, value), ...}) -> value
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$", re.M)
TYPE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_samples(text: str) -> tuple[Samples, dict[str, str]]:
    """(samples keyed by (name, labels), family name -> type) of one scrape's text."""
    samples = {}
    for match in SAMPLE.finditer(text):
        labels = frozenset(LABEL.findall(match["labels"] or ""))
        samples[(match["name"], labels)] = float(match["value"])
    return samples, dict(TYPE.findall(text))


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)
