"""`CXRDataModule`: one LightningDataModule for both tasks, centrally (all sites) or at one site."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import Dataset
from monai.transforms import CastToTyped, Compose, EnsureTyped
from torch.utils.data import DataLoader

from lightning_modules.data.image_cache import ImageCache, default_cache_dir
from lightning_modules.data.row_checks import inspect_record
from lightning_modules.data.manifest import SITE_TEST, TEST_SITE, ManifestError, Record, class_names, load_split, resolve
from lightning_modules.config import DEFAULT_IMAGE_SIZE, TASKS
from lightning_modules.data.transforms import deterministic_transforms, lung_roi, normalize, train_augmentation

log = logging.getLogger("cxrfl.data")


# A function (images [N,1,H,W] in [0,1]) -> lung masks or probabilities [N,1,H,W]; e.g.
# lightning_modules.segmentation.LungSegmentation.predict_masks.
MaskPredictor = Callable[[torch.Tensor], torch.Tensor]


def load_item(folder: Path, record: Record, *, classes: Sequence[str] | None, need_mask: bool) -> tuple[dict | None, list[str]]:
    """Decode one manifest row into {'image', 'mask'?, 'label'?}, or (None, reasons) when the row
    is unusable, for the same reasons `cxrfl data check` reports."""
    problems, image, mask = inspect_record(folder, record, classes, require_mask=need_mask, use_masks=need_mask)
    reasons = [f"{p.file}: {p.reason}" for p in problems]
    if classes is not None and not record.label:
        reasons.append(f"{resolve(folder, record.image)}: no label")
    if reasons:
        return None, reasons
    return _item(folder, record, classes, image[None], mask[None].astype(np.float32) if need_mask else None), []


def _item(folder: Path, record: Record, classes: Sequence[str] | None, image, mask) -> dict:
    item = {"image": image, "id": str(resolve(folder, record.image))}
    if classes is not None:
        item["label"] = list(classes).index(record.label)
    if mask is not None:
        item["mask"] = mask
    return item


def _row_files(folder: Path, record: Record, need_mask: bool) -> list[tuple[str, Path | None]]:
    """The files whose bytes decide a row's cached result and usability: the masks only where used."""
    columns = ("image", "mask", "opacity") if need_mask else ("image",)
    return [(c, resolve(folder, getattr(record, c)) if getattr(record, c) else None) for c in columns]


def _found_without_decoding(folder: Path, record: Record, classes: Sequence[str] | None, need_mask: bool) -> bool:
    """Whether the row has a problem that shows without decoding (label, missing mask): such rows take
    the uncached way, which reports them exactly as `cxrfl data check` does."""
    problems = inspect_record(folder, record, classes, require_mask=need_mask, decode=False, use_masks=need_mask)[0]
    return bool(problems) or (classes is not None and not record.label)


