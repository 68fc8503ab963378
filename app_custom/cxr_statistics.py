"""A site's federated statistics: NVFlare's `Statistics` spec over the site's own manifest and images.

What a site measures, one record per manifest row (every split; one NVFlare dataset, `DATASET`):

- `split=<s>` and `label=<class>`: 1 or 0 per row (the sum is the count, the mean the share);
- `image:width`, `image:height`: pixels, from the file header;
- `image:intensity`, `image:lung_intensity`: per image the mean intensity (as the models see it, in
  [0, 1]) of the whole image and inside its lung mask; their histograms count pixels, over all images;
- a manifest column a job names: numeric (`<column>`: the value) or categorical (`<column>=<value>`:
  1 or 0 per row with a value, values not named counted under `<column>=(other)`).

The count of every feature is the number of rows (images) it was measured on, the unit NVFlare's
privacy cleansers judge (min count, histogram bins). A feature measured on no row is not declared (an
NVFlare mean of nothing would divide by zero). Only what the spec asks for leaves this module: counts,
sums, means, standard deviations, min/max (noised by the job's cleanser) and histograms.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.statistics_spec import Bin, DataType, Feature, Histogram, HistogramType, Statistics

from app_custom.site_files import SITE_CONFIG, local_settings, site_data_dir
from lightning_modules.data.imageio import ImageReadError, read_header, read_image, read_mask
from lightning_modules.data.manifest import COLUMNS, MANIFEST_NAME, SPLITS, Record, read_manifest, resolve

DATASET = "all"  # every row of the site's manifest; the splits are features (every site must have each dataset)
INTENSITY_RANGE = (0.0, 1.0)  # read_image's range
INDICATOR_HISTOGRAM = {"bins": 2, "range": [0.0, 1.0]}  # rows without / with the value
OTHER = "(other)"
IMAGE_FEATURES = ("width", "height", "intensity", "lung_intensity")
PIXEL_FEATURES = ("intensity", "lung_intensity")
# Manifest columns a job may not name: paths and patient identifiers (a count per identifier would
# tell which patient is at which site), and the two the statistics already cover.
REFUSED_COLUMNS = ("image", "mask", "opacity", "patient_id", "label", "split")
JOB_CUSTOM = Path(__file__).resolve().parents[1]  # the job's custom/ folder (when this copy is the job's)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatFeature:
    """One NVFlare feature: its name, the group it belongs to (image, split, label or a column) and,
    for a 0/1 feature, the value it indicates."""

    name: str
    group: str
    value: str = ""
    kind: str = "numeric"  # "indicator" (0/1), "pixels" (histogram of pixels), "numeric"


def stat_features(classes, numeric_columns=(), categories: dict | None = None) -> list[StatFeature]:
    """Every feature a job with these classes and columns computes, in order (the coordinator and
    each site build the same list)."""
    found = [StatFeature(f"split={s}", "split", s, "indicator") for s in SPLITS]
    found += [StatFeature(f"label={c}", "label", c, "indicator") for c in classes]
    found += [StatFeature(f"image:{f}", "image", f, "pixels" if f in PIXEL_FEATURES else "numeric")
              for f in IMAGE_FEATURES]
    found += [StatFeature(c, c) for c in numeric_columns]
    for column, values in (categories or {}).items():
        found += [StatFeature(f"{column}={v}", column, v, "indicator") for v in [*values, OTHER]]
    return found


def histogram_config(features: list[StatFeature], bins: int) -> dict:
    """NVFlare's histogram configuration: a 0/1 feature in two bins, pixels over [0, 1], the rest over
    the range the sites' noised min and max give. Every feature is named (no "*")."""
    config = {}
    for f in features:
        if f.kind == "indicator":
            config[f.name] = dict(INDICATOR_HISTOGRAM)
        elif f.kind == "pixels":
            config[f.name] = {"bins": bins, "range": list(INTENSITY_RANGE)}
        else:
            config[f.name] = {"bins": bins}
    return config


