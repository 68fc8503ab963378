"""Heterogeneity you can dial: site_shift spreads the sites' acquisition (0 = one shared profile),
label_alpha skews their labels (Dirichlet), each on its own, and the default is unchanged."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrfl.cli import main
from lightning_modules.data.imageio import read_image
from lightning_modules.data.manifest import read_manifest, resolve, site_dirs
from lightning_modules.data.phantom import (ACQUISITION_RANGES, MAX_SITE_SHIFT, REFERENCE_ACQUISITION,
                                            REFERENCE_MARKER_CORNER, dirichlet_prevalences, generate_dataset,
                                            render_phantom, site_profiles)

# Content digests (manifests, dataset.json, decoded PNG pixels) of these two data sets as written by
# the generator BEFORE site_shift/label_alpha existed (issue 18 item 4): the defaults must keep every
# value. Decoded pixels rather than PNG bytes, so that a zlib build does not matter; numpy/scipy
# versions do (they are pinned).
TINY_DEFAULTS = {
    "default": (dict(sites=3, per_site=6, test_size=4, size=32, seed=5),
                "c01da9c1b5fdbcceea3a45ea5d2661fd190f2e34d76d9cab253fe41a36b7e064"),
    "opacity": (dict(sites=2, per_site=5, test_size=3, size=32, seed=1, label_signal="opacity"),
                "40520abbfd639abc7f9e32c87c8321f1e02b50422ae89e61f15e34cdfaf0902b"),
}
MARKER_VALUE = 242  # round(0.95 * 255): the burned-in marker's 8-bit grey


def _content_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            if path.suffix == ".png":
                with Image.open(path) as image:
                    h.update(np.asarray(image).tobytes())
            else:
                h.update(path.read_bytes())
    return h.hexdigest()


def _site_image_stats(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per site: (each image's mean, each image's std)."""
    stats = []
    for site in site_dirs(root):
        images = np.array([read_image(resolve(site, r.image)) for r in read_manifest(site / "manifest.csv")])
        stats.append((images.mean(axis=(1, 2)), images.std(axis=(1, 2))))
    return stats


def _largest_pairwise_z(samples: list[np.ndarray]) -> float:
    """Largest difference of two sites' means in units of its standard error (sampling noise)."""
    def z(a, b):
        return abs(a.mean() - b.mean()) / math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return max(z(a, b) for a, b in itertools.combinations(samples, 2))


def _prevalences(root: Path) -> list[float]:
    return [float(np.mean([r.label == "pneumonia" for r in read_manifest(site / "manifest.csv")]))
            for site in site_dirs(root)]


