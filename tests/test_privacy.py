"""DP-SGD (lightning_modules/privacy.py): the accountant, the budget refusals, clipping and noise, and the
configuration's refusals. The federated runs with DP-SGD (and with HE) are in test_federated.py."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch import nn

from cxrfl.cli import main
from cxrfl.fl.config import FLConfig
from lightning_modules.config import ConfigError, TrainConfig
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.data.phantom import generate_dataset
from lightning_modules.factory import build_module
from lightning_modules.networks import build_classifier, normalisation_state_keys
from lightning_modules.privacy import DPSGD, PrivacyBudgetError, epsilon_spent, plan_privacy


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-data")
    generate_dataset(root, sites=2, per_site=30, test_size=10, size=32, seed=3)
    return root


def _trainer(callbacks, epochs=1):
    return pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                      check_val_every_n_epoch=10**6, accelerator="cpu")


def _data(root, batch_size=8):
    dm = CXRDataModule(root, sites=["site-1"], image_size=32, batch_size=batch_size)
    dm.setup("fit")
    return dm


def test_the_accountant_grows_with_rounds_and_agrees_with_opacus(tiny_root):
    dm = _data(tiny_root)
    plan = plan_privacy(dm.num_train_samples, 8, epochs=1, rounds=3, delta=1e-3, noise_multiplier=1.1)
    dp = DPSGD(plan, max_grad_norm=1.0)
    module = build_module("classify", "cnn5", lr=1e-3, classes=dm.classes, dp_compatible=True)
    spent = []
    for _ in range(3):  # three rounds: one fit each, as a federated site does
        _trainer([dp]).fit(module, datamodule=dp.datamodule(dm))
        spent.append(dp.epsilon)
    assert spent[0] > 0 and spent[0] < spent[1] < spent[2]
    assert dp.steps_taken == 3 * plan.steps_per_round  # every step of every round is counted
    # Opacus's own RDP analysis of the same steps, from its formulas
    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=plan.sample_rate, noise_multiplier=1.1, steps=dp.steps_taken, orders=alphas)
    expected, _ = get_privacy_spent(orders=alphas, rdp=rdp, delta=1e-3)
    assert spent[2] == pytest.approx(float(expected), rel=1e-9)
    assert plan.epsilon() == pytest.approx(spent[2], rel=1e-9)  # the plan predicted what was spent


def test_noise_is_calibrated_to_the_target_and_a_plan_above_it_is_refused():
    plan = plan_privacy(200, 16, epochs=2, rounds=5, delta=1e-5, target_epsilon=3.0)
    assert plan.epsilon() <= 3.0 and plan.epsilon() > 2.9  # the smallest noise that keeps the target
    assert plan.total_steps == 5 * 2 * 12
    with pytest.raises(PrivacyBudgetError, match="above --target-epsilon 3"):
        plan_privacy(200, 16, epochs=2, rounds=5, delta=1e-5, target_epsilon=3.0,
                     noise_multiplier=plan.noise_multiplier * 0.8)
    with pytest.raises(ConfigError, match="below 1/n"):  # a delta that lets one record out
        plan_privacy(50, 16, epochs=1, rounds=1, delta=0.05, target_epsilon=3.0)
    assert epsilon_spent([], 1e-5) == 0.0


def test_a_fit_that_would_exceed_the_target_is_refused_before_it_trains(tiny_root):
    dm = _data(tiny_root)
    plan = plan_privacy(dm.num_train_samples, 8, epochs=1, rounds=2, delta=1e-3, target_epsilon=5.0)
    dp = DPSGD(plan, max_grad_norm=1.0)
    module = build_module("classify", "cnn5", lr=1e-3, classes=dm.classes, dp_compatible=True)
    for _ in range(2):
        _trainer([dp]).fit(module, datamodule=dp.datamodule(dm))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(PrivacyBudgetError, match="above the target 5"):  # a third round was never planned
        _trainer([dp]).fit(module, datamodule=dp.datamodule(dm))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert dp.epsilon <= 5.0


class _RecordingSGD(torch.optim.SGD):
    """Keeps the gradient the optimizer is given at each step (after DP-SGD's clipping and noise)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.seen = []

    def step(self, closure=None):
        loss = None
        if closure is not None:  # plain training: the closure computes the gradient (DP-SGD has run it already)
            with torch.enable_grad():
                loss = closure()
        self.seen.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]).clone())
        super().step()
        return loss


