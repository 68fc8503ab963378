"""`TrainConfig`: everything one training run (central, or one site of a federated run) depends on.

One frozen dataclass, validated when it is made and never changed after (derive a new one with
`dataclasses.replace`). It lives in the lowest layer because a site's client script loads it from the
job (`custom/cxrfl_train.json`) with no `cxrfl` or NVFlare code around. Each field's metadata carries its
command-line help; `cxrfl/options.py` turns the fields into every command's options.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lightning_modules.data.atomic import atomic_write_text, read_json_object
from lightning_modules.data.transforms import ROI_MODES
from lightning_modules.networks import CLASSIFIERS, SEGMENTERS, input_size_problem

TASKS = ("segment", "classify")
DEFAULT_MODEL = {"segment": "unet", "classify": "densenet121"}
DEFAULT_IMAGE_SIZE = 128  # one default input side for both tasks, central and federated
CLASS_WEIGHTS = ("none", "balanced")
SEED_LIMIT = 2**32  # what numpy's and Lightning's seeding accept
# Federated algorithms (docs/algorithms.md); each site needs to know which one runs.
ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedbn", "ditto")
FEDPROX_MU_DEFAULT = 0.01  # NVFlare's FedProx examples' mu
DITTO_LAMBDA_DEFAULT = 0.1  # the Ditto paper's and NVFlare's Ditto example's lambda
# Privacy (docs/privacy.md): DP-SGD has a formal (epsilon, delta) guarantee; percentile and svt are NVFlare's
# filters on a federated site's update (truncation/sparsification; SVT with its per-round epsilon).
DP_MODES = ("dpsgd", "percentile", "svt")
UPDATE_FILTERS = ("percentile", "svt")
DP_DELTA_DEFAULT = 1e-5
DP_MAX_GRAD_NORM_DEFAULT = 1.0
# Trainer precision (lightning_modules/accelerate.py resolves auto on the machine that trains)
PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")
TRAIN_CONFIG_FILE = "cxrfl_train.json"  # the site settings a federated job carries in its custom/ folder


def option(help: str, **cli) -> dict:
    """Field metadata: the help text, plus how the command line shows it (flag, choices, metavar,
    parse, scope "central" | "fl" | "all", cli=False for fields no command sets)."""
    return {"help": help, **cli}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the option."""


