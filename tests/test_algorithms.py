"""The non-IID algorithms' parts, without a simulator: which combinations are refused and why, the
components the job adds (FedProx's mu on the train task, SCAFFOLD's controls and their averaging,
FedBN's filter), Ditto's pull toward the global model, and the jobs they make. The simulator runs
of every algorithm are in tests/test_federated.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants

from app_custom.algorithms import KeepAtSite, ScaffoldControls, ScaffoldFedAvg, TrainTaskMeta
from app_custom.contributions import UpdateValidator
from app_custom.global_model import GlobalModel
from cxrfl.cli import main
from cxrfl.fl.config import ALGORITHM_REFUSALS, FLConfig
from cxrfl.fl.simulator import export_job
from lightning_modules.callbacks import ProximalPull
from lightning_modules.config import ConfigError, TrainConfig
from lightning_modules.networks import adapt_normalisation, normalisation_state_keys

FEATURES = {"fedopt": {"aggregation": "fedadam"}, "he": {"he": True, "cross_site_eval": False},
            "dp": {"dp": "percentile"}, "schedule": {"absent_weights": "keep"}}
CLASSES = ("normal", "pneumonia")


@pytest.mark.parametrize("algorithm", ["fedprox", "scaffold", "fedbn", "ditto"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_each_combination_is_refused_with_its_reason_or_accepted(algorithm, feature):
    settings = dict(algorithm=algorithm, classes=CLASSES, **FEATURES[feature])
    reason = ALGORITHM_REFUSALS.get((algorithm, feature))
    if reason is None:
        assert FLConfig(**settings).algorithm == algorithm
    else:
        with pytest.raises(ConfigError, match=f"--algorithm {algorithm} does not combine") as refused:
            FLConfig(**settings)
        assert reason in str(refused.value)


def test_the_documented_combinations_are_what_the_config_accepts():
    """docs/algorithms.md's table is the config's: HE with FedProx and FedBN, nothing else but FedAvg."""
    he_ok = {a for a in ("fedavg", "fedprox", "scaffold", "fedbn", "ditto")
             if ("he" not in {f for (alg, f) in ALGORITHM_REFUSALS if alg == a})}
    assert he_ok == {"fedavg", "fedprox", "fedbn"}


@pytest.mark.parametrize("argv, message", [
    (["--fedprox-mu", "0.1"], "--fedprox-mu applies to --algorithm fedprox only"),
    (["--algorithm", "ditto", "--fedprox-mu", "0.1"], "--fedprox-mu applies to --algorithm fedprox only"),
    (["--algorithm", "fedprox", "--fedprox-mu", "0"], "must be > 0"),
    (["--algorithm", "ditto", "--ditto-lambda", "-1"], "must be > 0"),
    (["--algorithm", "fedsgd"], "invalid choice"),
])
def test_wrong_algorithm_options_are_refused_in_one_line(argv, message, capsys, tmp_path, synthetic_root):
    # --data: without it a clean clone would first generate the full synthetic default (~100 s in CI)
    try:
        rc = main(["export", "--task", "classify", "--data", str(synthetic_root), "--out", str(tmp_path / "job")] + argv)
    except SystemExit as exited:  # argparse's own refusals
        rc = exited.code
    assert rc not in (0, None) and not (tmp_path / "job").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_the_default_weights_are_used_when_not_given():
    assert TrainConfig(algorithm="fedprox").proximal_weight == 0.01
    assert TrainConfig(algorithm="ditto", ditto_lambda=0.5).proximal_weight == 0.5
    assert TrainConfig().proximal_weight is None


def _train_task(weights: dict) -> DXO:
    return DXO(data_kind=DataKind.WEIGHTS, data=weights)


def test_fedprox_mu_rides_on_every_train_task():
    shareable = _train_task({"w": np.zeros(3)}).to_shareable()
    out = TrainTaskMeta({AlgorithmConstants.FEDPROX_MU: 0.5}).process(shareable, FLContext())
    assert from_shareable(out).get_meta_prop(AlgorithmConstants.FEDPROX_MU) == 0.5


def _site_result(site: str, weights: dict, change: dict | None, samples: int):
    meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: samples}
    if change is not None:
        meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = change
    shareable = DXO(data_kind=DataKind.WEIGHTS, data=weights, meta=meta).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
    return shareable


def _round_context(model: dict) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(model, {}), private=True, sticky=False)
    return ctx


def test_scaffold_sends_controls_and_moves_them_by_the_weighted_mean_change():
    model = {"w": torch.zeros(2), "b": torch.zeros(1)}
    controls, aggregator = ScaffoldControls(), ScaffoldFedAvg()
    ctx = _round_context(model)
    task = from_shareable(controls.learnable_to_shareable(make_model_learnable(model, {}), ctx))
    sent = task.get_meta_prop(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
    assert set(sent) == {"w", "b"} and all(float(v.abs().sum()) == 0 for v in sent.values())  # c starts at zero

    assert aggregator.accept(_site_result("site-1", {"w": torch.ones(2), "b": torch.ones(1)},
                                          {"w": np.full(2, 1.0), "b": np.full(1, 3.0)}, 1), ctx)
    assert aggregator.accept(_site_result("site-2", {"w": torch.zeros(2), "b": torch.zeros(1)},
                                          {"w": np.full(2, 4.0), "b": np.full(1, 0.0)}, 3), ctx)
    assert not aggregator.accept(_site_result("site-3", dict(model), None, 5), ctx)  # not running SCAFFOLD
    aggregate = aggregator.aggregate(ctx)
    learnable = controls.shareable_to_learnable(aggregate, ctx)
    torch.testing.assert_close(learnable[ModelLearnableKey.WEIGHTS]["w"], torch.full((2,), 0.25))
    assert AlgorithmConstants.SCAFFOLD_CTRL_DIFF not in (learnable.get(ModelLearnableKey.META) or {})
    task = from_shareable(controls.learnable_to_shareable(learnable, ctx))
    sent = task.get_meta_prop(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
    torch.testing.assert_close(sent["w"], torch.full((2,), 0.25 * 1 + 0.75 * 4))  # sample-weighted mean
    torch.testing.assert_close(sent["b"], torch.full((1,), 0.25 * 3))


def test_fedbn_keeps_every_normalisation_tensor_at_the_site_and_the_server_refuses_one():
    model = GlobalModel(model="cnn5").state_dict()
    keys = normalisation_state_keys(GlobalModel(model="cnn5"))
    assert keys and all(".features." in k for k in keys)
    assert {k.rsplit(".", 1)[1] for k in keys} == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    conv_and_dense = set(model) - set(keys)
    assert "net.features.0.weight" in conv_and_dense and "net.head.2.weight" in conv_and_dense
    out = KeepAtSite(keys).process(_train_task(dict(model)).to_shareable(), FLContext())
    assert set(from_shareable(out).data) == conv_and_dense

    validator = UpdateValidator(site_keys=keys)
    ctx = _round_context(model)
    without = _site_result("site-1", {k: model[k] for k in conv_and_dense}, None, 4)
    assert validator.process(without, ctx).get_return_code() == "OK"
    leaking = _site_result("site-1", dict(model), None, 4)
    assert validator.process(leaking, ctx).get_return_code() != "OK"


def test_ditto_pull_moves_a_parameter_toward_the_reference_by_lambda():
    class Flat(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([2.0]))

        def training_step(self, batch, batch_idx):
            return (self.w * 0).sum()  # no data gradient: only the pull moves w

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)

    module = Flat()
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ProximalPull({"w": torch.tensor([0.0])}, 0.5)])
    trainer.fit(module)
    assert float(module.w) == pytest.approx(2.0 - 0.1 * 0.5 * 2.0)  # w - lr * lambda * (w - reference)
    with pytest.raises(ValueError):
        ProximalPull({}, 0.0)


def test_adapted_normalisation_takes_its_statistics_from_the_images_alone():
    net = GlobalModel(model="cnn5").net
    images = [torch.randn(4, 1, 32, 32) * 3 + 5 for _ in range(2)]
    adapt_normalisation(net, images)
    first = net.features[2]
    assert not net.training and first.running_mean.abs().sum() > 0 and first.num_batches_tracked == 2


def test_each_algorithm_exports_the_components_it_needs(tmp_path):
    def exported(algorithm, **extra):
        cfg = FLConfig(task="classify", model="cnn5", classes=CLASSES, algorithm=algorithm, image_size=32, **extra)
        job = export_job(cfg, tmp_path / algorithm)
        app = job / "app" / "config"
        return (json.loads((app / "config_fed_server.json").read_text()),
                json.loads((app / "config_fed_client.json").read_text()))

    server, _ = exported("fedprox", fedprox_mu=0.3)
    mu = [f for f in server["task_data_filters"] for f in f["filters"] if f["path"].endswith("TrainTaskMeta")]
    assert mu and mu[0]["args"]["meta"] == {"fedprox_mu": 0.3}
    server, _ = exported("scaffold")
    paths = {c["path"].rsplit(".", 1)[1] for c in server["components"]}
    assert {"ScaffoldControls", "ScaffoldFedAvg"} <= paths
    server, client = exported("fedbn", he=True, cross_site_eval=False)
    keep = [f for f in client["task_result_filters"] for f in f["filters"]]
    assert keep[0]["path"].endswith("KeepAtSite")  # before the HE encryptor: never encrypted, never sent
    assert keep[1]["path"].endswith("PackedHEEncryptor")
    assert set(keep[0]["args"]["keys"]) == set(normalisation_state_keys(GlobalModel(model="cnn5")))
    site_settings = json.loads(next((tmp_path / "fedbn").rglob("cxrfl_train.json")).read_text())
    assert site_settings["algorithm"] == "fedbn"
