"""Synthetic multi-site chest X-ray phantom: the embedded default data set.

Each image is built analytically on a normalised grid (x right, y down, both in [-1, 1]):
body soft tissue, two lung fields with a domed diaphragm and costophrenic angles, heart and
mediastinum, spine, posterior and anterior ribs, clavicles, lung markings and quantum noise.
Pneumonia cases get patchy or lobar opacities confined to the lungs. Because shapes are
evaluated on the (site-transformed) grid, image, lung mask and opacity mask align exactly.

Sites differ the way hospitals do: exposure, contrast, gamma, noise, blur, patient
positioning (shift/rotation), field of view, a burned-in side marker, and pneumonia prevalence,
so federated splits are non-IID. Two dials set how much, separately: `site_shift` scales the
acquisition differences (0: one shared scanner profile, IID acquisition; 1: the default) and
`label_alpha` draws each site's prevalence from a Dirichlet (label skew). Everything is
deterministic for a seed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.ndimage import gaussian_filter

from lightning_modules.data.imageio import write_png
from lightning_modules.data.atomic import write_json
from lightning_modules.data.manifest import DATASET_JSON, MANIFEST_NAME, TEST_SITE, Record, write_manifest

CLASSES = ["normal", "pneumonia"]
# What tells the label: the opacity plus site cues (default), or the opacity only.
LABEL_SIGNALS = ("opacity+site", "opacity")


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition and population of one hospital."""

    name: str
    prevalence: float  # share of pneumonia cases
    exposure: float  # brightness offset
    contrast: float
    gamma: float
    noise: float  # quantum noise std
    blur: float  # detector blur, in pixels at 256 px
    max_shift: float  # positioning jitter, fraction of the field
    max_rotation: float  # degrees
    field_of_view: float  # >1 zooms out (more body visible)
    marker_corner: int  # burned-in side marker position, 0..3


# Each acquisition parameter is drawn per site from its range (in this order: the seed's draws);
# the shared reference profile of site_shift 0 is the ranges' midpoint.
ACQUISITION_RANGES = {
    "exposure": (-0.08, 0.08),
    "contrast": (0.8, 1.2),
    "gamma": (0.75, 1.35),
    "noise": (0.01, 0.045),
    "blur": (0.4, 1.6),
    "max_shift": (0.02, 0.07),
    "max_rotation": (2.0, 7.0),
    "field_of_view": (0.95, 1.15),
}
REFERENCE_ACQUISITION = {name: (lo + hi) / 2 for name, (lo, hi) in ACQUISITION_RANGES.items()}
REFERENCE_MARKER_CORNER = 0
# Beyond 1 the spread is extrapolated; these parameters are floored at 0 there (a std, a sigma,
# jitter bounds). At 2 the rest stay valid: contrast >= 0.6, gamma >= 0.45, field of view >= 0.85.
NON_NEGATIVE = ("noise", "blur", "max_shift", "max_rotation")
MAX_SITE_SHIFT = 2.0
# The rng streams of the sites' own test images: SITE_TEST_STREAM + site number (the sites draw
# from 1..N, the shared test set from 10_000).
SITE_TEST_STREAM = 20_000


def site_profiles(n_sites: int, seed: int = 0, site_shift: float = 1.0,
                  label_alpha: float | None = None) -> list[SiteProfile]:
    """Deterministic acquisition profiles for n sites, clearly different at site_shift 1 (see
    `shift_profile`); label_alpha None keeps the fixed prevalences (0.25..0.65, shuffled), a value
    draws them with `dirichlet_prevalences`. The two dials draw from separate streams."""
    if n_sites < 1:
        raise ValueError("n_sites must be >= 1")
    check_dials(site_shift, label_alpha)
    rng = np.random.default_rng([seed, 7919])
    prevalences = np.linspace(0.25, 0.65, n_sites) if n_sites > 1 else np.array([0.45])
    rng.shuffle(prevalences)
    if label_alpha is not None:
        prevalences = dirichlet_prevalences(n_sites, label_alpha, seed)
    profiles = []
    for i in range(n_sites):
        acquisition = {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in ACQUISITION_RANGES.items()}
        own = SiteProfile(name=f"site-{i + 1}", prevalence=float(prevalences[i]), marker_corner=int(i % 4),
                          **acquisition)
        profiles.append(shift_profile(own, site_shift))
    return profiles


