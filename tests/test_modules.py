"""Networks and LightningModules: shapes, metrics, and no NVFlare dependency."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lightning_modules.classification import CXRClassifier, bootstrap_auroc, compute_metrics
from lightning_modules.networks import CNN5, build_classifier, build_segmenter
from lightning_modules.segmentation import LungSegmentation


def test_cnn5_matches_the_seed_paper_layout():
    net = CNN5(in_channels=1, num_classes=2)
    convs = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [32, 64, 64, 128, 256]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 5
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 5
    assert sorted({m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)}) == [0.1, 0.2]
    assert any(isinstance(m, torch.nn.Linear) and m.out_features == 128 for m in net.modules())
    assert net(torch.rand(2, 1, 150, 150)).shape == (2, 2)


@pytest.mark.parametrize("name,classes", [("densenet121", 2), ("densenet121", 3), ("cnn5", 3)])
def test_classifiers_take_one_channel(name, classes):
    net = build_classifier(name, classes).eval()
    assert net(torch.rand(2, 1, 64, 64)).shape == (2, classes)


@pytest.mark.parametrize("name", ["unet", "flexunet-b4"])
def test_segmenters_output_one_channel_at_input_size(name):
    net = build_segmenter(name).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_unknown_network_names_are_refused():
    with pytest.raises(ValueError, match="unknown classifier"):
        build_classifier("resnet9000", 2)
    with pytest.raises(ValueError, match="unknown segmenter"):
        build_segmenter("nope")


def test_bootstrap_interval_brackets_the_auroc():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (200,), generator=gen)
    probs = (target.float() * 0.6 + torch.rand(200, generator=gen) * 0.7).clamp(0, 1)
    from torchmetrics.functional.classification import binary_auroc

    point = float(binary_auroc(probs, target))
    low, high = bootstrap_auroc(probs, target, n_boot=300)
    assert low < point < high and high - low < 0.2


def test_classifier_metrics_binary_and_multiclass():
    for classes in (2, 3):
        module = CXRClassifier(model="cnn5", num_classes=classes, class_weights=[1.0] * classes)
        batch = {"image": torch.rand(6, 1, 48, 48), "label": torch.tensor([0, 1, 0, 1, classes - 1, 0])}
        module.val_metrics.update(module._scores(module(batch["image"])), batch["label"])
        names = set(compute_metrics(module.val_metrics))
        assert {"val_acc", "val_balanced_acc", "val_auroc", "val_f1", "val_sensitivity", "val_specificity"} <= names


def test_binary_metrics_match_hand_computed_values():
    module = CXRClassifier(model="cnn5", num_classes=2)
    # 8 negatives (6 right), 2 positives (both right): sensitivity 1, specificity 0.75
    logits = torch.tensor([[2.0, -2.0]] * 6 + [[-2.0, 2.0]] * 2 + [[-1.0, 1.0]] * 2)
    target = torch.tensor([0] * 8 + [1] * 2)
    module.test_metrics.update(module._scores(logits), target)
    m = compute_metrics(module.test_metrics)
    assert float(m["test_acc"]) == pytest.approx(0.8)
    assert float(m["test_sensitivity"]) == pytest.approx(1.0)
    assert float(m["test_specificity"]) == pytest.approx(0.75)
    assert float(m["test_balanced_acc"]) == pytest.approx(0.875)


def test_segmentation_prediction_keeps_two_largest_components():
    module = LungSegmentation(arch="unet")

    class Fixed(torch.nn.Module):
        def forward(self, x):
            out = torch.full_like(x, -10.0)
            out[..., 10:40, 5:25] = 10.0  # lung 1
            out[..., 10:40, 35:60] = 10.0  # lung 2
            out[..., 50:52, 50:52] = 10.0  # speck: removed
            out[..., 20:24, 10:14] = -10.0  # hole: filled
            return out

    module.net = Fixed()
    masks = module.predict_masks(torch.rand(1, 1, 64, 64))
    assert type(masks) is torch.Tensor and set(masks.unique().tolist()) == {0.0, 1.0}
    mask = masks[0, 0] > 0.5
    assert mask[50:52, 50:52].sum() == 0
    assert mask[20:24, 10:14].all()
    assert mask[10:40, 5:25].all() and mask[10:40, 35:60].all()


def test_lightning_modules_do_not_import_nvflare():
    code = ("import sys, lightning_modules.classification, lightning_modules.segmentation, "
            "lightning_modules.data.datamodule; print(any(m.startswith('nvflare') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_round_time_budget_bounds_every_fit_call():
    """Each federated round is one fit(); the budget must restart with each of them."""
    import time

    import pytorch_lightning as pl

    from lightning_modules.callbacks import RoundTimeBudget

    class Slow(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            time.sleep(0.02)
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(200, 4)), batch_size=1)
    budget = RoundTimeBudget(0.3)
    trainer = pl.Trainer(max_epochs=1, callbacks=[budget], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    module = Slow()
    steps = []
    for round_ in range(2):
        trainer.fit_loop.max_epochs = round_ + 1
        before = trainer.global_step
        trainer.fit(module, data)
        steps.append(trainer.global_step - before)
        assert budget.stopped_early
    assert all(0 < s < 200 for s in steps), steps  # both rounds trained, both were cut short
