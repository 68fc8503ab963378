"""The privacy audit around the attacks (cxrfl/audit/): a site's update through this project's training path
leaks a recognisable image when undefended and not under DP-SGD; the privacy-utility table, the report
section, and the command's refusals. The attacks themselves: test_audit_attacks.py."""

from __future__ import annotations

import copy
import json

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from cxrfl.audit.inversion import invert_gradients, match_and_score
from cxrfl.audit.run import AuditSettings
from cxrfl.audit.table import privacy_table, table_rows
from cxrfl.audit.updates import Defence, attack_direction, probe_net, site_update
from cxrfl.cli import main
from cxrfl.report import write_report
from lightning_modules.attribution_checks import planted_signal_data
from lightning_modules.config import ConfigError
from lightning_modules.privacy import plan_privacy

SIZE = 32
# test_audit_attacks.py's measured floor on these phantoms: another patient's image scores SSIM 0.53 and the
# mean chest 0.68 against the truth; a recognisable reconstruction must clearly beat both.
RECOGNISABLE_SSIM = 0.8


class _SGDSite(pl.LightningModule):
    """A tiny site model with plain SGD: its update is -lr x the gradient, the attack's textbook case."""

    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"lr": 0.1})
        self.net = probe_net(SIZE)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"].long())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _attack(defence: Defence) -> float:
    images, labels, _ = planted_signal_data(8, SIZE, seed=0)
    truth, label = images[:1], labels[:1].long()
    torch.manual_seed(0)
    site = _SGDSite()
    received = copy.deepcopy(site)
    update = site_update(site, truth, label, defence)  # the project's path: a Trainer, and DPSGD under DP-SGD
    recovered = invert_gradients(received, attack_direction(received, update), label, (1, SIZE, SIZE),
                                 iterations=400, tv_weight=3e-2)
    return match_and_score(recovered, truth)["ssim_mean"]


def test_an_undefended_update_leaks_the_image_and_dp_sgd_at_a_small_epsilon_stops_it():
    assert _attack(Defence("FedAvg")) > RECOGNISABLE_SSIM  # measured 0.93
    # the noise DP-SGD spends epsilon 1 with over a 5-round plan of a 160-image site at batch 16
    sigma = plan_privacy(160, 16, epochs=1, rounds=5, delta=1e-5, target_epsilon=1.0).noise_multiplier
    assert _attack(Defence("DP-SGD eps 1", noise_multiplier=sigma)) < 0.2  # noise: |SSIM| < 0.05 measured


def test_the_privacy_table_reads_an_audit_with_its_baseline_and_he_rows():
    audit = {"inversion": [
        {"model": "probe", "batch_size": 1, "defence": "FedAvg", "epsilon": None, "ssim": 0.61, "identified": 1.0,
         "other_patients_ssim": 0.33},
        {"model": "probe", "batch_size": 1, "defence": "DP-SGD eps 8", "epsilon": 7.99, "ssim": 0.04,
         "other_patients_ssim": 0.33}],
        "utility": [{"defence": "FedAvg", "epsilon": None, "membership_auc": 0.52, "test_auroc": 0.81},
                    {"defence": "DP-SGD eps 8", "epsilon": 7.99, "membership_auc": 0.5, "test_auroc": 0.6}]}
    head, rows = table_rows(audit)
    assert head[2] == "SSIM (identified) probe batch 1" and rows[0][2] == "0.330"  # the baseline first
    assert rows[1] == ["FedAvg", "none", "0.610 (1/1)", "0.520", "0.810"]
    assert rows[2][:3] == ["DP-SGD eps 8", "7.99", "0.040"]
    assert rows[-1][0].startswith("HE") and "ciphertexts" in rows[-1][2]
    assert privacy_table(audit).count("\n") == len(rows) + 2