class _Linear(pl.LightningModule):
    """A module whose per-sample gradients are far above C: inputs scaled by 1000."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(32 * 32, 2)
        self.optimizer = None

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(1000 * batch["image"].flatten(1)), batch["label"].long())

    def configure_optimizers(self):
        self.optimizer = _RecordingSGD(self.parameters(), lr=0.1)
        return self.optimizer


def test_each_image_gradient_is_clipped_before_the_optimizer_sees_it(tiny_root):
    dm = _data(tiny_root, batch_size=4)
    clip = 0.5
    plain = _Linear()
    _trainer([]).fit(plain, datamodule=dm)
    assert max(g.norm() for g in plain.optimizer.seen) > 100 * clip  # the test's gradients need clipping
    # noise 1e-6: what reaches the optimizer is the mean of clipped per-image gradients
    plan = plan_privacy(dm.num_train_samples, 4, epochs=1, rounds=1, delta=1e-3, noise_multiplier=1e-6)
    dp = DPSGD(plan, max_grad_norm=clip)
    private = _Linear()
    _trainer([dp]).fit(private, datamodule=dp.datamodule(dm))
    expected_batch = round(plan.sample_rate * plan.num_samples)
    biggest_batch = dm.num_train_samples  # a Poisson batch holds at most every image
    for grad in private.optimizer.seen:
        # sum of at most `batch` vectors of norm <= C, divided by the expected batch size
        assert grad.norm() <= clip * biggest_batch / expected_batch + 1e-3
    # and tighter: no single step is above what its own batch allows (<= C per image on average)
    assert max(g.norm() for g in private.optimizer.seen) < 100 * clip


def test_an_empty_poisson_draw_is_a_noise_only_step(tiny_root):
    """Poisson sampling can draw no image (CI once drew one: Opacus's own empty batch refused the image paths)."""
    from lightning_modules.privacy import TensorFields, _PoissonBatches

    dm = _data(tiny_root, batch_size=4)
    loader = dm.train_dataloader()
    first_draw_empty = TensorFields(loader.collate_fn, loader.dataset)([])  # before any non-empty batch
    assert set(first_draw_empty) == {"image", "label"} and all(len(v) == 0 for v in first_draw_empty.values())
    assert first_draw_empty["image"].shape[1:] == (1, 32, 32)
    plan = plan_privacy(dm.num_train_samples, 4, epochs=1, rounds=1, delta=1e-3, noise_multiplier=1.0)
    dp = DPSGD(plan, max_grad_norm=1.0)
    module = build_module("classify", "cnn5", lr=1e-3, classes=dm.classes, dp_compatible=True)
    sizes = []

    class BatchSizes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert all(torch.is_tensor(v) for v in batch.values())
            sizes.append(len(batch["label"]))

    # ~0.5 images per draw: P(no empty draw in 50) < 1e-20
    _trainer([dp, BatchSizes()]).fit(module, datamodule=_PoissonBatches(dm, 0.02))
    assert 0 in sizes and max(sizes) > 0
    assert dp.steps_taken == len(sizes)  # every draw, the empty ones too, is a step the accountant counts
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_two_sites_with_the_same_data_send_different_updates(tiny_root):
    def update(with_dp: bool) -> torch.Tensor:
        pl.seed_everything(0)  # the same seed, data and start at both "sites"
        dm = _data(tiny_root)
        module = build_module("classify", "cnn5", lr=1e-3, classes=dm.classes, dp_compatible=True)
        start = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
        callbacks = []
        if with_dp:
            callbacks = [DPSGD(plan_privacy(dm.num_train_samples, 8, epochs=1, rounds=1, delta=1e-3,
                                            noise_multiplier=1.0), max_grad_norm=1.0)]
        _trainer(callbacks).fit(module, datamodule=callbacks[0].datamodule(dm) if with_dp else dm)
        return torch.cat([p.detach().flatten() for p in module.parameters()]) - start

    assert torch.equal(update(False), update(False))  # without DP-SGD the same seed gives the same update
    a, b = update(True), update(True)
    assert not torch.allclose(a, b)  # the noise (and the batches) come from a secret seed, not the run's


def test_dp_compatible_networks_have_no_batch_statistics_and_the_same_keys_everywhere():
    for name in ("cnn5", "densenet121"):
        a, b = build_classifier(name, 2, dp_compatible=True), build_classifier(name, 2, dp_compatible=True)
        assert list(a.state_dict()) == list(b.state_dict())
        assert not [k for k in a.state_dict() if "running_mean" in k]
        assert not [m for m in a.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert normalisation_state_keys(a)  # group norm took batch norm's place
        assert not [m for m in a.modules() if getattr(m, "inplace", False)]


@pytest.mark.parametrize("values, message", [
    ({"dp": "dpsgd"}, "needs --target-epsilon"),
    ({"dp_target_epsilon": 3.0}, "--target-epsilon applies to --dp dpsgd only"),
    ({"dp": "percentile"}, "a central run sends nothing"),
    ({"dp": "dpsgd", "dp_target_epsilon": 3.0, "task": "segment"}, "classifiers only"),
    ({"dp": "dpsgd", "dp_target_epsilon": float("inf")}, "finite"),
    ({"dp": "dpsgd", "dp_target_epsilon": 3.0, "dp_delta": 1.5}, "--delta"),
    ({"dp": "laplace"}, "--dp must be one of"),
])
def test_dp_settings_that_cannot_work_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_dp_sgd_trains_without_class_weights_and_refuses_algorithms_it_does_not_cover():
    assert TrainConfig(dp="dpsgd", dp_target_epsilon=3.0).class_weights == "none"
    with pytest.raises(ConfigError, match="fedprox does not combine with --dp"):
        FLConfig(task="classify", dp="dpsgd", dp_target_epsilon=3.0, algorithm="fedprox")
    FLConfig(task="classify", dp="dpsgd", dp_target_epsilon=3.0, he=True, cross_site_eval=False)  # HE combines
    site = FLConfig(task="classify", dp="dpsgd", dp_target_epsilon=3.0, rounds=7).site_config()
    assert (site.dp, site.rounds, site.dp_target_epsilon) == ("dpsgd", 7, 3.0)  # each site plans the job's rounds
    assert FLConfig(task="classify", dp="percentile").site_config().dp is None  # a filter is the job's, not training


def test_a_plan_above_the_target_is_refused_before_any_run_folder_is_written(tiny_root, tmp_path, capsys):
    common = ["--task", "classify", "--model", "cnn5", "--image-size", "32", "--data", str(tiny_root),
              "--dp", "dpsgd", "--target-epsilon", "1", "--noise-multiplier", "0.3", "--delta", "1e-3"]
    for command, extra in (("sim", ["--rounds", "3"]), ("central", ["--epochs", "3"])):
        out = tmp_path / command
        assert main([command, *common, *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "above --target-epsilon 1" in err and "would spend epsilon" in err
        assert not (out / "config.json").exists()


def test_a_central_dp_sgd_run_records_what_it_spent(tiny_root, tmp_path, capsys):
    run = tmp_path / "central"
    assert main(["central", "--task", "classify", "--model", "cnn5", "--image-size", "32", "--batch-size", "8",
                 "--epochs", "2", "--data", str(tiny_root), "--dp", "dpsgd", "--target-epsilon", "8", "--delta",
                 "1e-3", "--out", str(run)]) == 0
    import json

    privacy = json.loads((run / "metrics.json").read_text())["privacy"]
    # the central run is one round of both epochs: every planned step was taken and counted
    assert privacy["rounds"] == 1 and privacy["steps"] == privacy["steps_per_round"] == 2 * int(1 / privacy["sample_rate"])
    assert 0 < privacy["epsilon"] <= 8 and privacy["epsilon"] == pytest.approx(privacy["planned_epsilon"])
    assert json.loads((run / "config.json").read_text())["class_weights"] == "none"
    assert "epsilon spent" in capsys.readouterr().out  # the terminal