class CXRStatistics(Statistics):
    """The site's statistics (NVFlare calls it on the site; nothing it does not return leaves it)."""

    def __init__(self, classes: list[str] | None = None, numeric_columns: list[str] | None = None,
                 categories: dict[str, list[str]] | None = None, bins: int = 10):
        super().__init__()
        # kept as attributes under their own names: NVFlare's job exporter writes them as the arguments
        self.classes = list(classes or [])
        self.numeric_columns = list(numeric_columns or [])
        self.categories = {str(k): list(v) for k, v in (categories or {}).items()}
        self.bins = int(bins)
        self._values: dict[str, np.ndarray] = {}  # feature name -> one value per row (NaN: not measured)
        self._pixels: dict[str, np.ndarray] = {}  # pixel feature name -> pixel counts in `bins` bins

    def initialize(self, fl_ctx: FLContext):
        # the site's settings are found from the job's app folder inside its workspace, not from this
        # file: NVFlare imports the class by its module path, which a copy installed at the site shadows
        app_root = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT) or JOB_CUSTOM)
        site = fl_ctx.get_identity_name()
        self.load(site_data_dir(*local_settings(SITE_CONFIG, app_root.absolute()), site))

    def load(self, site_dir: Path) -> "CXRStatistics":
        """Measure every row of site_dir's manifest (ManifestError naming the file when it is unusable)."""
        records = read_manifest(Path(site_dir) / MANIFEST_NAME)
        measured = _measure_rows(Path(site_dir), records, self.bins)
        self._values, self._pixels = {}, {}
        for f in stat_features(self.classes, self.numeric_columns, self.categories):
            values = measured[f.value] if f.group == "image" else _row_values(f, records, self.categories)
            self._values[f.name] = values
            if f.kind == "pixels":
                self._pixels[f.name] = measured[f"{f.value}:pixels"]
        return self

    # ---- the Statistics spec --------------------------------------------------------------------
    def features(self) -> dict[str, list[Feature]]:
        return {DATASET: [Feature(name, DataType.FLOAT) for name, v in self._values.items()
                          if np.isfinite(v).any()]}

    def count(self, dataset_name: str, feature_name: str) -> int:
        return int(np.isfinite(self._values[feature_name]).sum())

    def sum(self, dataset_name: str, feature_name: str) -> float:
        return float(np.nansum(self._values[feature_name]))

    def mean(self, dataset_name: str, feature_name: str) -> float:
        return float(np.nanmean(self._values[feature_name]))

    def stddev(self, dataset_name: str, feature_name: str) -> float:
        values = self._finite(feature_name)
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    def variance_with_mean(self, dataset_name: str, feature_name: str, global_mean: float,
                           global_count: float) -> float:
        values = self._finite(feature_name)
        return float(np.sum((values - global_mean) ** 2) / (global_count - 1)) if global_count > 1 else 0.0

    def min_value(self, dataset_name: str, feature_name: str) -> float:
        return float(np.nanmin(self._values[feature_name]))

    def max_value(self, dataset_name: str, feature_name: str) -> float:
        return float(np.nanmax(self._values[feature_name]))

    def histogram(self, dataset_name: str, feature_name: str, num_of_bins: int, global_min_value: float,
                  global_max_value: float) -> Histogram:
        edges = np.linspace(global_min_value, global_max_value, num_of_bins + 1)
        if feature_name in self._pixels:
            counts = self._pixels[feature_name]
            if len(counts) != num_of_bins or (global_min_value, global_max_value) != INTENSITY_RANGE:
                raise ValueError(f"{feature_name}: pixels were counted in {len(counts)} bins over "
                                 f"{list(INTENSITY_RANGE)}, not {num_of_bins} over "
                                 f"[{global_min_value}, {global_max_value}]")
        else:
            counts, _ = np.histogram(self._finite(feature_name), bins=edges)
        return Histogram(HistogramType.STANDARD, [Bin(float(lo), float(hi), int(n))
                                                  for lo, hi, n in zip(edges[:-1], edges[1:], counts)])

    def _finite(self, feature_name: str) -> np.ndarray:
        values = self._values[feature_name]
        return values[np.isfinite(values)]


def cell(record: Record, column: str) -> str:
    """A manifest row's value in `column` ('' when it has none)."""
    return getattr(record, column) if column in COLUMNS else record.extra.get(column, "")


def numeric_cell(text: str) -> float:
    """The cell as a finite number, else NaN (empty, not a number, inf)."""
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def _row_values(f: StatFeature, records: list[Record], categories: dict) -> np.ndarray:
    """One value per row of a non-image feature (NaN where the row has none)."""
    if f.group == "split":
        return np.array([float(r.split == f.value) for r in records])
    if f.group == "label":
        return np.array([float(r.label == f.value) if r.label else math.nan for r in records])
    if f.kind == "numeric":
        return np.array([numeric_cell(cell(r, f.group)) for r in records])
    named = categories[f.group]
    flags = []
    for r in records:
        value = cell(r, f.group)
        if not value:
            flags.append(math.nan)
        elif f.value == OTHER:
            flags.append(float(value not in named))
        else:
            flags.append(float(value == f.value))
    return np.array(flags)


def _measure_rows(site_dir: Path, records: list[Record], bins: int) -> dict[str, np.ndarray]:
    """Per row: width, height, mean intensity of the image and inside its lung mask (NaN where the
    file is unreadable or the row has no mask); and the pixel counts of both, over all rows."""
    columns = {name: np.full(len(records), math.nan) for name in IMAGE_FEATURES}
    pixels = {f"{name}:pixels": np.zeros(bins, dtype=np.int64) for name in PIXEL_FEATURES}
    skipped = 0
    for i, record in enumerate(records):
        try:
            image_path = resolve(site_dir, record.image)
            header = read_header(image_path)
            columns["width"][i], columns["height"][i] = header.width, header.height
            image = read_image(image_path)
        except ImageReadError as exc:
            skipped += 1
            log.warning("cxrfl stats: %s; left out of the image statistics", exc)
            continue
        _add_pixels(columns["intensity"], pixels["intensity:pixels"], i, image, bins)
        lungs = _lung_pixels(site_dir, record, image)
        if lungs is not None and lungs.size:
            _add_pixels(columns["lung_intensity"], pixels["lung_intensity:pixels"], i, lungs, bins)
    if skipped:
        log.warning("cxrfl stats: %d of %d images of %s were unreadable", skipped, len(records), site_dir)
    return {**columns, **pixels}


def _add_pixels(means: np.ndarray, counts: np.ndarray, row: int, pixels: np.ndarray, bins: int) -> None:
    means[row] = float(pixels.mean())
    counts += np.histogram(pixels, bins=bins, range=INTENSITY_RANGE)[0]


def _lung_pixels(site_dir: Path, record: Record, image: np.ndarray) -> np.ndarray | None:
    """The image's pixels inside its lung mask; None without a usable mask (none, unreadable, another size)."""
    if not record.mask:
        return None
    try:
        mask = read_mask(resolve(site_dir, record.mask))
    except ImageReadError as exc:
        log.warning("cxrfl stats: %s; no lung statistics for this image", exc)
        return None
    if mask.shape != image.shape:
        log.warning("cxrfl stats: %s: mask %s and image %s differ in size; no lung statistics for this image",
                    record.mask, mask.shape, image.shape)
        return None
    return image[mask > 0]
