"""The federated statistics job's result (NVFlare's JSON writer: {feature: {statistic: {site | "Global":
{dataset: value}}}}) as this project's stats.json: per feature, each site's statistics as they passed its
privacy cleansers, what was withheld and why, and a global over the sites that returned statistics.

Why not NVFlare's "Global": its count includes a site whose other statistics the min-count cleanser
removed, so its global mean (global sum / global count) and standard deviation are too low whenever a
site was withheld. Here the global is pooled from the sites' own count, mean and standard deviation
over the sites that returned them; its count is the total of every site's count.
"""

from __future__ import annotations

import math

from app_custom.cxr_statistics import DATASET, StatFeature

STATISTICS = ("count", "sum", "mean", "stddev", "histogram")


def summarise(raw: dict, features: list[StatFeature], sites: list[str], settings: dict) -> dict:
    """stats.json's content: {"sites", "settings", "features": {name: {"group", "value", "kind",
    "sites": {site: {count, sum, mean, stddev, histogram, withheld}}, "global": {...}}}, "feature_order"}."""
    summary = {}
    for f in features:
        by_statistic = raw.get(f.name, {}) if isinstance(raw.get(f.name), dict) else {}
        per_site = {site: _site_entry(by_statistic, site, settings) for site in sites}
        summary[f.name] = {"group": f.group, "value": f.value, "kind": f.kind, "sites": per_site,
                           "global": pooled(per_site)}
    return {"sites": list(sites), "settings": dict(settings), "features": summary,
            "feature_order": [f.name for f in features]}


def _site_entry(by_statistic: dict, site: str, settings: dict) -> dict:
    """One site's statistics of one feature, and what its cleansers withheld (a site that measured the
    feature on no row did not declare it: count 0)."""
    entry = {}
    for statistic in STATISTICS:
        value = (by_statistic.get(statistic) or {}).get(site, {})
        if isinstance(value, dict) and DATASET in value:
            entry[statistic] = value[DATASET]
    if not entry:
        return {"count": 0}
    withheld = []
    if "mean" not in entry:
        withheld.append(f"count below the minimum count {settings.get('min_count')}")
    elif "histogram" not in entry:
        withheld.append(f"histogram: its bins must be fewer than {settings.get('max_bins_percent')} % of the count")
    if withheld:
        entry["withheld"] = withheld
    return entry


def pooled(per_site: dict[str, dict]) -> dict:
    """The global of one feature: count over every site; mean, standard deviation and histogram pooled
    over the sites that returned them (listed)."""
    total = sum(int(e.get("count") or 0) for e in per_site.values())
    result: dict = {"count": total}
    counted = {s: e for s, e in per_site.items() if "mean" in e and e.get("count")}
    if counted:
        n = sum(e["count"] for e in counted.values())
        # from the sums where there are (NVFlare rounds each site's mean and sum to 4 decimals)
        mean = sum(e["sum"] if "sum" in e else e["count"] * e["mean"] for e in counted.values()) / n
        squares = sum((e["count"] - 1) * e.get("stddev", 0.0) ** 2 + e["count"] * (e["mean"] - mean) ** 2
                      for e in counted.values())
        result.update(count_with_statistics=n, mean=mean, stddev=math.sqrt(squares / (n - 1)) if n > 1 else 0.0,
                      sites_with_statistics=sorted(counted))
    histograms = {s: e["histogram"] for s, e in per_site.items() if e.get("histogram")}
    if histograms:
        first = next(iter(histograms.values()))
        counts = [sum(h[i][2] for h in histograms.values()) for i in range(len(first))]
        result["histogram"] = [[low, high, c] for (low, high, _), c in zip(first, counts)]
        result["sites_with_histogram"] = sorted(histograms)
    return result
