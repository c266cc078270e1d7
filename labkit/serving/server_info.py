"""The engine settings a server publishes, and how a client reads one of them (is the prefix cache on?) back.

`labkit serve` puts its engine's settings (`Engine.describe()`) in its model card at /v1/models, under the extra
field `engine` (vLLM's cards carry extra fields too, e.g. `max_model_len`), and in an info gauge on /metrics,
`labkit_engine_config_info{prefix_caching="True",...} 1`, as vLLM publishes `vllm:cache_config_info
{enable_prefix_caching="True",...}`. A benchmark row records whether the prefix cache was on from either;
a server that says neither (llama.cpp, TGI) gets None: unknown, not "off".
"""

from __future__ import annotations

import json
from collections.abc import Mapping

CARD_FIELD = "engine"  # the model card's extra field holding the engine's settings
INFO_METRIC = "labkit_engine_config"  # prometheus_client adds "_info"
PREFIX_CACHING_LABELS = ("prefix_caching", "enable_prefix_caching")  # labkit's, vLLM's


def info_labels(settings: Mapping, reserved: tuple[str, ...] = ("model",)) -> dict[str, str]:
    """Settings as Prometheus label values (strings; lists and dicts as compact JSON); `reserved` names, which
    the metric already uses as labels, are left out."""
    return {key: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            if isinstance(value, (list, dict)) else str(value)
            for key, value in settings.items() if key not in reserved}


def _as_bool(value) -> bool | None:
    if isinstance(value, bool):
        return value
    return {"true": True, "false": False}.get(str(value).strip().lower())


def prefix_caching_in_card(card: Mapping | None) -> bool | None:
    """Whether a model card says the server's prefix cache is on: its `engine.prefix_caching` (labkit's) or a
    top-level `enable_prefix_caching`; None when it says nothing."""
    if not isinstance(card, Mapping):
        return None
    engine = card.get(CARD_FIELD)
    if isinstance(engine, Mapping) and _as_bool(engine.get("prefix_caching")) is not None:
        return _as_bool(engine.get("prefix_caching"))
    return _as_bool(card.get("enable_prefix_caching")) if "enable_prefix_caching" in card else None


def prefix_caching_in_metrics(page: str | None) -> bool | None:
    """Whether a Prometheus page says the prefix cache is on: a `*config_info` sample with a `prefix_caching`
    (labkit) or `enable_prefix_caching` (vLLM) label; None when none does or the page does not parse."""
    from prometheus_client.parser import text_string_to_metric_families

    if not page:
        return None
    try:
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                if not sample.name.endswith("config_info"):
                    continue
                for label in PREFIX_CACHING_LABELS:
                    if label in sample.labels and _as_bool(sample.labels[label]) is not None:
                        return _as_bool(sample.labels[label])
    except ValueError:  # not Prometheus text (an HTML page, say)
        return None
    return None


__all__ = ["CARD_FIELD", "INFO_METRIC", "PREFIX_CACHING_LABELS", "info_labels", "prefix_caching_in_card",
           "prefix_caching_in_metrics"]