def _marker_corner(path: Path) -> int | None:
    """Which corner (0..3) holds the side marker's vertical bar (as `_acquire` draws it), if any."""
    with Image.open(path) as image:
        pixels = np.asarray(image)
    size = pixels.shape[0]
    m = max(3, size // 20)
    corners = [(m, m), (m, size - 3 * m), (size - 3 * m, m), (size - 3 * m, size - 3 * m)]
    bar = (2 * m, m // 2 + 1)
    found = [k for k, (r0, c0) in enumerate(corners) if np.all(pixels[r0:r0 + bar[0], c0:c0 + bar[1]] == MARKER_VALUE)]
    assert len(found) <= 1, path
    return found[0] if found else None


@pytest.mark.parametrize("name", TINY_DEFAULTS)
def test_the_defaults_write_what_the_generator_wrote_before_the_dials(tmp_path, name):
    kwargs, digest = TINY_DEFAULTS[name]
    generate_dataset(tmp_path / "implicit", **kwargs)
    generate_dataset(tmp_path / "explicit", **kwargs, site_shift=1.0, label_alpha=None)
    assert _content_digest(tmp_path / "implicit") == digest
    assert _content_digest(tmp_path / "explicit") == digest


@pytest.mark.parametrize("seed", [0, 1])
def test_site_shift_zero_makes_the_sites_indistinguishable_and_one_sets_them_apart(tmp_path, seed):
    # balanced labels and no follow-up images: the images are independent and only acquisition differs
    common = dict(sites=3, per_site=24, test_size=2, size=32, seed=seed, follow_up_rate=0.0, label_alpha=1e6)
    generate_dataset(tmp_path / "iid", site_shift=0.0, **common)
    generate_dataset(tmp_path / "shifted", site_shift=1.0, **common)
    iid, shifted = _site_image_stats(tmp_path / "iid"), _site_image_stats(tmp_path / "shifted")
    for statistic in (0, 1):  # per-image mean, per-image std
        assert _largest_pairwise_z([s[statistic] for s in iid]) < 4.0  # within sampling noise
    assert _largest_pairwise_z([s[0] for s in shifted]) > 8.0
    assert _largest_pairwise_z([s[1] for s in shifted]) > 8.0


def test_site_shift_zero_is_one_profile_and_keeps_the_prevalences():
    own = site_profiles(4, seed=3)
    iid = site_profiles(4, seed=3, site_shift=0.0)
    acquisition = [{k: v for k, v in vars(p).items() if k not in ("name", "prevalence")} for p in iid]
    assert all(a == {**REFERENCE_ACQUISITION, "marker_corner": REFERENCE_MARKER_CORNER} for a in acquisition)
    assert [p.prevalence for p in iid] == [p.prevalence for p in own]  # label skew is the other dial
    assert len({p.marker_corner for p in own}) == 4


def test_every_parameter_moves_monotonically_from_the_reference_to_the_site_and_beyond():
    shifts = np.linspace(0.0, MAX_SITE_SHIFT, 21)
    for seed in range(4):
        own = site_profiles(4, seed)
        by_shift = [site_profiles(4, seed, site_shift=float(s)) for s in shifts]
        for i, name in itertools.product(range(4), ACQUISITION_RANGES):
            reference, target = REFERENCE_ACQUISITION[name], getattr(own[i], name)
            values = np.array([getattr(profiles[i], name) for profiles in by_shift])
            offsets = (values - reference) * np.sign(target - reference)  # >= 0: on the site's side
            assert offsets[0] == 0 and np.all(offsets >= 0), (seed, i, name)
            assert np.all(np.diff(offsets) >= 0), (seed, i, name)  # never moves back toward the reference
            halfway = getattr(by_shift[5][i], name)  # shifts[5] == 0.5
            assert halfway == pytest.approx(reference + 0.5 * (target - reference))
            assert abs(getattr(by_shift[-1][i], name) - reference) > abs(target - reference) or \
                getattr(by_shift[-1][i], name) == 0.0  # exaggerated, or floored at 0 (noise, blur, jitter)


def test_the_largest_shift_still_renders_valid_radiographs():
    for seed in range(3):
        for profile in site_profiles(4, seed, site_shift=MAX_SITE_SHIFT):
            rng = np.random.default_rng(seed)
            for pneumonia in (False, True):
                ph = render_phantom(rng, profile, 48, pneumonia)
                lungs = ph.lung_mask.astype(bool)
                assert np.isfinite(ph.image).all() and 0.0 <= ph.image.min() and ph.image.max() <= 1.0
                assert lungs.mean() > 0.08
                assert ph.image[lungs].mean() < ph.image[(ph.image > 0.2) & ~lungs].mean()
                assert np.mean((ph.image <= 0.0) | (ph.image >= 1.0)) < 0.5  # not blown out


def test_the_side_marker_moves_to_the_sites_own_corner_with_the_shift(tmp_path):
    corners = {}
    for shift in (0.0, 0.5, 1.0):
        root = tmp_path / str(shift)
        generate_dataset(root, sites=2, per_site=24, test_size=2, size=32, seed=2, site_shift=shift)
        site = root / "site-2"  # its own corner is 1
        corners[shift] = [_marker_corner(resolve(site, r.image)) for r in read_manifest(site / "manifest.csv")]
    assert set(corners[0.0]) == {REFERENCE_MARKER_CORNER}
    assert set(corners[1.0]) == {1}
    assert set(corners[0.5]) == {REFERENCE_MARKER_CORNER, 1}


def test_label_alpha_draws_skewed_or_balanced_prevalences():
    def mean_distance_from_balanced(alpha):
        return float(np.mean([np.abs(dirichlet_prevalences(6, alpha, seed) - 0.5) for seed in range(20)]))
    assert mean_distance_from_balanced(0.1) > 0.3
    assert mean_distance_from_balanced(1000.0) < 0.03
    assert list(dirichlet_prevalences(6, 0.1, seed=4)) == list(dirichlet_prevalences(6, 0.1, seed=4))
    assert list(dirichlet_prevalences(6, 0.1, seed=4)) != list(dirichlet_prevalences(6, 0.1, seed=5))


def test_label_alpha_sets_each_sites_class_counts_and_keeps_both_classes(tmp_path):
    common = dict(sites=6, per_site=20, test_size=2, size=32, seed=0)
    generate_dataset(tmp_path / "skewed", label_alpha=0.1, **common)
    generate_dataset(tmp_path / "balanced", label_alpha=1000.0, **common)
    skewed, balanced = _prevalences(tmp_path / "skewed"), _prevalences(tmp_path / "balanced")
    assert max(skewed) - min(skewed) > 0.7
    assert all(abs(p - 0.5) <= 0.1 for p in balanced)
    drawn = [p["prevalence"] for p in json.loads((tmp_path / "skewed" / "dataset.json").read_text())["site_profiles"]]
    assert drawn == list(dirichlet_prevalences(6, 0.1, seed=0))
    assert skewed == [min(max(round(p * 20), 1), 19) / 20 for p in drawn]  # every class at least once
    generate_dataset(tmp_path / "two", sites=3, per_site=2, test_size=2, size=32, seed=0, label_alpha=1e-3)
    assert _prevalences(tmp_path / "two") == [0.5, 0.5, 0.5]


def test_the_dials_are_independent_and_deterministic(tmp_path):
    shifted = site_profiles(4, seed=6, site_shift=0.5)
    skewed = site_profiles(4, seed=6, site_shift=0.5, label_alpha=0.1)
    assert [vars(p) | {"prevalence": 0} for p in shifted] == [vars(p) | {"prevalence": 0} for p in skewed]
    assert [p.prevalence for p in site_profiles(4, seed=6, label_alpha=0.1)] == [p.prevalence for p in skewed]
    dials = dict(sites=2, per_site=8, test_size=4, size=32, seed=6, site_shift=0.5, label_alpha=0.1)
    generate_dataset(tmp_path / "a", **dials)
    generate_dataset(tmp_path / "b", **dials)
    generate_dataset(tmp_path / "c", **{**dials, "seed": 7})
    assert _content_digest(tmp_path / "a") == _content_digest(tmp_path / "b")
    assert _content_digest(tmp_path / "a") != _content_digest(tmp_path / "c")
    generator = json.loads((tmp_path / "a" / "dataset.json").read_text())["generator"]
    assert (generator["site_shift"], generator["label_alpha"]) == (0.5, 0.1)


@pytest.mark.parametrize("option, value", [
    ("site_shift", -0.1), ("site_shift", MAX_SITE_SHIFT + 0.01), ("site_shift", math.nan), ("site_shift", math.inf),
    ("site_shift", "1"), ("label_alpha", 0.0), ("label_alpha", -1.0), ("label_alpha", math.nan),
    ("label_alpha", math.inf),
])
def test_unusable_dials_are_refused_in_one_line_before_anything_is_written(tmp_path, option, value):
    with pytest.raises(ValueError) as exc:
        generate_dataset(tmp_path / "out", sites=2, per_site=4, size=32, **{option: value})
    assert option in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_label_alpha_with_an_opacity_only_label_is_refused(tmp_path):
    with pytest.raises(ValueError, match="label_alpha cannot be combined with label_signal 'opacity'"):
        generate_dataset(tmp_path / "out", sites=2, per_site=4, size=32, label_signal="opacity", label_alpha=1.0)
    assert not (tmp_path / "out").exists()


def test_data_synth_takes_both_dials_and_records_them(tmp_path):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--sites", "2", "--per-site", "6", "--test-size", "2",
                 "--size", "32", "--seed", "3", "--site-shift", "0.25", "--label-alpha", "0.1"]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["generator"]["site_shift"] == 0.25 and info["generator"]["label_alpha"] == 0.1
    expected = site_profiles(2, seed=3, site_shift=0.25, label_alpha=0.1)
    assert info["site_profiles"] == [vars(p) for p in expected]


@pytest.mark.parametrize("option, value", [("--site-shift", "2.5"), ("--site-shift", "-1"),
                                           ("--label-alpha", "0"), ("--label-alpha", "nan")])
def test_data_synth_refuses_unusable_dials_in_one_line(tmp_path, capsys, option, value):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--size", "32", option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cxrfl data synth: {option} must be") and "\n" not in err
    assert not out.exists()