def test_the_report_shows_an_audit_and_notes_a_damaged_one(tmp_path):
    run = tmp_path / "audit"
    run.mkdir()
    (run / "audit.json").write_text(json.dumps({"settings": {"iterations": 5}, "inversion": [
        {"model": "cnn5", "batch_size": 1, "defence": "FedAvg", "epsilon": None, "ssim": 0.02,
         "other_patients_ssim": 0.3}], "utility": []}))
    html = write_report(run).read_text()
    assert "Privacy audit" in html and "0.020" in html
    (run / "audit.json").write_text(json.dumps({"inversion": "nope"}))
    with pytest.raises(ValueError, match="not a run folder"):
        write_report(run)


@pytest.mark.parametrize("values, message", [
    ({"batch_sizes": (0,)}, "batch sizes"),
    ({"models": ()}, "at least one model"),
    ({"epsilons": (float("nan"),)}, "finite"),
    ({"more_local_epochs": 1}, "more-local-epochs"),
])
def test_audit_settings_that_cannot_work_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        AuditSettings(data_root="x", **values)


def test_audit_command_refuses_a_missing_data_root_and_bad_numbers(tmp_path, capsys):
    assert main(["audit", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "a")]) == 2
    assert "no data root here" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit):
        main(["audit", "--epsilons", "one,two"])


def test_membership_is_scored_within_each_class():
    """A model that memorised nothing but whose loss differs by class must not look leaky because the
    members' class mix differs from the non-members'."""
    from cxrfl.audit.membership import label_stratified_auc, membership_auc

    class Constant(nn.Module):  # always says class 0, whatever the image
        def forward(self, x):
            return torch.tensor([[2.0, 0.0]]).expand(len(x), 2)

    images = torch.zeros(10, 1, 4, 4)
    members = [(images, torch.tensor([0] * 8 + [1] * 2))]
    non_members = [(images, torch.tensor([0] * 2 + [1] * 8))]
    assert membership_auc(Constant(), members, non_members) > 0.7  # the class mix alone
    assert label_stratified_auc(Constant(), members, non_members) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="share no class"):
        label_stratified_auc(Constant(), [(images, torch.zeros(10))], [(images, torch.ones(10))])


def test_identification_picks_the_patient_only_when_the_reconstruction_shows_them():
    from cxrfl.audit.inversion import identification_rate

    images, _, _ = planted_signal_data(12, SIZE, seed=0)
    truth, others = images[:2], images[2:]
    noisy = truth + 0.3 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    assert identification_rate(noisy, truth, others) == 1.0
    assert identification_rate(others[:2], truth, others[2:]) == 0.0  # someone else's image
    with pytest.raises(ValueError, match="one reconstruction per true image"):
        identification_rate(noisy[:1], truth, others)


def test_audit_command_writes_the_table_the_grid_and_the_report(tmp_path):
    """The inversion part end to end on a tiny data root (the federated part is test_federated's
    `test_audit_membership_reads_a_simulator_run`)."""
    from lightning_modules.data.phantom import generate_dataset

    root = tmp_path / "data"
    generate_dataset(root, sites=2, per_site=30, test_size=8, size=32, seed=1)
    run = tmp_path / "audit"
    assert main(["audit", "--quick", "--no-utility", "--data", str(root), "--out", str(run)]) == 0
    audit = json.loads((run / "audit.json").read_text())
    cells = {(r["model"], r["batch_size"], r["defence"]) for r in audit["inversion"]}
    assert ("probe", 4, "DP-SGD eps 8") in cells and ("cnn5", 1, "FedAvg") in cells
    assert ("cnn5", 1, "DP-SGD eps 8") not in cells  # the project's models: undefended only
    dp = next(r for r in audit["inversion"] if r["defence"] == "DP-SGD eps 8")
    assert 7 < dp["epsilon"] <= 8 and dp["noise_multiplier"] > 0
    assert all(0 <= r["identified"] <= 1 and -1 <= r["ssim"] <= 1 for r in audit["inversion"])
    assert "| FedAvg | none |" in (run / "audit.md").read_text()
    assert (run / "reconstructions.png").stat().st_size > 1000
    assert "Privacy audit" in (run / "report" / "report.html").read_text()
