"""The shared on-disk image cache (lightning_modules.data.image_cache) as CXRDataModule uses it."""

from __future__ import annotations

import gc
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_modules.data.row_checks as row_checks
from lightning_modules.data import image_cache
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.data.manifest import read_manifest, resolve, write_manifest
from lightning_modules.data.phantom import generate_dataset

SIZE = 32


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    generate_dataset(root, sites=2, per_site=10, test_size=4, size=48, seed=3)
    return root


@pytest.fixture
def root(small_root, tmp_path):
    """A private copy: the tests below rewrite its files."""
    return Path(shutil.copytree(small_root, tmp_path / "root"))


@pytest.fixture
def decodes(monkeypatch):
    """Counts the image and mask decodes of the loader."""
    calls = []
    for name in ("read_image", "read_mask"):
        real = getattr(row_checks, name)
        monkeypatch.setattr(row_checks, name, lambda path, real=real: calls.append(path) or real(path))
    return calls


def loaded(root, cache_dir, stage="fit", **kw) -> CXRDataModule:
    dm = CXRDataModule(root, image_size=SIZE, cache_dir=cache_dir, **kw)
    dm.setup(stage)
    return dm


def assert_same_items(a: CXRDataModule, b: CXRDataModule, splits=("train", "val")) -> None:
    for split in splits:
        assert [it["id"] for it in a.items[split]] == [it["id"] for it in b.items[split]]
        for x, y in zip(a.items[split], b.items[split]):
            assert x.keys() == y.keys() and x.get("label") == y.get("label")
            for key in ("image", "mask"):
                if key in x:
                    assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (x["id"], key)


def entries(cache_dir: Path, what: str = "image") -> list[Path]:
    return sorted(cache_dir.glob(f"v{image_cache.CACHE_VERSION}/*/*.{what}.npy"))


def site_image(root: Path, index: int = 0) -> Path:
    site = root / "site-1"
    return resolve(site, [r for r in read_manifest(site / "manifest.csv") if r.split == "train"][index].image)


@pytest.mark.parametrize("kw", [{}, {"task": "segment"}, {"roi": "crop"}, {"roi": "mask"}],
                         ids=["classify", "segment", "roi-crop", "roi-mask"])
def test_second_load_decodes_nothing_and_gives_the_uncached_values(root, tmp_path, decodes, kw):
    uncached = loaded(root, False, **kw)
    assert decodes and not entries(tmp_path / "cache")
    decodes.clear()
    cold = loaded(root, tmp_path / "cache", **kw)
    assert len(decodes) >= cold.num_train_samples
    assert len(entries(tmp_path / "cache")) == cold.num_train_samples + len(cold.items["val"])
    decodes.clear()
    warm = loaded(root, tmp_path / "cache", **kw)
    assert decodes == []  # every row served from the cache
    assert_same_items(uncached, cold)
    assert_same_items(uncached, warm)
    if "roi" not in kw:  # entries are float16, as the in-memory items always were
        assert warm.items["train"][0]["image"].dtype == torch.float16


def test_warm_items_map_the_cache_files(root, tmp_path):
    loaded(root, tmp_path / "cache")
    warm = loaded(root, tmp_path / "cache")
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux /proc")
    mapped = maps.read_text()
    assert sum(str(p) in mapped for p in entries(tmp_path / "cache")) == len(entries(tmp_path / "cache"))
    warm.items["train"][0]["image"].add_(1)  # copy-on-write: a stray in-place write leaves the file alone
    assert_same_items(loaded(root, False), loaded(root, tmp_path / "cache"))


def test_a_rewritten_image_is_served_anew_even_with_its_size_and_mtime_restored(root, tmp_path):
    path = site_image(root)
    pixels = np.asarray(Image.open(path).convert("L"))
    Image.fromarray(pixels).save(path, compress_level=0)  # stored, not deflated: the size depends on the shape only
    before = loaded(root, tmp_path / "cache")
    old = os.stat(path)
    Image.fromarray(255 - pixels).save(path, compress_level=0)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    after = loaded(root, tmp_path / "cache")
    uncached = loaded(root, False)
    assert_same_items(uncached, after)
    index = [it["id"] for it in after.items["train"]].index(str(path))
    assert not torch.equal(before.items["train"][index]["image"], after.items["train"][index]["image"])