class CXRDataModule(pl.LightningDataModule):
    """Reads the site manifests of a data root, decodes/resizes every image once (kept in memory,
    and on disk in the machine's shared image cache, see image_cache), and serves train
    (augmented), val and held-out test loaders: the shared test set (stage "test") and, where the
    sites have one, their own test splits (stage "site_test", never loaded by "fit": those rows are
    neither trained nor validated on).

    Bad files are skipped with one logged line each; the reasons are kept in `self.skipped`.
    MONAI's CacheDataset is not used because it aborts on the first unreadable file.

    `cache_dir`: None, the default cache folder ($CXRFL_CACHE_DIR, else ~/.cache/cxrfl/images;
    "off" for none); a folder; or False, no disk cache (every image decoded in this process).
    """

    def __init__(self, data_root: str | Path, task: str = "classify", sites: Sequence[str] | None = None,
                 image_size: int = DEFAULT_IMAGE_SIZE, batch_size: int = 16, num_workers: int = 0, roi: str | None = None,
                 roi_threshold: float = 0.5, mask_predictor: MaskPredictor | None = None, augment: bool = True,
                 seed: int = 0, limit: int | None = None, cache_dir: str | Path | bool | None = None):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if roi is not None and task != "classify":
            raise ValueError("roi input applies to classification only")
        self.data_root = Path(data_root)
        self.task, self.sites = task, list(sites) if sites is not None else None
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.roi, self.roi_threshold, self.mask_predictor = roi, roi_threshold, mask_predictor
        self.augment, self.seed, self.limit = augment, seed, limit
        folder = default_cache_dir() if cache_dir is None or cache_dir is True else cache_dir or None
        self.cache = ImageCache(folder) if folder is not None else None
        self._train_loaders = 0  # training loaders made so far: each one's augmentation seed differs
        self._images_device: torch.device | None = None  # --gpu-data: see keep_training_images_on
        self._on_device = None  # (items, images, labels, masks) stacked on that device
        self.classes: list[str] = []
        self.items: dict[str, list[dict]] = {}
        self.skipped: list[str] = []

    # ---- loading -------------------------------------------------------------------------
    def _need_mask(self) -> bool:
        return self.task == "segment" or (self.roi is not None and self.mask_predictor is None)

    def _load_split(self, split: str) -> list[dict]:
        rows = load_split(self.data_root, split, None if split == TEST_SITE else self.sites)
        if self.limit:
            rows = rows[: self.limit]
        classes = self.classes if self.task == "classify" else None
        prepare = deterministic_transforms(self.image_size, with_mask=self._need_mask())
        items = []
        for folder, record in rows:
            item, reasons = self._prepared_item(folder, record, classes, prepare)
            if item is None:
                self.skipped.extend(reasons)
                for reason in reasons:
                    log.warning("skipping %s", reason)
                continue
            items.append(item)
        if self.roi is not None and items:
            items = self._apply_roi(items)
        for it in items:  # half the memory (cache entries already are); the loader casts back to float32
            it["image"] = it["image"].half()
            if "mask" in it:
                it["mask"] = it["mask"].to(torch.uint8)
        return items

    def _prepared_item(self, folder: Path, record: Record, classes: Sequence[str] | None,
                       prepare: Compose) -> tuple[dict | None, list[str]]:
        """`load_item` + the deterministic transforms, through the disk cache where there is one: a hit
        maps the stored arrays (shared with every other process using them) instead of decoding."""
        need_mask = self._need_mask()
        # an ROI step still runs on the float32 resize (as it always did) and is rounded after it
        dtype = torch.float32 if self.roi is not None else torch.float16
        np_dtype = np.float32 if self.roi is not None else np.float16
        key = files = None
        if self.cache is not None:
            files = _row_files(folder, record, need_mask)
            key = self.cache.key(files, self.image_size, np_dtype)
            if key is not None and not _found_without_decoding(folder, record, classes, need_mask):
                hit = self.cache.load(key, self.image_size, np_dtype, need_mask)
                if hit is not None:
                    return self._cached_item(folder, record, classes, hit), []
        item, reasons = load_item(folder, record, classes=classes, need_mask=need_mask)
        if item is None:
            return None, reasons
        item = prepare(item)
        # stored only when the files did not change while decoding; then served from the shared mapping
        if key is not None and self.cache.key(files, self.image_size, np_dtype) == key:
            image = item["image"].to(dtype).numpy()  # torch's rounding: the same values as the uncached path
            mask = item["mask"].to(torch.uint8).numpy() if need_mask else None
            if self.cache.store(key, image, mask):
                hit = self.cache.load(key, self.image_size, np_dtype, need_mask)
                if hit is not None:
                    return self._cached_item(folder, record, classes, hit), []
        return item, []

    @staticmethod
    def _cached_item(folder: Path, record: Record, classes: Sequence[str] | None, hit) -> dict:
        image, mask = hit  # writable copy-on-write mappings: torch.from_numpy wraps them without copying
        return _item(folder, record, classes, torch.from_numpy(image), None if mask is None else torch.from_numpy(mask))

    def _apply_roi(self, items: list[dict]) -> list[dict]:
        for start in range(0, len(items), 32):
            chunk = items[start:start + 32]
            images = torch.stack([it["image"] for it in chunk])
            if self.mask_predictor is not None:
                with torch.no_grad():
                    masks = self.mask_predictor(images)
            else:
                masks = torch.stack([it.pop("mask") for it in chunk])
            for it, roi_image in zip(chunk, lung_roi(images, masks, self.roi, self.roi_threshold)):
                it["image"] = roi_image
        return items

    def setup(self, stage: str | None = None) -> None:
        if self.task == "classify" and not self.classes:
            self.classes = class_names(self.data_root, (r for _, r in load_split(self.data_root, "train", self.sites)))
            if len(self.classes) < 2:
                raise ManifestError(f"{self.data_root}: need at least 2 classes for classification, found {self.classes}")
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",),
                  SITE_TEST: (SITE_TEST,)}
        splits = wanted.get(stage, ("train", "val", "test"))
        for split in splits:
            if split not in self.items:
                self.items[split] = self._load_split(split)
                if not self.items[split] and split != SITE_TEST:  # a site's own test split is optional
                    where = self.data_root / "test" if split == "test" else self.data_root
                    raise ManifestError(f"{where}: no usable {split} images"
                                        + (f" for site(s) {', '.join(self.sites)}" if self.sites else ""))
        if self.skipped:
            log.warning("%d file(s) skipped as unusable; see the log lines above", len(self.skipped))

    # ---- loaders ---------------------------------------------------------------------------
    def _mask_in_batch(self) -> bool:
        return self.task == "segment"

    def _transform(self, train: bool, seed: int) -> Compose:
        keys = ["image", "mask"] if self._mask_in_batch() else ["image"]
        steps = [CastToTyped(keys=keys, dtype=torch.float32)]
        if train and self.augment:
            steps.append(train_augmentation(with_mask=self._mask_in_batch(), seed=self.seed,
                                            image_size=self.image_size))
        steps.append(normalize(lung_only=self.roi == "mask"))
        # plain tensors, not MetaTensors: they would leak into metrics and checkpoints
        steps.append(EnsureTyped(keys=keys, data_type="tensor", track_meta=False))
        transform = Compose(steps)
        transform.set_random_state(seed=seed)  # MONAI's Compose re-seeds its transforms from an unseeded draw
        return transform

    def _loader(self, split: str, train: bool) -> DataLoader:
        # The same seed, the same order and augmentations; each new training loader (a federated
        # site makes one per round) shuffles and augments anew.
        self._train_loaders += int(train)
        seed = (self.seed + 7919 * self._train_loaders) % 2**32 if train else self.seed
        if train and self.images_device is not None:
            return self._device_batches(seed)
        keep = {"image", "mask", "label", "id"} if self._mask_in_batch() else {"image", "label", "id"}
        data = [{k: v for k, v in it.items() if k in keep} for it in self.items[split]]
        generator = torch.Generator().manual_seed(seed)
        # pinned host memory: the copy to a CUDA GPU runs without blocking
        return DataLoader(Dataset(data, transform=self._transform(train, seed)), batch_size=self.batch_size,
                          shuffle=train, drop_last=train and len(data) > self.batch_size,
                          num_workers=self.num_workers, generator=generator,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    # ---- training images kept on the GPU (--gpu-data) -----------------------------------------------
    def keep_training_images_on(self, device: torch.device | str | None) -> None:
        """Serve training batches from one tensor of every cached training image on `device` (a GPU), augmented
        and standardised there a batch at a time (lightning_modules/data/gpu_batches.py) instead of image by
        image in a DataLoader; None goes back to the DataLoader. Validation and test loaders do not change."""
        self._images_device = None if device is None else torch.device(device)
        self._on_device = None

    @property
    def images_device(self) -> torch.device | None:
        return self._images_device

    def _device_batches(self, seed: int):
        from lightning_modules.data.gpu_batches import BatchAugment, DeviceBatches  # lazy: only with --gpu-data

        items = self.items["train"]
        held = self._on_device
        if held is None or held[0] is not items:  # stacked once, then every round's loader cuts from it
            device = self.images_device
            masks = torch.stack([it["mask"] for it in items]).to(device) if self._mask_in_batch() else None
            labels = torch.tensor([it["label"] for it in items], device=device) if "label" in items[0] else None
            held = (items, torch.stack([it["image"] for it in items]).to(device), labels, masks)
            self._on_device = held
        _, images, labels, masks = held
        augment = BatchAugment(seed, self.images_device, lung_only=self.roi == "mask", augment=self.augment)
        return DeviceBatches(images, labels, masks, [it["id"] for it in items], self.batch_size, augment, seed,
                             drop_last=len(items) > self.batch_size)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def evaluation_loader(self, split: str) -> DataLoader:
        """A split set up earlier ("train", "val", ...) with the evaluation transforms: no augmentation, fixed
        order (what a privacy audit scores a model on)."""
        return self._loader(split, False)

    def site_test_dataloader(self) -> DataLoader | None:
        """The sites' own test splits (same transforms as the shared test set), or None when they have none."""
        if SITE_TEST not in self.items:
            self.setup(SITE_TEST)
        return self._loader(SITE_TEST, False) if self.items[SITE_TEST] else None

    # ---- facts the trainers need -------------------------------------------------------------
    @property
    def num_train_samples(self) -> int:
        return len(self.items.get("train", []))

    @property
    def num_site_test_samples(self) -> int:
        """Usable rows of the sites' own test splits (0 until setup("site_test") or when there are none)."""
        return len(self.items.get(SITE_TEST, []))

    def class_counts(self, split: str = "train") -> list[int]:
        counts = Counter(it["label"] for it in self.items.get(split, []))
        return [counts.get(i, 0) for i in range(len(self.classes))]
