"""Partition one manifest into federated sites plus a held-out test set.

Everything works at *patient* level: all images of one patient (same ``patient_id``; an image
with no patient id is its own patient) end up in exactly one site and one split, so no patient
is ever in two sites, or in both a site and the test set, or in both train and val.

Steps:

1. Held-out test. Records whose split is already ``test`` (e.g. Kermany's official test set)
   stay test, together with every other image of their patients, and no more are drawn.
   Otherwise ``test_fraction`` of the patients is drawn, stratified by label.
2. The remaining patients are partitioned across ``n_sites`` sites:

   - ``iid``: shuffled, stratified round-robin -> near-equal sizes and label mixes;
   - ``dirichlet``: label skew; per class the site shares are drawn from Dir(alpha)
     (small alpha -> each class concentrated in few sites); every site gets >= 1 patient;
   - ``quantity``: size skew; site sizes ~ lognormal(0, quantity_sigma) weights, labels IID;
   - ``source``: one site per distinct value of ``source_column`` (a manifest column such as
     ``site`` or any extra column).

3. Within each site ``site_test_fraction`` of the patients (default 0: none; stratified by label,
   at least one of each class the site has two or more patients of) become the site's own test
   split; of the rest ``val_fraction`` (stratified by label) become val, the others train; every
   site keeps at least one train patient.

The same inputs and seed always give the same split. This module only decides which record goes
where (no files); `write` writes the result as a data root, `summary` describes it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

from lightning_modules.data.manifest import COLUMNS, TEST_SITE, Record

MODES = ("iid", "dirichlet", "quantity", "source")


@dataclass
class SplitResult:
    """The outcome of `split_into_sites`.

    ``sites`` maps site name (``site-1`` .. ``site-N``, in order) to its records (split set to
    train or val, or test for the site's own test split); ``test`` holds the shared held-out
    records (split test). Records are copies of the
    inputs; their path cells are unchanged (still relative to the source manifest's folder).
    """

    sites: dict[str, list[Record]]
    test: list[Record]
    mode: str
    seed: int
    params: dict = field(default_factory=dict)
    # source mode: site name -> the column value it was made from
    source_values: dict[str, str] = field(default_factory=dict)
    test_preassigned: bool = False

    def all_records(self) -> list[Record]:
        return [r for recs in self.sites.values() for r in recs] + list(self.test)


# --------------------------------------------------------------------------- helpers


def patient_key(record: Record) -> str:
    """The unit that is never split: patient_id, or the image itself when there is none."""
    return f"patient:{record.patient_id}" if record.patient_id else f"image:{record.image}"


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split the integer `total` in proportion to `weights` (largest remainder; sums exactly)."""
    weights = np.asarray(weights, dtype=float)
    if total <= 0 or len(weights) == 0:
        return [0] * len(weights)
    s = weights.sum()
    quotas = weights / s * total if s > 0 else np.full(len(weights), total / len(weights))
    counts = np.floor(quotas).astype(int)
    remainder = total - int(counts.sum())
    # ties broken by index so the result is deterministic
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:remainder]:
        counts[i] += 1
    return [int(c) for c in counts]


def _group_by_label(keys: Sequence[str], labels: dict[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(labels[k], []).append(k)
    return {lab: groups[lab] for lab in sorted(groups)}


def _stratified_pick(keys: Sequence[str], labels: dict[str, str], k: int, rng: np.random.Generator) -> list[str]:
    """Pick exactly k of `keys`, with per-label counts proportional to the label sizes."""
    if k <= 0:
        return []
    groups = _group_by_label(keys, labels)
    counts = _apportion(k, [len(g) for g in groups.values()])
    picked: list[str] = []
    for (lab, members), c in zip(groups.items(), counts):
        idx = rng.permutation(len(members))[:c]
        picked.extend(members[i] for i in sorted(idx))
    return picked


def _interleave(keys: Sequence[str], labels: dict[str, str], rng: np.random.Generator) -> list[str]:
    """Shuffle so every class is spread evenly along the sequence (any prefix/chunk is IID)."""
    scored = []
    for lab, members in _group_by_label(keys, labels).items():
        order = rng.permutation(len(members))
        n = len(members)
        for rank, i in enumerate(order):
            scored.append(((rank + rng.random()) / n, members[i]))
    scored.sort(key=lambda t: t[0])
    return [k for _, k in scored]


def _column_value(record: Record, column: str) -> str | None:
    if column in COLUMNS:
        return getattr(record, column)
    return record.extra.get(column)


def _check_fraction(name: str, value: float, flag: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 <= value < 1.0):
        raise ValueError(
            f"{name}={value!r} is invalid: it must be a fraction in [0, 1) (e.g. 0.2); fix {flag}"
        )


# --------------------------------------------------------------------------- partitioners


def _partition_iid(keys, labels, n_sites, rng):
    sites = [[] for _ in range(n_sites)]
    site_order = rng.permutation(n_sites)  # which sites receive the extra patients is random
    i = 0
    for members in _group_by_label(keys, labels).values():
        for j in rng.permutation(len(members)):
            sites[site_order[i % n_sites]].append(members[j])
            i += 1
    return sites


def _partition_dirichlet(keys, labels, n_sites, alpha, rng):
    sites = [[] for _ in range(n_sites)]
    for members in _group_by_label(keys, labels).values():
        props = rng.dirichlet(np.full(n_sites, alpha))
        order = [members[j] for j in rng.permutation(len(members))]
        cuts = np.round(np.cumsum(props) * len(order)).astype(int)
        cuts[-1] = len(order)
        start = 0
        for s, end in enumerate(cuts):
            sites[s].extend(order[start:end])
            start = max(start, end)
    # Every site gets at least one patient: move random patients from the largest site.
    for s in range(n_sites):
        if not sites[s]:
            donor = max(range(n_sites), key=lambda t: (len(sites[t]), -t))
            if len(sites[donor]) < 2:
                break  # cannot happen when there are >= n_sites patients
            sites[s].append(sites[donor].pop(int(rng.integers(len(sites[donor])))))
    return sites


def _partition_quantity(keys, labels, n_sites, sigma, rng):
    weights = rng.lognormal(mean=0.0, sigma=sigma, size=n_sites)
    sizes = [1 + c for c in _apportion(len(keys) - n_sites, weights)]
    order = _interleave(keys, labels, rng)
    sites, start = [], 0
    for size in sizes:
        sites.append(order[start : start + size])
        start += size
    return sites


# --------------------------------------------------------------------------- main entry


def split_into_sites(
    records: Iterable[Record],
    n_sites: int | None,
    *,
    mode: str = "iid",
    alpha: float = 0.5,
    quantity_sigma: float = 1.0,
    source_column: str = "site",
    val_fraction: float = 0.2,
    test_fraction: float = 0.15,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    site_test_fraction: float = 0.0,
) -> SplitResult:
    """Partition `records` into `n_sites` sites (train/val) and a held-out test set.

    See the module docstring for the modes. Raises ValueError (message says how to fix it) for
    n_sites < 1 (0/None allowed in source mode), alpha <= 0, quantity_sigma < 0, fractions
    outside [0, 1), an unknown mode, labels not in `classes`, or more sites than patients.
    """
    records = list(records)
    _check_fraction("site_test_fraction", site_test_fraction, "--site-test-fraction")
    _check_arguments(records, n_sites, mode, alpha, quantity_sigma, val_fraction, test_fraction, classes)
    rng = np.random.default_rng(seed)
    by_patient, labels = _patients(records)
    source_of = _source_of_patients(records, by_patient, source_column) if mode == "source" else {}

    # 1. Held-out test.
    pretest, remaining = _pretest_patients(records, by_patient)
    groups = _source_groups(remaining, source_of, n_sites, source_column) if mode == "source" else {}
    if mode == "source":
        n_sites = len(groups)
    elif n_sites > len(remaining):
        raise ValueError(
            f"n_sites={n_sites} but only {len(remaining)} patients are available for the sites; "
            f"use --sites {len(remaining)} or fewer"
        )
    test_keys = list(pretest)
    if not pretest and test_fraction > 0:
        test_keys.extend(_draw_test(remaining, groups, labels, n_sites, test_fraction, rng))
    test_set = set(test_keys)
    pool = [k for k in remaining if k not in test_set]

    # 2. Partition; 3. train / val within each site.
    site_keys = _partition(mode, pool, labels, n_sites, alpha, quantity_sigma, groups, rng)
    sites = _split_train_val(records, site_keys, by_patient, labels, val_fraction, rng, site_test_fraction)
    test_idx = sorted(i for key in test_keys for i in by_patient[key])
    params = {"n_sites": n_sites, "val_fraction": val_fraction, "test_fraction": test_fraction}
    if site_test_fraction > 0:  # only then: a default split's dataset.json stays as it was
        params["site_test_fraction"] = site_test_fraction
    if mode == "dirichlet":
        params["alpha"] = alpha
    elif mode == "quantity":
        params["quantity_sigma"] = quantity_sigma
    elif mode == "source":
        params["source_column"] = source_column
    test = [replace(records[i], split=TEST_SITE, extra=dict(records[i].extra)) for i in test_idx]
    return SplitResult(sites=sites, test=test, mode=mode, seed=seed, params=params,
                       source_values=dict(zip(sites, groups)), test_preassigned=bool(pretest))


def _check_arguments(records, n_sites, mode, alpha, quantity_sigma, val_fraction, test_fraction, classes) -> None:
    """ValueError (saying which option to fix) for arguments `split_into_sites` cannot use."""
    if mode not in MODES:
        raise ValueError(f"unknown split mode {mode!r}: use one of {', '.join(MODES)} (--mode)")
    if n_sites is not None and (not isinstance(n_sites, (int, np.integer)) or isinstance(n_sites, bool)):
        raise ValueError(f"n_sites={n_sites!r} must be a whole number (--sites N)")
    if mode == "source":
        if n_sites is not None and n_sites < 0:
            raise ValueError(f"n_sites={n_sites} is invalid: use --sites 0 (one site per value) or the number of values")
    elif n_sites is None or n_sites < 1:
        raise ValueError(f"n_sites={n_sites!r} is invalid: at least one site is needed (--sites N with N >= 1)")
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha={alpha!r} is invalid: the Dirichlet concentration must be > 0 (e.g. --alpha 0.5; smaller = more label skew)")
    if not (isinstance(quantity_sigma, (int, float)) and quantity_sigma >= 0 and math.isfinite(quantity_sigma)):
        raise ValueError(f"quantity_sigma={quantity_sigma!r} is invalid: it must be >= 0 (e.g. 1.0; larger = more unequal site sizes)")
    _check_fraction("val_fraction", val_fraction, "--val-fraction")
    _check_fraction("test_fraction", test_fraction, "--test-fraction")
    if not records:
        raise ValueError("no records to split: the manifest is empty")
    if classes is not None:
        known = set(classes)
        bad = sorted({r.label for r in records if r.label and r.label not in known})
        if bad:
            raise ValueError(
                f"label(s) {', '.join(map(repr, bad))} are not in the classes ({', '.join(classes)}); "
                "fix the labels in the manifest or the classes in dataset.json"
            )
    if mode == "dirichlet" and not any(r.label for r in records):
        raise ValueError("dirichlet mode skews the label mix but no record has a label; use --mode quantity or iid")


def _patients(records: list[Record]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(patient -> indices of its records, patient -> its most frequent label or ""), patients in
    order of first appearance (so the split is deterministic)."""
    by_patient: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_patient.setdefault(patient_key(r), []).append(i)
    labels: dict[str, str] = {}
    for key, idx in by_patient.items():
        counts = Counter(records[i].label for i in idx if records[i].label)
        labels[key] = min(counts, key=lambda lab: (-counts[lab], lab)) if counts else ""
    return by_patient, labels


def _pretest_patients(records: list[Record], by_patient: dict[str, list[int]]) -> tuple[list[str], list[str]]:
    """(patients with a record already marked test, the other patients); ValueError when none is left."""
    pretest = [k for k, idx in by_patient.items() if any(records[i].split == TEST_SITE for i in idx)]
    pretest_set = set(pretest)
    remaining = [k for k in by_patient if k not in pretest_set]
    if not remaining:
        raise ValueError("every patient is already in the test set; nothing is left for the sites")
    return pretest, remaining


def _source_of_patients(records: list[Record], by_patient: dict[str, list[int]], source_column: str) -> dict[str, str]:
    """patient -> its one value of `source_column` (source mode); ValueError when a patient has
    none or several, or no record has the column."""
    if not any(_column_value(r, source_column) is not None for r in records):
        available = sorted(set(COLUMNS) | {k for r in records for k in r.extra})
        raise ValueError(
            f"source column {source_column!r} not found in the manifest; "
            f"pass --source-column with one of: {', '.join(available)}"
        )
    source_of: dict[str, str] = {}
    for key, idx in by_patient.items():
        vals = sorted({(_column_value(records[i], source_column) or "") for i in idx})
        if vals == [""]:
            raise ValueError(
                f"{records[idx[0]].image}: empty {source_column!r} value; every record needs one "
                f"in source mode (fill the column or choose another --source-column)"
            )
        vals = [v for v in vals if v]
        if len(vals) > 1:
            raise ValueError(
                f"patient {records[idx[0]].patient_id or records[idx[0]].image!r} has records with different "
                f"{source_column!r} values ({', '.join(vals)}); a patient must come from one source"
            )
        source_of[key] = vals[0]
    return source_of


def _source_groups(remaining: list[str], source_of: dict[str, str], n_sites: int | None,
                   source_column: str) -> dict[str, list[str]]:
    """Source mode: source value -> its patients, sorted by value (one site each)."""
    groups: dict[str, list[str]] = {}
    for k in remaining:
        groups.setdefault(source_of[k], []).append(k)
    values = sorted(groups)
    if n_sites not in (None, 0) and n_sites != len(values):
        raise ValueError(
            f"source mode makes one site per distinct {source_column!r} value and there are {len(values)} "
            f"({', '.join(values)}), but n_sites={n_sites}; use --sites {len(values)} or --sites 0"
        )
    return {v: groups[v] for v in values}


def _draw_test(remaining: list[str], groups: dict[str, list[str]], labels: dict[str, str], n_sites: int,
               test_fraction: float, rng: np.random.Generator) -> list[str]:
    """The patients drawn for the test set, stratified by label; in source mode per source, so
    every source keeps patients for its site."""
    if groups:
        drawn = []
        for members in groups.values():
            k = min(max(1, _round_half_up(test_fraction * len(members))), len(members) - 1)
            drawn.extend(_stratified_pick(members, labels, k, rng))
        return drawn
    k = min(max(1, _round_half_up(test_fraction * len(remaining))), len(remaining) - n_sites)
    return _stratified_pick(remaining, labels, k, rng)


def _partition(mode: str, pool: list[str], labels: dict[str, str], n_sites: int, alpha: float,
               quantity_sigma: float, groups: dict[str, list[str]], rng: np.random.Generator) -> list[list[str]]:
    """The patients of each site, by `mode`."""
    if mode == "iid":
        return _partition_iid(pool, labels, n_sites, rng)
    if mode == "dirichlet":
        return _partition_dirichlet(pool, labels, n_sites, float(alpha), rng)
    if mode == "quantity":
        return _partition_quantity(pool, labels, n_sites, float(quantity_sigma), rng)
    in_pool = set(pool)
    return [[k for k in members if k in in_pool] for members in groups.values()]


def _split_train_val(records: list[Record], site_keys: list[list[str]], by_patient: dict[str, list[int]],
                     labels: dict[str, str], val_fraction: float, rng: np.random.Generator,
                     site_test_fraction: float = 0.0) -> dict[str, list[Record]]:
    """site name -> copies of its records in their original order, split set to test (the site's
    own test split, see `_draw_site_test`), val (val_fraction of the other patients, stratified by
    label) or train (at least one patient)."""
    sites: dict[str, list[Record]] = {}
    for s, all_keys in enumerate(site_keys):
        site_test = set(_draw_site_test(all_keys, labels, site_test_fraction, rng))
        keys = [k for k in all_keys if k not in site_test]
        n = len(keys)
        k_val = 0
        if val_fraction > 0 and n >= 2:
            k_val = min(max(1, _round_half_up(val_fraction * n)), n - 1)
        val = set(_stratified_pick(keys, labels, k_val, rng))
        assigned = {**{k: "val" for k in val}, **{k: TEST_SITE for k in site_test}}
        idx = sorted((i, assigned.get(key, "train")) for key in all_keys for i in by_patient[key])
        sites[f"site-{s + 1}"] = [replace(records[i], split=split, extra=dict(records[i].extra)) for i, split in idx]
    return sites


def _draw_site_test(keys: list[str], labels: dict[str, str], fraction: float, rng: np.random.Generator) -> list[str]:
    """A site's own test patients: about `fraction` of them, stratified by label; each class with
    >= 2 patients gives at least one and keeps at least one (so the site keeps a train patient of
    every class it had twice or more). fraction 0 draws nothing (the rng is untouched)."""
    if fraction <= 0:
        return []
    groups = _group_by_label(keys, labels)
    counts = _apportion(_round_half_up(fraction * len(keys)), [len(g) for g in groups.values()])
    picked: list[str] = []
    for members, c in zip(groups.values(), counts):
        c = min(max(c, 1), len(members) - 1)
        idx = rng.permutation(len(members))[:c]
        picked.extend(members[i] for i in sorted(idx))
    return picked