def check_dials(site_shift: float, label_alpha: float | None,
                names: tuple[str, str] = ("site_shift", "label_alpha")) -> None:
    """ValueError (one line, naming the option as `names` spell it) unless both heterogeneity
    dials are usable."""
    if not (isinstance(site_shift, numbers.Real) and 0.0 <= site_shift <= MAX_SITE_SHIFT):
        raise ValueError(f"{names[0]} must be a number in [0, {MAX_SITE_SHIFT:g}], got {site_shift!r}")
    if label_alpha is not None and not (isinstance(label_alpha, numbers.Real) and 0.0 < label_alpha < math.inf):
        raise ValueError(f"{names[1]} must be a finite number > 0 (or left out for the fixed prevalences), "
                         f"got {label_alpha!r}")


def shift_profile(own: SiteProfile, site_shift: float) -> SiteProfile:
    """`own` moved toward (site_shift < 1) or away from (> 1) the shared reference profile: each
    acquisition parameter is reference + site_shift * (own - reference). The side-marker corner
    cannot be interpolated: at 0 every site puts it in the reference corner; between 0 and 1 a
    share site_shift of a site's images carries it in the site's own corner (see `_ImageSet`).
    Prevalence is label skew, not acquisition: unchanged."""
    if site_shift == 1.0:
        return own  # exactly today's profile (no float round trip)
    values = {}
    for name, reference in REFERENCE_ACQUISITION.items():
        value = reference + site_shift * (getattr(own, name) - reference)
        values[name] = max(value, 0.0) if name in NON_NEGATIVE else value
    corner = own.marker_corner if site_shift > 0 else REFERENCE_MARKER_CORNER
    return replace(own, marker_corner=corner, **values)


def dirichlet_prevalences(n_sites: int, label_alpha: float, seed: int = 0) -> np.ndarray:
    """Each site's pneumonia share: its class distribution drawn from Dirichlet(label_alpha, ...)
    over the classes (0.1: most sites nearly one class; large: all near 1 / n_classes)."""
    rng = np.random.default_rng([seed, 8837])
    shares = rng.dirichlet([label_alpha] * len(CLASSES), size=n_sites)
    return shares[:, CLASSES.index("pneumonia")]


@dataclass
class Phantom:
    image: np.ndarray  # float32 [0, 1]
    lung_mask: np.ndarray  # uint8 {0, 1}
    opacity_mask: np.ndarray  # uint8 {0, 1}, empty for normal
    label: str


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma=sigma * size / 256.0)
    return field / (field.std() + 1e-6)


def _band(dist: np.ndarray, half_width: float, soft: float) -> np.ndarray:
    """1 inside |dist| < half_width, with soft edges."""
    return np.clip((half_width - np.abs(dist)) / soft + 0.5, 0.0, 1.0)


def _ellipse(x, y, cx, cy, rx, ry, angle=0.0):
    ca, sa = np.cos(angle), np.sin(angle)
    u = (x - cx) * ca + (y - cy) * sa
    v = -(x - cx) * sa + (y - cy) * ca
    return (u / rx) ** 2 + (v / ry) ** 2


def _lung(x, y, side, anatomy):
    """Boolean lung field; side=-1 is the patient's right (image left)."""
    top, base, width = anatomy["lung_top"], anatomy["lung_base"], anatomy["lung_width"]
    if side > 0:
        width *= 0.92  # left lung is smaller (heart)
    medial = side * anatomy["mediastinum"]
    height = base - top
    t = np.clip((y - top) / height, 0.0, 1.2)
    # half-width grows like a rounded apex and is widest just above the diaphragm
    lateral_extent = width * np.sqrt(np.clip(1.0 - (1.0 - np.minimum(t, 1.0)) ** 2, 0.0, 1.0)) ** 0.8
    centre = medial + side * width * 0.05
    inside_x = (side * (x - centre) >= -0.02 * (1 - t)) & (side * (x - medial) <= lateral_extent)
    # diaphragm dome: highest in the middle of each hemithorax, deep costophrenic angle laterally
    rel = np.clip(side * (x - medial) / max(width, 1e-3), 0.0, 1.0)
    dome = base - anatomy["dome"] * np.sin(np.pi * np.clip(rel * 0.9, 0, 1)) + 0.05 * rel**4
    if side > 0:
        dome = dome - 0.03
    return inside_x & (y >= top) & (y <= dome) & (t > 0)


