"""Attribution sanity checks (issue 15, item 4): the opacity-only phantom, the model-randomisation
check and the planted-signal check, for Grad-CAM, gradient saliency and MONAI's occlusion sensitivity. Each check
is shown to pass where it should and to fail where it should."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lightning_modules.attribution_checks import (
    fit_classifier,
    planted_signal_check,
    planted_signal_data,
    randomisation_check,
    randomised_copy,
)
from lightning_modules.data.manifest import read_dataset_info, read_manifest, site_dirs
from lightning_modules.data.phantom import generate_dataset, planted_signal_phantoms, render_phantom, site_profiles
from lightning_modules.interpret import network_heat_maps
from lightning_modules.networks import build_classifier

SIZE = 48


@pytest.fixture(scope="module")
def trained():
    """cnn5 trained a few epochs on the opacity-only phantom, and positive test images."""
    images, labels, _ = planted_signal_data(48, SIZE, seed=0)
    net = fit_classifier("cnn5", images, labels, epochs=2)  # any training moves the weights off their draw
    test, test_labels, opacity = planted_signal_data(24, SIZE, seed=1)
    positive = test_labels == 1
    return net, test[positive][:6], opacity[positive][:6]


def test_opacity_only_phantom_has_no_other_label_cue(tmp_path):
    profile = site_profiles(4)[3]
    marked = render_phantom(np.random.default_rng(2), profile, 64, True)
    unmarked = render_phantom(np.random.default_rng(2), profile, 64, True, marker=False)
    differs = marked.image != unmarked.image
    assert 0 < differs.sum() < 0.05 * differs.size  # only the side marker's pixels
    assert np.all(marked.image[differs] == np.float32(0.95))
    assert np.array_equal(marked.opacity_mask, unmarked.opacity_mask)

    phantoms = planted_signal_phantoms(40, 48, seed=0)
    labels = [p.label for p in phantoms]
    assert 10 < labels.count("pneumonia") < 30
    assert all((p.opacity_mask.sum() > 0) == (p.label == "pneumonia") for p in phantoms)

    generate_dataset(tmp_path, sites=3, per_site=30, test_size=6, size=32, seed=0, label_signal="opacity")
    assert read_dataset_info(tmp_path)["generator"]["label_signal"] == "opacity"
    shares = [np.mean([r.label == "pneumonia" for r in read_manifest(s / "manifest.csv")]) for s in site_dirs(tmp_path)]
    assert max(shares) - min(shares) < 0.4  # every site at prevalence 0.5 (default: 0.25 to 0.65)
    with pytest.raises(ValueError, match="label_signal"):
        generate_dataset(tmp_path / "bad", sites=1, per_site=4, size=32, label_signal="marker")


def test_randomisation_check_passes_for_random_weights_and_fails_for_the_same_model(trained):
    net, images, _ = trained
    randomised = randomisation_check(net, randomised_copy(net), "cnn5", images, "occlusion")
    assert randomised["pass"] and randomised["spearman"] < randomised["threshold"], randomised
    for method in ("gradcam", "gradient", "occlusion"):
        same = randomisation_check(net, net, "cnn5", images, method)  # a "randomisation" that changed nothing
        assert not same["pass"] and same["spearman"] > 0.9, same


def test_randomisation_check_does_not_pass_maps_without_mass(trained):
    net, images, _ = trained

    class Blank(torch.nn.Module):  # ignores its input, so its maps are all zero: nothing was tested
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.bias.expand(len(x), 2)

    for method in ("occlusion", "gradient"):
        blank = randomisation_check(Blank(), net, "blank", images, method)
        assert blank["maps_with_mass"] == 0 and blank["spearman"] is None and not blank["pass"], (method, blank)


def test_randomised_copy_changes_every_layer_and_leaves_the_model(trained):
    net, _, _ = trained
    before = {k: v.clone() for k, v in net.state_dict().items()}
    random = randomised_copy(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    weights = [k for k, v in before.items() if v.dtype.is_floating_point and v.numel() > 1]
    assert all(not torch.equal(before[k], random.state_dict()[k]) for k in weights)


class _OracleNet(torch.nn.Module):
    """Scores pneumonia by the mean intensity inside one known square: the answer a map must find."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())
        self.scale = torch.nn.Parameter(torch.tensor(4.0))

    def forward(self, x):
        score = (x[:, 0] * self.region).flatten(1).sum(1) / self.region.sum()
        return torch.stack([torch.zeros_like(score), self.scale * score], dim=1)


def test_planted_signal_check_passes_when_the_map_finds_the_signal_and_fails_otherwise(trained):
    region = torch.zeros(SIZE, SIZE)
    region[8:20, 26:38] = 1
    images = torch.randn(6, 1, SIZE, SIZE) * 0.1 + 2.0 * region  # bright where the signal is
    opacity = region.expand(6, SIZE, SIZE)
    for method in ("occlusion", "gradient"):
        found = planted_signal_check(_OracleNet(region), "oracle", images, opacity, method=method)
        assert found["pass"] and found["ratio_to_uniform"] > 5, (method, found)
    # the same check on the phantom for an untrained network: no planted signal to find
    _, test, test_opacity = trained
    torch.manual_seed(0)
    untrained = build_classifier("cnn5", 2).eval()
    for method in ("gradcam", "gradient", "occlusion"):
        blind = planted_signal_check(untrained, "cnn5", test, test_opacity, method)
        assert not blind["pass"], blind


def test_heat_maps_of_both_methods_are_image_sized_in_unit_range(trained):
    net, images, _ = trained
    for method in ("gradcam", "gradient", "occlusion"):
        maps = network_heat_maps(net, "cnn5", images[:2], 1, method)
        assert maps.shape == (2, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
    with pytest.raises(ValueError, match="method must be one of"):
        network_heat_maps(net, "cnn5", images[:1], 1, "lime")


def test_gradient_maps_equal_monais_vanilla_grad_and_leave_the_weights_alone(trained):
    from monai.visualize import VanillaGrad

    net, images, _ = trained
    net = copy.deepcopy(net)  # MONAI's VanillaGrad below leaves gradients on the weights
    maps = network_heat_maps(net, "cnn5", images[:3], 1, "gradient")  # batched
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    for i in range(3):
        reference = VanillaGrad(net)(images[i:i + 1].clone(), index=1).abs().sum(1)[0]
        torch.testing.assert_close(maps[i], reference / reference.max(), atol=1e-5, rtol=1e-4)


def test_bench_attribution_rows(tmp_path):
    from bench.cases import QUICK, run_case

    rows = run_case("attribution", QUICK, tmp_path)
    assert len(rows) == 6, rows
    for r in rows:
        assert "error" not in r["detail"], r
        assert (r["measured"] is None or isinstance(r["measured"], float)) and isinstance(r["pass"], bool) and r["target"]
    assert [r["case"].split(":")[0] for r in rows] == (["Attribution gradcam"] * 2 + ["Attribution gradient"] * 2
                                                       + ["Attribution occlusion"] * 2)
