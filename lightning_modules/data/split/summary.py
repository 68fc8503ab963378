"""The summary of a site split: per site (then test and all) images per split, patients, labels.

``n_test`` counts the shared test set; a split with per-site test splits gets an ``n_site_test``
column (the sites' own test rows), a split without keeps the columns it always had."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from lightning_modules.data.manifest import TEST_SITE
from lightning_modules.data.split.partition import SplitResult, patient_key


def _positive_rate(labels: Counter, classes: Sequence[str]) -> float | None:
    """Share of labelled images not of the first class (classes[0] is the negative, e.g. 'normal')."""
    n = sum(labels.values())
    if n == 0 or not classes:
        return None
    return (n - labels.get(classes[0], 0)) / n


def summarize(result: SplitResult, classes: Sequence[str] | None = None) -> list[dict]:
    """One row per site, then ``test`` and ``all``: image counts per split, patients, labels."""
    if classes is None:
        classes = sorted({r.label for r in result.all_records() if r.label})
    classes = list(classes)
    groups = [(name, recs) for name, recs in result.sites.items()] + [(TEST_SITE, result.test)]
    groups.append(("all", result.all_records()))
    shared_test = {id(r) for r in result.test}
    with_site_test = any(r.split == TEST_SITE for recs in result.sites.values() for r in recs)
    rows = []
    for name, recs in groups:
        labels = Counter(r.label for r in recs if r.label)
        row = {"site": name}
        if result.source_values:
            row["source"] = result.source_values.get(name, "")
        tested = [id(r) in shared_test for r in recs if r.split == TEST_SITE]
        row.update(n_train=sum(r.split == "train" for r in recs), n_val=sum(r.split == "val" for r in recs),
                   n_test=sum(tested))
        if with_site_test:
            row["n_site_test"] = len(tested) - sum(tested)
        row["patients"] = len({patient_key(r) for r in recs})
        for c in classes:
            row[f"n_{c}"] = labels.get(c, 0)
        rate = _positive_rate(labels, classes)
        row["pos_rate"] = "" if rate is None else f"{rate:.3f}"
        rows.append(row)
    return rows


def format_summary(rows: list[dict], title: str = "") -> str:
    """Markdown table of `summarize` rows (also readable as plain text)."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [title, ""] if title else []
    out.append(line(cols))
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out.extend(line(row) for row in cells)
    return "\n".join(out) + "\n"


def describe(result: SplitResult) -> str:
    """One line saying how the split was made."""
    params = ", ".join(f"{k}={v}" for k, v in result.params.items())
    test = "pre-assigned test set" if result.test_preassigned else "drawn test set"
    return f"mode={result.mode}, seed={result.seed}, {params}, {test}"