def render_phantom(rng: np.random.Generator, profile: SiteProfile, size: int, pneumonia: bool, anatomy=None,
                   marker: bool = True, opacity_gain: float = 1.0) -> Phantom:
    """One frontal (PA) chest radiograph phantom with its lung and opacity masks; marker False
    leaves out the burned-in side marker (a site cue, so a label cue wherever prevalence differs);
    opacity_gain scales the opacities' density (same masks)."""
    # The steps draw from rng in this order; changing it changes every generated image.
    if anatomy is None:
        anatomy = sample_anatomy(rng)
    x, y = _patient_grid(rng, profile, size)
    density, lungs = _anatomy_density(rng, x, y, size, anatomy)
    opacity = np.zeros_like(density)
    if pneumonia:
        _add_opacities(opacity, rng, x, y, size, lungs)
    density += opacity_gain * opacity  # x * 1.0 is exact: the default phantom keeps its bytes
    image = _acquire(rng, density, profile, size, marker)
    opacity_mask = ((opacity > 0.06) & lungs).astype(np.uint8)
    return Phantom(image=image, lung_mask=lungs.astype(np.uint8), opacity_mask=opacity_mask,
                   label=CLASSES[1] if pneumonia else CLASSES[0])


def _patient_grid(rng: np.random.Generator, profile: SiteProfile, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Acquisition geometry: the (x, y) grid the anatomy is evaluated on (rotated, shifted, scaled)."""
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gx, gy = np.meshgrid(lin, lin)
    angle = np.deg2rad(rng.uniform(-profile.max_rotation, profile.max_rotation))
    shift = rng.uniform(-profile.max_shift, profile.max_shift, size=2) * 2.0
    scale = profile.field_of_view * rng.uniform(0.97, 1.03)
    ca, sa = np.cos(angle), np.sin(angle)
    x = scale * (ca * gx - sa * gy) + shift[0]
    y = scale * (sa * gx + ca * gy) + shift[1]
    return x, y


def _anatomy_density(rng: np.random.Generator, x, y, size: int, anatomy: dict) -> tuple[np.ndarray, np.ndarray]:
    """(density, lung fields) of the normal anatomy; density: higher = more attenuating = brighter."""
    body = _ellipse(x, y, 0.0, 0.25, anatomy["body_width"], 1.25) <= 1.0
    shoulders = _ellipse(x, y, 0.0, -0.62, anatomy["body_width"] * 1.15, 0.3) <= 1.0
    body = body | shoulders
    density = np.where(body, 0.55, 0.02).astype(np.float32)
    # soft tissue thicker towards the abdomen
    density += body * np.clip(y - 0.3, 0, None) * 0.25

    right = _lung(x, y, -1, anatomy)
    left = _lung(x, y, +1, anatomy)
    heart_q = _ellipse(x, y, anatomy["heart_x"], anatomy["heart_y"], anatomy["heart_rx"], anatomy["heart_ry"], -0.45)
    heart = heart_q <= 1.0
    lungs = (right | left) & ~heart
    density = np.where(lungs, 0.16, density)

    # lung markings: vessels fan out from the hila, fading to the periphery
    markings = _smooth_noise(rng, size, 2.2)
    for side in (-1, 1):
        hx, hy = side * 0.18, -0.05
        r = np.sqrt((x - hx) ** 2 + (y - hy) ** 2)
        density += lungs * np.clip(0.08 - 0.08 * r, 0, None) * (0.85 + 0.3 * markings)
    density += lungs * 0.012 * markings

    # mediastinum, heart, spine
    mediastinum = _band(x, anatomy["mediastinum"] * 1.1, 0.04) * (y > -0.85) * (y < anatomy["heart_y"])
    density += 0.18 * mediastinum * ~lungs
    density += 0.24 * np.clip((1.0 - heart_q) * 5.0, 0, 1) * (1.0 - 0.25 * lungs)
    spine = _band(x, 0.065, 0.015) * (y > -0.9)
    vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * (y + 1) / anatomy["rib_spacing"])
    density += spine * (0.07 + 0.04 * vertebrae)
    _add_ribs_and_clavicles(density, x, y, anatomy, body)
    return density, lungs


def _add_ribs_and_clavicles(density: np.ndarray, x, y, anatomy: dict, body: np.ndarray) -> None:
    """Adds the ribs and clavicles to `density` in place."""
    # ribs: posterior arcs dropping laterally, anterior ones fainter and sloping medially
    for k in range(10):
        y0 = anatomy["lung_top"] - 0.04 + k * anatomy["rib_spacing"]
        d = np.abs(x) - 0.06
        y_post = y0 - 0.22 * d + 0.7 * d**2
        density += 0.13 * _band(y - y_post, 0.022, 0.012) * (d > 0) * (d < 0.9) * body
        y_ant = y0 + 0.12 + 0.35 * (0.75 - np.clip(d, 0, 0.75)) ** 1.5 - 0.05
        density += 0.05 * _band(y - y_ant, 0.018, 0.015) * (d > 0.15) * (d < 0.8) * body
    for side in (-1, 1):
        x0, y0, x1, y1 = side * 0.08, anatomy["lung_top"] + 0.02, side * 0.68, anatomy["lung_top"] - 0.12
        t = np.clip(((x - x0) * (x1 - x0) + (y - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
        dist = np.sqrt((x - (x0 + t * (x1 - x0))) ** 2 + (y - (y0 + t * (y1 - y0))) ** 2)
        density += 0.22 * _band(dist, 0.03, 0.012)


def _add_opacities(opacity: np.ndarray, rng: np.random.Generator, x, y, size: int, lungs: np.ndarray) -> None:
    """Pneumonia: adds patchy or lobar opacities (extra density) to `opacity` in place, confined to the lungs."""
    patch = _smooth_noise(rng, size, 3.0)
    n_foci = rng.integers(1, 4)
    lobar = rng.random() < 0.35
    for _ in range(n_foci):
        side = rng.choice([-1, 1])
        fx = side * rng.uniform(0.2, 0.55)
        fy = rng.uniform(-0.3, 0.4) if not lobar else rng.uniform(0.1, 0.35)
        radius = rng.uniform(0.14, 0.24) * (1.5 if lobar else 1.0)
        r2 = ((x - fx) ** 2 + (y - fy) ** 2) / radius**2
        strength = rng.uniform(0.16, 0.34)
        opacity += strength * np.exp(-r2) * np.clip(0.85 + 0.35 * patch, 0, None)
    opacity *= lungs


def _acquire(rng: np.random.Generator, density: np.ndarray, profile: SiteProfile, size: int, marker: bool) -> np.ndarray:
    """The detector image (float32 in [0, 1]) of `density`: blur, contrast, gamma, noise, side marker."""
    density = gaussian_filter(density, sigma=profile.blur * size / 256.0)
    image = np.clip(density * profile.contrast + profile.exposure, 0.0, 1.0) ** profile.gamma
    image = image + rng.normal(0.0, profile.noise, size=image.shape)
    # burned-in side marker ("L") in a site-specific corner: a realistic shortcut to avoid
    if marker:
        m = max(3, size // 20)
        r0, c0 = [(m, m), (m, size - 3 * m), (size - 3 * m, m), (size - 3 * m, size - 3 * m)][profile.marker_corner]
        image[r0 : r0 + 2 * m, c0 : c0 + m // 2 + 1] = 0.95
        image[r0 + 2 * m - m // 2 - 1 : r0 + 2 * m, c0 : c0 + m + 1] = 0.95
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def sample_anatomy(rng: np.random.Generator) -> dict:
    """One patient's body habitus."""
    return {
        "body_width": rng.uniform(0.8, 0.95),
        "lung_top": rng.uniform(-0.78, -0.68),
        "lung_base": rng.uniform(0.42, 0.58),
        "lung_width": rng.uniform(0.5, 0.62),
        "mediastinum": rng.uniform(0.1, 0.14),
        "dome": rng.uniform(0.08, 0.16),
        "heart_x": rng.uniform(0.12, 0.2),
        "heart_y": rng.uniform(0.28, 0.34),
        "heart_rx": rng.uniform(0.3, 0.38),
        "heart_ry": rng.uniform(0.22, 0.28),
        "rib_spacing": rng.uniform(0.13, 0.16),
    }


def planted_signal_phantoms(count: int, size: int = 64, seed: int = 0, opacity_gain: float = 3.0) -> list[Phantom]:
    """Phantoms whose label depends ONLY on the opacity: one acquisition profile for every image,
    no side marker, pneumonia with probability 0.5 independent of anatomy and positioning. An
    attribution method has one thing to find here, and each image's opacity mask says where.
    The opacities are opacity_gain times denser than by default so that a small model learns
    them in a few epochs at 64 px (the checks test the map, not how hard the task is)."""
    if count < 1 or size < 32:
        raise ValueError("need count >= 1 and size >= 32")
    profile = site_profiles(1, seed)[0]
    rng = np.random.default_rng([seed, 4242])
    return [render_phantom(rng, profile, size, bool(rng.random() < 0.5), marker=False, opacity_gain=opacity_gain)
            for _ in range(count)]


def generate_dataset(out: str | Path, *, sites: int = 3, per_site: int = 100, test_size: int | None = None,
                     size: int = 256, seed: int = 0, val_fraction: float = 0.2,
                     follow_up_rate: float = 0.1, label_signal: str = "opacity+site",
                     site_shift: float = 1.0, label_alpha: float | None = None, site_test: int = 0) -> dict:
    """Write a multi-site data root (site-1..N + test) of phantoms; returns its dataset info.

    About follow_up_rate of patients get a second image (same anatomy and label, new
    positioning), so splitting has to respect patients. label_signal "opacity" removes the
    site cues from the label (every site at prevalence 0.5, no side marker): only the opacity
    tells pneumonia, as an attribution check needs. site_shift scales how different the sites'
    acquisition is (0 = one shared profile, 1 = default, up to MAX_SITE_SHIFT); label_alpha draws
    each site's prevalence from a Dirichlet and writes exactly round(prevalence * per_site)
    pneumonia images there, at least one image of each class. The test set keeps prevalence 0.5.
    site_test adds that many images per site (the site's acquisition profile and prevalence, new
    patients) as the site's own test split: rows with split test in its manifest.
    """
    if sites < 1 or per_site < 2 or size < 32:
        raise ValueError("need sites >= 1, per_site >= 2 and size >= 32")
    check_site_test(site_test)
    if label_signal not in LABEL_SIGNALS:
        raise ValueError(f"label_signal must be one of {', '.join(LABEL_SIGNALS)}")
    opacity_only = label_signal == "opacity"
    if opacity_only and label_alpha is not None:
        raise ValueError("label_alpha cannot be combined with label_signal 'opacity' (every site at prevalence 0.5)")
    out = Path(out)
    profiles = site_profiles(sites, seed, site_shift, label_alpha)
    test_size = per_site if test_size is None else test_size
    image_set = _ImageSet(out=out, seed=seed, size=size, follow_up_rate=follow_up_rate, marker=not opacity_only,
                          own_marker_share=min(site_shift, 1.0))

    summary = {}
    for i, profile in enumerate(profiles):
        records = _site_images(image_set, profile, per_site, i + 1, opacity_only, label_alpha is not None,
                               lambda rng: "val" if rng.random() < val_fraction else "train")
        if site_test:  # own streams: the train/val images stay what they are without a site test split
            records += _site_images(image_set, profile, site_test, SITE_TEST_STREAM + i + 1, opacity_only,
                                    label_alpha is not None, lambda rng: TEST_SITE, id_prefix="t")
        write_manifest(out / profile.name / MANIFEST_NAME, records)
        summary[profile.name] = _counts(records)
    test_records = image_set.write(TEST_SITE, test_size, lambda rng: profiles[rng.integers(len(profiles))], 0.5,
                                   lambda rng: "test", stream=10_000)
    summary[TEST_SITE] = _counts(test_records)
    dials = {**({"site_shift": site_shift} if site_shift != 1.0 else {}),
             **({"label_alpha": label_alpha} if label_alpha is not None else {}),
             **({"site_test": site_test} if site_test else {})}
    info = {
        "classes": CLASSES,
        "source": "synthetic-phantom",
        "generator": {"sites": sites, "per_site": per_site, "test_size": test_size, "size": size, "seed": seed,
                      "val_fraction": val_fraction, "follow_up_rate": follow_up_rate,
                      **({"label_signal": label_signal} if opacity_only else {}), **dials},
        "site_profiles": [asdict(p) for p in profiles],
        "counts": summary,
    }
    write_json(out / DATASET_JSON, info)
    return info


def check_site_test(site_test, name: str = "site_test") -> None:
    """ValueError (one line, naming the option as `name` spells it) unless site_test is a whole number >= 0."""
    if not (isinstance(site_test, numbers.Integral) and not isinstance(site_test, bool) and site_test >= 0):
        raise ValueError(f"{name} must be a whole number >= 0 (images per site held out as its own test split), "
                         f"got {site_test!r}")


def _site_images(image_set: "_ImageSet", profile: SiteProfile, count: int, stream: int, opacity_only: bool,
                 planned: bool, split_for_patient: Callable[[np.random.Generator], str],
                 id_prefix: str = "p") -> list[Record]:
    """`count` images of one site (its profile; its prevalence, exactly as planned when `planned`)."""
    plan = _label_plan(count, profile.prevalence, image_set.seed, stream=stream) if planned else None
    return image_set.render(profile.name, count, lambda rng: profile, 0.5 if opacity_only else None,
                            split_for_patient, stream=stream, label_plan=plan, id_prefix=id_prefix)


def _label_plan(count: int, prevalence: float, seed: int, stream: int) -> list[bool]:
    """Pneumonia flag of each of a site's `count` images: round(prevalence * count) of them, at
    least one of each class (count >= 2), in a seeded order."""
    n_pneumonia = min(max(round(prevalence * count), 1), count - 1)
    flags = np.array([True] * n_pneumonia + [False] * (count - n_pneumonia))
    return [bool(f) for f in np.random.default_rng([seed, 8837, stream]).permutation(flags)]


@dataclass(frozen=True)
class _ImageSet:
    """How `generate_dataset` writes one folder (a site or test/) of phantoms."""

    out: Path
    seed: int
    size: int
    follow_up_rate: float
    marker: bool
    own_marker_share: float = 1.0  # share of images with the side marker in their site's own corner

    def write(self, folder_name: str, count: int, pick_profile: Callable[[np.random.Generator], SiteProfile],
              prevalence: float | None, split_for_patient: Callable[[np.random.Generator], str],
              stream: int, label_plan: list[bool] | None = None) -> list[Record]:
        """`render` the images and write their manifest, OUT/folder_name/manifest.csv."""
        records = self.render(folder_name, count, pick_profile, prevalence, split_for_patient, stream, label_plan)
        write_manifest(self.out / folder_name / MANIFEST_NAME, records)
        return records

    def render(self, folder_name: str, count: int, pick_profile: Callable[[np.random.Generator], SiteProfile],
               prevalence: float | None, split_for_patient: Callable[[np.random.Generator], str],
               stream: int, label_plan: list[bool] | None = None, id_prefix: str = "p") -> list[Record]:
        """`count` images (patients with one or two images) in OUT/folder_name, their rows (no
        manifest written); prevalence None: the patient's profile's; label_plan: each image's label
        instead (a follow-up image only where the plan's next label is the same). Each call draws
        from its own `stream`; patients are named FOLDER-<id_prefix>00001.. (files likewise)."""
        folder = self.out / folder_name
        rng = np.random.default_rng([self.seed, stream])
        records = []
        index = 0
        patient = 0
        while index < count:
            patient += 1
            pid = f"{folder_name}-{id_prefix}{patient:05d}"
            profile = pick_profile(rng)
            if label_plan is None:
                pneumonia = bool(rng.random() < (profile.prevalence if prevalence is None else prevalence))
            else:
                pneumonia = label_plan[index]
            anatomy = sample_anatomy(rng)
            n_images = 2 if (rng.random() < self.follow_up_rate and index + 1 < count
                             and (label_plan is None or label_plan[index + 1] == pneumonia)) else 1
            split = split_for_patient(rng)
            for k in range(n_images):
                ph = render_phantom(rng, self._marked(rng, profile), self.size, pneumonia, anatomy, marker=self.marker)
                stem = f"{pid}-{k}"
                write_png(folder / "images" / f"{stem}.png", ph.image)
                write_png(folder / "masks" / f"{stem}.png", ph.lung_mask, mask=True)
                opacity = ""
                if pneumonia:
                    opacity = f"opacity/{stem}.png"
                    write_png(folder / opacity, ph.opacity_mask, mask=True)
                records.append(Record(image=f"images/{stem}.png", mask=f"masks/{stem}.png", label=ph.label,
                                      patient_id=pid, split=split, site=profile.name, opacity=opacity))
                index += 1
        return records

    def _marked(self, rng: np.random.Generator, profile: SiteProfile) -> SiteProfile:
        """`profile`, or for a share 1 - own_marker_share of images (drawn only when that share is
        strictly between 0 and 1) the same with its marker in the reference corner."""
        if 0.0 < self.own_marker_share < 1.0 and self.marker and rng.random() >= self.own_marker_share:
            return replace(profile, marker_corner=REFERENCE_MARKER_CORNER)
        return profile


def _counts(records: list[Record]) -> dict:
    counts: dict = {}
    for r in records:
        key = f"{r.split}/{r.label}"
        counts[key] = counts.get(key, 0) + 1
    return counts