def test_a_broken_entry_is_rebuilt_with_the_right_values(root, tmp_path, decodes, caplog):
    cache = tmp_path / "cache"
    loaded(root, cache)
    truncated, garbled, reshaped = entries(cache)[:3]
    truncated.write_bytes(truncated.read_bytes()[:100])
    garbled.write_bytes(b"\x00" * garbled.stat().st_size)
    np.save(reshaped, np.zeros((1, SIZE, SIZE + 1), np.float16))
    decodes.clear()
    with caplog.at_level(logging.WARNING, logger="cxrfl.data"):
        warm = loaded(root, cache)
    assert len(decodes) == 3  # the three broken entries, no others
    assert sum("rebuilding it" in r.getMessage() for r in caplog.records) == 3
    assert_same_items(loaded(root, False), warm)
    for path in (truncated, garbled, reshaped):
        assert np.load(path).shape == (1, SIZE, SIZE)
    decodes.clear()
    loaded(root, cache)
    assert decodes == []


def test_unusable_rows_are_skipped_for_the_same_reasons_with_or_without_the_cache(root, tmp_path):
    cache = tmp_path / "cache"
    loaded(root, cache, task="segment")  # every row cached while still usable
    site = root / "site-1"
    rows = read_manifest(site / "manifest.csv")
    train = [r for r in rows if r.split == "train"]
    resolve(site, train[0].image).write_text("not an image")
    resolve(site, train[1].image).write_bytes(b"")
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(resolve(site, train[2].mask))  # wrong mask size
    write_manifest(site / "manifest.csv", rows)
    cached, uncached = loaded(root, cache, task="segment"), loaded(root, False, task="segment")
    assert len(cached.skipped) == 3 and cached.skipped == uncached.skipped
    assert any("not an image" in s for s in cached.skipped) and any("mask size" in s for s in cached.skipped)
    assert_same_items(uncached, cached)
    train[3].label = "martian"  # a row whose image entry is cached: its label still rules it out
    write_manifest(site / "manifest.csv", rows)
    cached, uncached = loaded(root, cache), loaded(root, False)
    assert any("martian" in s for s in cached.skipped) and cached.skipped == uncached.skipped
    assert_same_items(uncached, cached)


def test_an_unwritable_cache_folder_means_no_cache_and_one_warning(root, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="cxrfl.data"):
        dm = loaded(root, blocker / "cache")
        loaded(root, blocker / "cache")  # a later data module of the process does not warn again
    warnings = [r.getMessage() for r in caplog.records if "image cache" in r.getMessage()]
    assert len(warnings) == 1 and "cannot write" in warnings[0] and str(blocker / "cache") in warnings[0]
    assert_same_items(loaded(root, False), dm)


def test_the_cache_folder_comes_from_the_environment_or_is_off(root, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRFL_CACHE_DIR", str(tmp_path / "from-env"))
    loaded(root, None)
    assert entries(tmp_path / "from-env")
    assert (tmp_path / "from-env").stat().st_mode & 0o077 == 0  # patient images: private
    monkeypatch.setenv("CXRFL_CACHE_DIR", "off")
    assert CXRDataModule(root).cache is None
    monkeypatch.delenv("CXRFL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert CXRDataModule(root).cache.folder == tmp_path / "xdg" / "cxrfl" / "images"
    assert CXRDataModule(root, cache_dir=False).cache is None


def test_past_the_mapping_budget_entries_are_read_into_memory(root, tmp_path, monkeypatch):
    loaded(root, tmp_path / "cache")
    gc.collect()  # the cold load's mappings are released
    live = image_cache._mappings.live
    monkeypatch.setattr(image_cache._mappings, "budget", 0)
    warm = loaded(root, tmp_path / "cache")
    assert image_cache._mappings.live == live
    if Path("/proc/self/maps").exists():
        mapped = Path("/proc/self/maps").read_text()
        assert not any(str(p) in mapped for p in entries(tmp_path / "cache"))
    assert_same_items(loaded(root, False), warm)
