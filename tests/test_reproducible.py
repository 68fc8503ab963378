"""The same seed gives the same run: the same initial global model, byte for byte, and on CPU the
same models after a round (two simulations compared byte for byte: tests/test_federated.py's SCAFFOLD
test, whose first round is FedAvg's)."""

from __future__ import annotations

import json

import pytest
import torch

from app_custom.global_model import GlobalModel
from app_custom.intermittent import weighted_mean
from cxrfl.cli import main
from lightning_modules.data.phantom import generate_dataset


def test_the_initial_global_model_is_a_function_of_the_seed():
    first, again = (GlobalModel(task="classify", model="cnn5", seed=7).state_dict() for _ in range(2))
    other = GlobalModel(task="classify", model="cnn5", seed=8).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())
    before = torch.random.get_rng_state()
    GlobalModel(task="segment", model="unet", seed=7)
    assert torch.equal(before, torch.random.get_rng_state())  # the server process's own stream is untouched


def test_fedavg_sums_in_site_order_whatever_the_arrival_order():
    gen = torch.Generator().manual_seed(0)
    updates = {f"site-{i}": ({"w": torch.randn(1000, generator=gen) * 10 ** i}, 10 + i) for i in range(5)}
    arrived = dict(reversed(list(updates.items())))
    assert torch.equal(weighted_mean(updates)["w"], weighted_mean(arrived)["w"])


@pytest.mark.parametrize("command", [["central", "--task", "classify", "--epochs", "1"]])
def test_deterministic_algorithms_can_be_asked_for(command, tmp_path):
    root = tmp_path / "data"
    generate_dataset(root, sites=2, per_site=8, test_size=6, size=32, seed=4)
    run = tmp_path / "run"
    assert main(command + ["--model", "cnn5", "--image-size", "32", "--batch-size", "8", "--deterministic",
                           "--data", str(root), "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["deterministic"] is True


def test_augmentation_follows_the_seed_and_changes_every_round(tmp_path):
    """MONAI's Compose re-seeds the random transforms inside it from an unseeded draw: the data
    module seeds them again, so the same seed gives the same batches; each new training loader (a
    federated site's next round) draws new augmentations."""
    from lightning_modules.data.datamodule import CXRDataModule

    root = tmp_path / "data"
    generate_dataset(root, sites=1, per_site=16, test_size=4, size=32, seed=5)

    def first_batches(seed: int) -> list[torch.Tensor]:
        dm = CXRDataModule(root, task="classify", image_size=32, batch_size=8, seed=seed)
        dm.setup("fit")
        return [next(iter(dm.train_dataloader()))["image"] for _ in range(2)]  # two rounds

    a, b, other = first_batches(1), first_batches(1), first_batches(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], other[0])