@dataclass(frozen=True)
class TrainConfig:
    task: str = field(default="classify", metadata=option(
        "segment: lung masks (U-Net); classify: pathology labels (DenseNet121 or CNN5); roi: classify on the lung "
        "region (= classify --roi mask)", choices=("segment", "classify", "roi"), required=True))
    roi: str | None = field(default=None, metadata=option(
        "classify on the lung region only: 'mask' zeroes the background (default when the flag is given alone), "
        "'crop' crops to the lungs' bounding box", choices=ROI_MODES, const="mask", aliases=("--roi-mode",)))
    model: str | None = field(default=None, metadata=option(
        f"network: classify {'|'.join(CLASSIFIERS)} (default densenet121), segment {'|'.join(SEGMENTERS)} "
        "(default unet)"))
    data_root: str | None = field(default=None, metadata=option(
        "data root with site folders and test/ (default: data/synthetic, the synthetic phantom set, generated on "
        "first use)", flag="--data", metavar="DATA_ROOT", parse="path"))
    image_size: int = field(default=DEFAULT_IMAGE_SIZE, metadata=option(
        f"square input side in pixels (default {DEFAULT_IMAGE_SIZE})", metavar="PX", parse="positive_int"))
    batch_size: int = field(default=16, metadata=option("batch size (default 16)", parse="positive_int"))
    lr: float = field(default=1e-3, metadata=option("learning rate (default 0.001)", parse="positive_float"))
    epochs: int = field(default=10, metadata=option(
        "training epochs (default 10; federated: local epochs per round, default 1)", parse="positive_int"))
    seed: int = field(default=0, metadata=option(
        "random seed for weights, shuffling and augmentation", parse="seed"))
    deterministic: bool = field(default=False, metadata=option(
        "torch's deterministic algorithms where they exist (same seed, same result also on GPU; slower); on CPU "
        "runs with the same seed repeat without it"))
    accelerator: str = field(default="auto", metadata=option("cpu, gpu or auto (default: GPU when one exists)"))
    precision: str = field(default="auto", metadata=option(
        "numeric precision of training and evaluation: auto (default: bf16-mixed on a CUDA GPU with bfloat16, "
        "16-mixed on other CUDA GPUs, 32 on CPU and with --dp dpsgd), 32, bf16-mixed, 16-mixed (fp16 with gradient "
        "scaling; CUDA only)", choices=PRECISIONS))
    gpu_data: bool = field(default=False, metadata=option(
        "keep the cached training images on the GPU and augment them there a batch at a time (same augmentation "
        "settings, other random draws than on CPU); CUDA only, not with --dp dpsgd or --workers"))
    workers: int = field(default=0, metadata=option(
        "DataLoader worker processes (default 0: data is cached)", parse="non_negative_int"))
    class_weights: str = field(default="balanced", metadata=option(
        "cross-entropy class weights from the training label counts (default balanced)", choices=CLASS_WEIGHTS))
    roi_threshold: float = field(default=0.5, metadata=option(
        "with --roi: lung probability above which a pixel counts as lung (default 0.5)", parse="probability"))
    segmenter: str | None = field(default=None, metadata=option(
        "with --roi: lung masks from this segmentation model (a run folder's best model file; default: "
        "ground-truth masks)", metavar="CKPT", parse="path"))
    target_sensitivity: float | None = field(default=None, metadata=option(
        "classify, two classes: decision threshold = the highest one whose validation sensitivity is at least S "
        "(default: the threshold maximising Youden's J on validation)", metavar="S", parse="probability"))
    limit: int | None = field(default=None, metadata=option(
        "use at most this many images per site and split (quick checks)", parse="positive_int"))
    time_budget: float = field(default=0.0, metadata=option(
        "stop a site's local training after this many seconds in a round (0: no limit)", metavar="SECONDS",
        parse="non_negative_float", scope="fl"))
    patience: int = field(default=0, metadata=option(
        "stop after this many epochs without improvement of the validation metric (0: off)", metavar="EPOCHS",
        parse="non_negative_int", scope="central"))  # federated runs: FLConfig.patience, in rounds
    algorithm: str = field(default="fedavg", metadata=option(
        "federated algorithm for sites that are not alike: fedavg; fedprox (a proximal term toward the global model, "
        "--fedprox-mu); scaffold (control variates); fedbn (normalisation layers stay at each site); ditto (each "
        "site also trains a personal model, --ditto-lambda). See docs/algorithms.md", choices=ALGORITHMS, scope="fl"))
    fedprox_mu: float | None = field(default=None, metadata=option(
        f"--algorithm fedprox: weight of the proximal term mu/2*|w - w_global|^2 (default {FEDPROX_MU_DEFAULT})",
        metavar="MU", parse="positive_float", scope="fl"))
    ditto_lambda: float | None = field(default=None, metadata=option(
        f"--algorithm ditto: how strongly a personal model is pulled toward the global one (default "
        f"{DITTO_LAMBDA_DEFAULT})", metavar="LAMBDA", parse="positive_float", scope="fl"))
    dp: str | None = field(default=None, metadata=option(
        "privacy of what training releases. dpsgd: differential privacy with a stated (epsilon, delta) per data "
        "holder: DP-SGD (Opacus) clips each image's gradient and adds Gaussian noise, with an RDP accountant "
        "(--target-epsilon or --noise-multiplier, --delta, --max-grad-norm; classification; trains without class "
        "weights). Federated runs only, and with NO formal guarantee: percentile (NVFlare's PercentilePrivacy: "
        "shares only the largest weight changes, clipped: truncation, not differential privacy); svt (NVFlare's "
        "SVTPrivacy: sparse vector technique, its per-round epsilon adds up over rounds). See docs/privacy.md",
        choices=DP_MODES))
    dp_target_epsilon: float | None = field(default=None, metadata=option(
        "--dp dpsgd: the epsilon each data holder may spend over the whole run; the noise is calibrated to it from "
        "the planned rounds x local epochs x sampling rate, and a plan that would exceed it is refused",
        flag="--target-epsilon", metavar="EPSILON", parse="positive_float"))
    dp_delta: float = field(default=DP_DELTA_DEFAULT, metadata=option(
        f"--dp dpsgd: delta of the guarantee (default {DP_DELTA_DEFAULT:g}; must be below 1/number of training "
        "images)", flag="--delta", metavar="DELTA", parse="probability"))
    dp_max_grad_norm: float = field(default=DP_MAX_GRAD_NORM_DEFAULT, metadata=option(
        f"--dp dpsgd: each image's gradient is clipped to this L2 norm (default {DP_MAX_GRAD_NORM_DEFAULT:g})",
        flag="--max-grad-norm", metavar="C", parse="positive_float"))
    dp_noise_multiplier: float | None = field(default=None, metadata=option(
        "--dp dpsgd: Gaussian noise std as a multiple of --max-grad-norm (default: calibrated to "
        "--target-epsilon); with --target-epsilon too, a plan that would exceed it is refused",
        flag="--noise-multiplier", metavar="SIGMA", parse="positive_float"))
    rounds: int = field(default=1, metadata=option(
        "rounds of training (central: 1); a DP-SGD site plans its privacy budget over them", cli=False))
    wandb: bool = field(default=False, metadata=option(
        "also log to Weights & Biases (offline unless WANDB_API_KEY is set)"))
    wandb_project: str = field(default="cxr-fl", metadata=option("W&B project for --wandb (default cxr-fl)"))
    classes: tuple[str, ...] = field(default=(), metadata=option(
        "class names, in label-index order (from the data root); every site uses the same indices", cli=False))

    def __post_init__(self):
        if self.task == "roi":  # the command-line shorthand: classification on the lung region
            object.__setattr__(self, "task", "classify")
            object.__setattr__(self, "roi", self.roi or "mask")
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.dp == "dpsgd" and self.class_weights == "balanced":
            # balanced weights come from the label counts, which DP-SGD does not protect, and tie each image's
            # loss to the others' labels (a per-sample gradient must not)
            object.__setattr__(self, "class_weights", "none")
        for name in ("data_root", "segmenter"):  # paths arrive as Path from the command line
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))
        self._check()

    def _check(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)} (or roi), got {self.task!r}")
        valid = SEGMENTERS if self.task == "segment" else CLASSIFIERS
        if self.model is not None and self.model not in valid:
            raise ConfigError(f"--model {self.model!r} is not a {self.task} network; choose one of {', '.join(valid)}")
        if self.roi is not None and self.roi not in ROI_MODES:
            raise ConfigError(f"--roi must be one of {', '.join(ROI_MODES)}, got {self.roi!r}")
        if self.task == "segment" and self.roi:
            raise ConfigError("--roi applies to --task classify only")
        if self.segmenter is not None and not self.roi:
            raise ConfigError("--segmenter needs --roi (or --task roi)")
        if self.target_sensitivity is not None and self.task != "classify":
            raise ConfigError("--target-sensitivity applies to --task classify only")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}")
        problem = input_size_problem(self.network, self.image_size)
        if problem:
            raise ConfigError(problem)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.roi_threshold < 1:
            raise ConfigError(f"--roi-threshold must be between 0 and 1 (exclusive), got {self.roi_threshold}")
        if self.target_sensitivity is not None and not 0 < self.target_sensitivity < 1:
            raise ConfigError(f"--target-sensitivity must be between 0 and 1 (exclusive), got {self.target_sensitivity}")
        if self.batch_size < 1 or self.epochs < 1 or (self.limit is not None and self.limit < 1):
            raise ConfigError("--batch-size, --epochs and --limit must be >= 1")
        if not (math.isfinite(self.time_budget) and self.time_budget >= 0):
            raise ConfigError(f"--time-budget must be a finite number of seconds >= 0, got {self.time_budget}")
        self._check_algorithm()
        self._check_dp()
        self._check_device()
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"--seed must be between 0 and {SEED_LIMIT - 1}, got {self.seed}")

    def _check_algorithm(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        for name, flag, owner in (("fedprox_mu", "--fedprox-mu", "fedprox"), ("ditto_lambda", "--ditto-lambda", "ditto")):
            value = getattr(self, name)
            if value is None:
                continue
            if self.algorithm != owner:
                raise ConfigError(f"{flag} applies to --algorithm {owner} only (this run: {self.algorithm})")
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be a finite number > 0, got {value}")

    UPDATE_FILTERS_ALLOWED = False  # percentile/svt filter a federated site's update: FLConfig allows them

    def _check_dp(self) -> None:
        if self.dp is not None and self.dp not in DP_MODES:
            raise ConfigError(f"--dp must be one of {', '.join(DP_MODES)}, got {self.dp!r}")
        if self.dp in UPDATE_FILTERS and not self.UPDATE_FILTERS_ALLOWED:
            raise ConfigError(f"--dp {self.dp} filters what a federated site sends; a central run sends nothing "
                              "(use --dp dpsgd)")
        dpsgd_options = {"--target-epsilon": self.dp_target_epsilon, "--noise-multiplier": self.dp_noise_multiplier,
                         "--delta": self.dp_delta != DP_DELTA_DEFAULT or None,
                         "--max-grad-norm": self.dp_max_grad_norm != DP_MAX_GRAD_NORM_DEFAULT or None}
        if self.dp != "dpsgd":
            given = [flag for flag, value in dpsgd_options.items() if value is not None]
            if given:
                raise ConfigError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --dp dpsgd only")
            return
        if self.task != "classify":
            raise ConfigError("--dp dpsgd trains classifiers only (segmentation under DP-SGD is not measured)")
        if self.dp_target_epsilon is None and self.dp_noise_multiplier is None:
            raise ConfigError("--dp dpsgd needs --target-epsilon (the noise is calibrated to it) or --noise-multiplier")
        for flag, value in (("--target-epsilon", self.dp_target_epsilon), ("--noise-multiplier", self.dp_noise_multiplier),
                            ("--max-grad-norm", self.dp_max_grad_norm)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be a finite number > 0, got {value}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"--delta must be between 0 and 1 (exclusive), got {self.dp_delta}")
        if self.rounds < 1:
            raise ConfigError("rounds must be >= 1")

    def _check_device(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "16-mixed" and self.accelerator == "cpu":  # Lightning would switch to bf16-mixed
            raise ConfigError("--precision 16-mixed needs a CUDA GPU (fp16 with gradient scaling); with "
                              "--accelerator cpu use --precision bf16-mixed or 32")
        if self.dp == "dpsgd" and self.precision in MIXED_PRECISIONS:
            # fp16's loss scaling would have Opacus clip scaled per-image gradients; bf16 ones are not measured
            raise ConfigError(f"--precision {self.precision} cannot be combined with --dp dpsgd: DP-SGD clips each "
                              "image's gradient in full precision; use --precision 32 or auto")
        if self.gpu_data:
            if self.accelerator == "cpu":
                raise ConfigError("--gpu-data needs a GPU; it cannot be combined with --accelerator cpu")
            if self.dp == "dpsgd":
                raise ConfigError("--gpu-data cannot be combined with --dp dpsgd: Opacus draws DP-SGD's batches "
                                  "(Poisson sampling) from the usual data loader")
            if self.workers:
                raise ConfigError(f"--workers {self.workers} has no use with --gpu-data (the batches are made on "
                                  "the GPU); leave --workers at 0")

    @property
    def dp_sgd(self) -> bool:
        """Training with DP-SGD: the network has DP-compatible layers (lightning_modules/privacy.py)."""
        return self.dp == "dpsgd"

    @property
    def proximal_weight(self) -> float | None:
        """FedProx's mu or Ditto's lambda with its default; None for the other algorithms."""
        if self.algorithm == "fedprox":
            return self.fedprox_mu if self.fedprox_mu is not None else FEDPROX_MU_DEFAULT
        if self.algorithm == "ditto":
            return self.ditto_lambda if self.ditto_lambda is not None else DITTO_LAMBDA_DEFAULT
        return None

    @property
    def network(self) -> str:
        return self.model or DEFAULT_MODEL[self.task]

    @property
    def key_metric(self) -> str:
        """The validation metric the best model is selected by (never a test metric)."""
        return "val_dice" if self.task == "segment" else "val_auroc"

    def as_dict(self) -> dict:
        return {**asdict(self), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, values: dict, source: str = "configuration"):
        """A config from its dict (a config.json or a job's site file); unknown keys are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        try:
            return cls(**values)
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def write_json(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.as_dict(), indent=2) + "\n")

    @classmethod
    def read_json(cls, path: Path):
        try:
            values = read_json_object(path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_dict(values, str(path))
