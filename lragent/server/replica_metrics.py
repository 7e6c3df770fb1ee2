"""/metrics over data-parallel replicas: each replica's Prometheus text with a `replica` label, and the sum of all.

The aggregated view keeps the single-server metric names and labels, so a dashboard built for one `lragent serve`
reads a replicated one unchanged; counters, gauges and histogram buckets/sums/counts add up across replicas.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families


def _families(text: str) -> list:
    return list(text_string_to_metric_families(text))


def _value(v: float) -> str:
    return repr(float(v)) if v != int(v) or abs(v) >= 1e15 else f"{int(v)}.0"


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    esc = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, esc, strict=True)) + "}"


def _render(families: dict[str, tuple[str, str, dict[tuple[str, tuple], float]]]) -> str:
    """name -> (type, help, {(sample name, sorted labels): value}) as Prometheus text."""
    out = []
    for name, (kind, doc, samples) in families.items():
        out.append(f"# HELP {name} {doc}")
        out.append(f"# TYPE {name} {kind}")
        out += [f"{s}{_labels(dict(labels))} {_value(v)}" for (s, labels), v in samples.items()]
    return "\n".join(out) + "\n"


def per_replica(texts: Mapping[str, str]) -> str:
    """Every replica's series with a `replica` label (replica id -> its /metrics text)."""
    merged: dict[str, tuple[str, str, dict]] = {}
    for replica, text in sorted(texts.items()):
        for fam in _families(text):
            _, _, samples = merged.setdefault(fam.name, (fam.type, fam.documentation, {}))
            for s in fam.samples:
                labels = tuple(sorted({**s.labels, "replica": replica}.items()))
                samples[(s.name, labels)] = s.value
    return _render(merged)


def aggregated(texts: Mapping[str, str]) -> str:
    """The sum over replicas of every series (`_created` timestamps: the earliest)."""
    merged: dict[str, tuple[str, str, dict]] = {}
    for text in texts.values():
        for fam in _families(text):
            _, _, samples = merged.setdefault(fam.name, (fam.type, fam.documentation, {}))
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if s.name.endswith("_created"):
                    samples[key] = min(samples.get(key, s.value), s.value)
                else:
                    samples[key] = samples.get(key, 0.0) + s.value
    return _render(merged)
