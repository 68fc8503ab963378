"""`FLConfig`: a federated run's configuration, a `TrainConfig` (what each site trains with) plus the
federated fields only. Frozen and validated when made; recorded in the run folder's config.json.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from app_custom.availability import check_schedule
from lightning_modules.config import UPDATE_FILTERS, ConfigError, TrainConfig, option

# Server-side aggregation: FedAvg, or FedOpt with a server optimizer (Reddi et al. 2021).
AGGREGATIONS = {
    "fedavg": None,
    "fedadam": "torch.optim.Adam",
    "fedadagrad": "torch.optim.Adagrad",
    "fedyogi": "app_custom.yogi.Yogi",
}
ABSENT_WEIGHTS = ("drop", "keep")
QUANTIZE = ("fp16", "8bit")  # what a site's update is compressed to (app_custom/quantization.py)
# FLConfig fields that name files on this machine: they never travel in a job or to tracking.
LOCAL_PATHS = ("data_root", "segmenter", "initial_model")
JOB_SEGMENTER = "segmenter.pt"  # a lung-ROI job's segmenter, in the job's custom/ folder
FL_EPOCHS_DEFAULT = 1
# Why an algorithm does not combine with a feature (FedAvg combines with all), one line each; the table is
# docs/algorithms.md. A pair not listed combines.
_DP_LATER = ("DP-SGD clips and noises the gradient of the loss only and NVFlare's privacy filters were measured on "
             "FedAvg updates only, while this algorithm changes the update outside both")
_FEDBN_PATH = ("FedBN averages weight differences without the normalisation tensors, a path the server optimizers "
               "and the intermittent-site aggregator do not take")
_SCAFFOLD_PLAIN = ("the server must read and average every site's control variates in plaintext, from the sites "
                   "that trained, and steps the model by plain averaging")
_DITTO_EVAL = "the personal models are judged by cross-site evaluation, which HE cannot run"
_DITTO_PLAIN = "Ditto's global part is plain FedAvg over the sites of every round"
ALGORITHM_REFUSALS = {
    ("fedprox", "dp"): _DP_LATER,
    ("fedbn", "fedopt"): _FEDBN_PATH, ("fedbn", "schedule"): _FEDBN_PATH, ("fedbn", "dp"): _DP_LATER,
    ("scaffold", "fedopt"): _SCAFFOLD_PLAIN, ("scaffold", "he"): _SCAFFOLD_PLAIN,
    ("scaffold", "schedule"): _SCAFFOLD_PLAIN, ("scaffold", "dp"): _DP_LATER,
    ("ditto", "he"): _DITTO_EVAL, ("ditto", "fedopt"): _DITTO_PLAIN, ("ditto", "schedule"): _DITTO_PLAIN,
    ("ditto", "dp"): _DP_LATER,
    ("scaffold", "quantize"): "SCAFFOLD's aggregator reads full weights and the control variates in the update's "
                              "meta, which the quantizer neither compresses nor knows",
}
COMBINATION_FLAGS = {"fedopt": "--aggregation fedadam/fedyogi/fedadagrad", "he": "--he", "dp": "--dp",
                     "schedule": "--schedule / --absent-weights keep",
                     "quantize": "--quantize"}


@dataclass(frozen=True)
class FLConfig(TrainConfig):
    epochs: int = field(default=FL_EPOCHS_DEFAULT, metadata=option(
        "local epochs per round (default 1)", flag="--local-epochs", parse="positive_int"))
    sites: tuple[str, ...] = field(default=("site-1", "site-2", "site-3"), metadata=option(
        "the site folders of the data root that take part", cli=False))
    rounds: int = field(default=5, metadata=option("federated rounds (default 5)", parse="positive_int"))
    patience: int = field(default=0, metadata=option(
        "the server stops the job when the sites' validation metric (the key metric the best model is chosen by) "
        "has not improved for this many rounds (default 0: off); metrics.json records the round it stopped at",
        metavar="ROUNDS", parse="non_negative_int", scope="fl"))
    min_clients: int | None = field(default=None, metadata=option(
        "sites that must answer before a round is aggregated (default: all)", parse="positive_int"))
    allow_missing_sites: bool = field(default=False, metadata=option(
        "complete a run in which a site never contributed an accepted update (it is named in the summary and "
        "metrics.json). Without it such a run fails, even when every round had --min-clients updates: a site "
        "that never took part is a configuration or network problem, not a result"))
    wait_after_min_clients: float = field(default=0.0, metadata=option(
        "once --min-clients sites answered, how long a round still waits for the others (default 0); with sites "
        "that may drop out, set --min-clients below the number of sites and this above the spread of the sites' "
        "training times", metavar="SECONDS", parse="non_negative_float"))
    aggregation: str = field(default="fedavg", metadata=option(
        "server-side aggregation: FedAvg (sample-weighted mean) or FedOpt with Adam/Yogi/Adagrad",
        choices=tuple(AGGREGATIONS)))
    server_lr: float | None = field(default=None, metadata=option(
        "server learning rate for fedadam/fedyogi/fedadagrad (default 0.01; FedAvg ignores it)",
        parse="positive_float"))
    cross_site_eval: bool | None = field(default=None, metadata=option(
        "skip the final cross-site evaluation (always skipped with --he)", flag="--no-cross-site-eval", negate=True))
    # without cross-site evaluation: still each site's validation of the global models (NVFlare's
    # GlobalModelEval, no local models sent), which the operating point and model selection need
    global_model_eval: bool = field(default=False, metadata=option("", cli=False))
    he: bool = field(default=False, metadata=option(
        "homomorphic encryption of the weight exchange (FedAvg only; needs HE contexts: `cxrfl poc up --he`)"))
    he_encrypt_layers: str | None = field(default=None, metadata=option(
        "with --he: encrypt only the tensors whose name matches (default: all floating-point tensors). The others "
        "travel and are averaged in plaintext: a privacy trade-off, see docs/he.md", metavar="REGEX"))
    quantize: str | None = field(default=None, metadata=option(
        "compress what each site sends: fp16 (half the bytes) or 8bit (blockwise 8-bit, about a quarter), with "
        "NVFlare's quantization filters; sites then send weight differences and the server dequantizes them before "
        "checking and averaging. Not with --he (a ciphertext's size does not depend on the values' precision). "
        "See docs/performance.md", choices=QUANTIZE))
    schedule: dict | None = field(default=None, metadata=option(
        'sites that come and go: {"site-2": "0-2", "site-3": "2-"} (inline or a JSON file) gives the rounds each '
        "listed site takes part in; the others take part in every round. Away, a site does not train",
        metavar="JSON|FILE", parse="schedule"))
    absent_weights: str = field(default="drop", metadata=option(
        "a site that is away: drop its weights (approach 1, default) or keep averaging its last update with its "
        "sample weight (approach 2)", choices=ABSENT_WEIGHTS))
    dp_percentile: float = field(default=10.0, metadata=option(
        "--dp percentile: changes smaller than this percentile are not shared (default 10)",
        parse="non_negative_float"))
    dp_gamma: float | None = field(default=None, metadata=option(
        "--dp percentile: clip changes to +-gamma (default 0.01); svt: gamma (default 1e-5)", parse="positive_float"))
    dp_fraction: float = field(default=0.1, metadata=option(
        "--dp svt: fraction of the model's values uploaded per round (default 0.1)", parse="positive_float"))
    dp_epsilon: float = field(default=0.1, metadata=option(
        "--dp svt: privacy budget of the selection per round (default 0.1)", parse="positive_float"))
    dp_noise_var: float = field(default=0.1, metadata=option(
        "--dp svt: release noise (default 0.1)", parse="positive_float"))
    record_contributions: bool = field(default=False, metadata=option(
        "keep every site's update of every round on the server (audit; off by default)"))
    start_round: int = field(default=0, metadata=option("a resumed run: the first round still to run", cli=False))
    initial_model: str | None = field(default=None, metadata=option(
        "a resumed run: the global model (persistor format) it continues from", cli=False))

    def __post_init__(self):
        object.__setattr__(self, "sites", tuple(self.sites))
        if self.cross_site_eval is None:  # default: on, but NVFlare cannot broadcast ciphertext models
            object.__setattr__(self, "cross_site_eval", not self.he)
        if self.server_lr is None:
            object.__setattr__(self, "server_lr", 1.0 if self.aggregation == "fedavg" else 0.01)
        if self.schedule is not None:
            object.__setattr__(self, "schedule", {str(k): str(v) for k, v in self.schedule.items()})
        super().__post_init__()

    def _check(self) -> None:
        super()._check()
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {', '.join(AGGREGATIONS)}")
        if not self.sites:
            raise ConfigError("need at least one site")
        if self.rounds < 1:
            raise ConfigError("rounds must be >= 1")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ConfigError(f"--server-lr must be a finite number > 0, got {self.server_lr}")
        if not (math.isfinite(self.wait_after_min_clients) and self.wait_after_min_clients >= 0):
            raise ConfigError("--wait-after-min-clients must be a finite number of seconds >= 0, "
                              f"got {self.wait_after_min_clients}")
        if self.min_clients is not None and not 1 <= self.min_clients <= len(self.sites):
            raise ConfigError(f"--min-clients {self.min_clients} is more than the {len(self.sites)} sites"
                              if self.min_clients > len(self.sites) else "--min-clients must be >= 1")
        if self.patience < 0:
            raise ConfigError(f"--patience must be a number of rounds >= 0, got {self.patience}")
        if not 0 <= self.start_round < self.rounds:
            raise ConfigError(f"start_round {self.start_round} is outside the job's rounds 0..{self.rounds - 1}")
        self._check_privacy()
        self._check_quantize()
        self._check_availability()
        self._check_algorithm_combinations()

    def _check_privacy(self) -> None:
        if self.he and self.aggregation != "fedavg":
            raise ConfigError("homomorphic encryption works with FedAvg only (the server cannot run an optimizer "
                              "on ciphertexts)")
        if self.he_encrypt_layers and not self.he:
            raise ConfigError("--he-encrypt-layers needs --he")
        if self.he_encrypt_layers:
            try:
                re.compile(self.he_encrypt_layers)
            except re.error as exc:
                raise ConfigError(f"--he-encrypt-layers {self.he_encrypt_layers!r} is not a valid regular "
                                  f"expression: {exc}") from None
        if self.he and self.global_model_eval:
            raise ConfigError("global-model evaluation is not available with HE (NVFlare cannot broadcast "
                              "ciphertext models)")
        if self.he and self.cross_site_eval:
            raise ConfigError("cross-site evaluation is not available with HE (NVFlare cannot broadcast "
                              "ciphertext models); pass --no-cross-site-eval")
        if self.dp in UPDATE_FILTERS:  # DP-SGD's noise is in every update: HE, FedOpt and schedules only post-process it
            if self.he or self.aggregation != "fedavg" or self.schedule or self.absent_weights == "keep":
                raise ConfigError(f"--dp {self.dp} works with plain FedAvg (no --he, --aggregation fedopt, schedules "
                                  "or --absent-weights keep)")
            if not 0 <= self.dp_percentile <= 100:
                raise ConfigError("--dp-percentile must be between 0 and 100")

    def _check_quantize(self) -> None:
        if self.quantize is None:
            return
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.he:
            raise ConfigError("--quantize does not combine with --he: a CKKS ciphertext takes the same bytes whatever "
                              "the precision of the values it encrypts, so quantizing first only adds error")
        if self.dp in UPDATE_FILTERS:
            raise ConfigError(f"--quantize does not combine with --dp {self.dp}: NVFlare's privacy filter and the "
                              "quantizer would both rewrite the update, in an order nobody has measured")
        if self.schedule or self.absent_weights == "keep":
            raise ConfigError("--quantize does not combine with --schedule / --absent-weights keep: the intermittent-"
                              "site aggregator averages full weights, not the differences a quantizing site sends")

    def _check_availability(self) -> None:
        if self.absent_weights not in ABSENT_WEIGHTS:
            raise ConfigError("absent_weights must be 'drop' or 'keep'")
        if self.schedule:
            try:
                check_schedule(self.schedule, list(self.sites), self.rounds)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.he and (self.schedule or self.absent_weights == "keep"):
            raise ConfigError("availability schedules and --absent-weights keep are not available with HE")
        if self.aggregation != "fedavg" and (self.schedule or self.absent_weights == "keep"):
            raise ConfigError("availability schedules and --absent-weights keep work with FedAvg only")

    def _check_algorithm_combinations(self) -> None:
        """What each algorithm runs with besides plain FedAvg aggregation; the table is docs/algorithms.md."""
        wanted = {"fedopt": self.aggregation != "fedavg", "he": self.he, "dp": self.dp is not None,
                  "schedule": bool(self.schedule) or self.absent_weights == "keep", "quantize": bool(self.quantize)}
        for feature, used in wanted.items():
            reason = ALGORITHM_REFUSALS.get((self.algorithm, feature))
            if used and reason:
                raise ConfigError(f"--algorithm {self.algorithm} does not combine with {COMBINATION_FLAGS[feature]}: "
                                  f"{reason}")

    UPDATE_FILTERS_ALLOWED = True

    @property
    def job_name(self) -> str:
        return "cxrfl_roi" if self.roi else f"cxrfl_{self.task}"

    @property
    def dp_args(self) -> dict | None:
        """The NVFlare privacy filter's arguments."""
        if self.dp == "percentile":
            return {"percentile": self.dp_percentile, "gamma": self.dp_gamma or 0.01}
        if self.dp == "svt":
            return {"fraction": self.dp_fraction, "epsilon": self.dp_epsilon, "noise_var": self.dp_noise_var,
                    "gamma": self.dp_gamma or 1e-5}
        return None

    def as_dict(self) -> dict:
        return {**super().as_dict(), "sites": list(self.sites)}

    def without_paths(self) -> dict:
        """The configuration for experiment tracking and anything else that leaves this machine."""
        return {k: v for k, v in self.as_dict().items() if k not in LOCAL_PATHS}

    def site_config(self) -> TrainConfig:
        """What every site trains with, as the job carries it: no path of this machine (a lung-ROI job
        carries its segmenter as a file in custom/; early stopping is the server's, in rounds)."""
        values = {name: getattr(self, name) for name in TrainConfig.__dataclass_fields__}
        values.update(data_root=None, segmenter=JOB_SEGMENTER if self.segmenter else None, patience=0)
        if self.dp in UPDATE_FILTERS:  # the job's filters, not the sites' training
            values["dp"] = None
        return TrainConfig(**values)
