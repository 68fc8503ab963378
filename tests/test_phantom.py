"""The synthetic phantom: deterministic, anatomically sane, and non-IID across sites."""

from __future__ import annotations

import hashlib

import numpy as np
from scipy.ndimage import label as connected_components

from lightning_modules.data.imageio import read_image, read_mask
from lightning_modules.data.manifest import load_split, read_dataset_info, read_manifest, resolve, site_dirs
from lightning_modules.data.phantom import generate_dataset, render_phantom, sample_anatomy, site_profiles


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "dataset.json":
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 3), (b, 3), (c, 4)):
        generate_dataset(root, sites=2, per_site=6, test_size=4, size=48, seed=seed)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_layout_manifests_and_counts(synthetic_root):
    info = read_dataset_info(synthetic_root)
    assert info["classes"] == ["normal", "pneumonia"]
    assert [p.name for p in site_dirs(synthetic_root)] == ["site-1", "site-2", "site-3"]
    for site in site_dirs(synthetic_root):
        rows = read_manifest(site / "manifest.csv")
        assert len(rows) == 80
        assert {r.split for r in rows} == {"train", "val"}
        for r in rows:
            assert resolve(site, r.image).is_file() and resolve(site, r.mask).is_file()
            assert bool(r.opacity) == (r.label == "pneumonia")
    test_rows = load_split(synthetic_root, "test")
    assert len(test_rows) == 60 and {r.split for _, r in test_rows} == {"test"}


def test_follow_up_images_share_patient_and_split(synthetic_root):
    rows = [r for site in site_dirs(synthetic_root) for r in read_manifest(site / "manifest.csv")]
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r.patient_id, set()).add((r.split, r.label, r.site))
    assert any(sum(1 for r in rows if r.patient_id == p) > 1 for p in by_patient), "expected follow-up images"
    assert all(len(v) == 1 for v in by_patient.values())


def test_lung_mask_is_two_lungs_darker_than_body():
    rng = np.random.default_rng(0)
    profile = site_profiles(1)[0]
    for pneumonia in (False, True):
        ph = render_phantom(rng, profile, 128, pneumonia)
        lungs = ph.lung_mask.astype(bool)
        _, n = connected_components(lungs)
        assert n == 2
        assert 0.12 < lungs.mean() < 0.45
        rows, cols = np.nonzero(lungs)
        assert rows.mean() < 80  # lungs are in the upper-middle of the frame, not the abdomen
        left, right = cols < 64, cols >= 64
        assert left.sum() > 0.3 * len(cols) and right.sum() > 0.3 * len(cols)
        body = (ph.image > 0.2) & ~lungs
        assert ph.image[lungs].mean() < ph.image[body].mean()


def test_opacity_only_in_pneumonia_and_inside_lungs():
    profile = site_profiles(1)[0]
    anatomy = sample_anatomy(np.random.default_rng(1))
    normal = render_phantom(np.random.default_rng(5), profile, 128, False, anatomy)
    sick = render_phantom(np.random.default_rng(5), profile, 128, True, anatomy)
    assert normal.opacity_mask.sum() == 0 and normal.label == "normal"
    assert sick.opacity_mask.sum() > 0 and sick.label == "pneumonia"
    assert np.all(sick.lung_mask[sick.opacity_mask.astype(bool)] == 1)
    # the opacity makes the affected lung brighter (denser)
    assert sick.image[sick.opacity_mask.astype(bool)].mean() > normal.image[sick.opacity_mask.astype(bool)].mean()


def test_sites_differ_in_acquisition_and_prevalence(tmp_path):
    generate_dataset(tmp_path, sites=3, per_site=60, test_size=4, size=48, seed=0)
    profiles = read_dataset_info(tmp_path)["site_profiles"]
    assert len({round(p["gamma"], 3) for p in profiles}) == 3
    rates, means = [], []
    for site in site_dirs(tmp_path):
        rows = read_manifest(site / "manifest.csv")
        rates.append(np.mean([r.label == "pneumonia" for r in rows]))
        means.append(np.mean([read_image(resolve(site, r.image)).mean() for r in rows[:15]]))
    assert max(rates) - min(rates) > 0.15  # prevalence differs: label-skewed sites
    assert max(means) - min(means) > 0.02  # exposure/contrast differ


def test_masks_on_disk_are_binary_and_match_image_size(synthetic_root):
    site = site_dirs(synthetic_root)[0]
    r = read_manifest(site / "manifest.csv")[0]
    image = read_image(resolve(site, r.image))
    mask = read_mask(resolve(site, r.mask))
    assert image.shape == mask.shape == (64, 64)
    assert set(np.unique(mask)) == {0, 1}
