"""--quantize fp16 | 8bit: NVFlare's quantization filters on what a site sends (app_custom/quantization.py)."""

import json

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.decomposers import common_decomposers
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from app_custom.quantization import (BLOCKSIZE, BLOCKWISE8_ERROR, FP16_ABSOLUTE_ERROR, FP16_RELATIVE_ERROR,
                                     UpdateDequantizer, UpdateQuantizer)
from cxrfl.fl.config import FLConfig
from lightning_modules.config import ConfigError
from lightning_modules.networks import build_classifier

fobs.register(TensorDecomposer)  # as NVFlare's components do: tensors and numpy arrays on the wire
common_decomposers.register()


def _update(seed=0) -> dict:
    """A DenseNet121-shaped weight difference: small changes of different scale per tensor, exact integer counters."""
    generator = torch.Generator().manual_seed(seed)
    update = {}
    for name, value in build_classifier("densenet121", 2).state_dict().items():
        if value.is_floating_point():
            scale = 10 ** -float(torch.randint(1, 5, (1,), generator=generator))
            update[name] = torch.randn(value.shape, generator=generator) * scale
        else:
            update[name] = torch.full_like(value, 3)
    return update


def _round_trip(update: dict, quantization: str) -> tuple[dict, int, int]:
    """(dequantized update, bytes sent quantized, bytes sent as float32) through the two filters, as
    NVFlare serialises the update (FOBS)."""
    ctx = FLContext()
    plain = DXO(DataKind.WEIGHT_DIFF, {k: v.clone() for k, v in update.items()}).to_shareable()
    sent = UpdateQuantizer(quantization).process(DXO(DataKind.WEIGHT_DIFF, {k: v.clone() for k, v in update.items()})
                                                 .to_shareable(), ctx)
    wire = fobs.dumps(sent)
    received = UpdateDequantizer().process(fobs.loads(wire), ctx)
    return from_shareable(received).data, len(wire), len(fobs.dumps(plain))


@pytest.fixture(scope="module")
def update():
    return _update()


def test_fp16_update_dequantizes_within_its_documented_error_at_half_the_bytes(update):
    restored, sent, full = _round_trip(update, "fp16")
    assert restored.keys() == update.keys()
    for name, value in update.items():
        assert restored[name].dtype == value.dtype and restored[name].shape == value.shape
        if value.is_floating_point():
            assert torch.all((restored[name] - value).abs() <= FP16_RELATIVE_ERROR * value.abs() + FP16_ABSOLUTE_ERROR)
        else:
            assert torch.equal(restored[name], value)  # BatchNorm's counters travel exactly
    assert sent / full <= 0.5


def test_8bit_update_dequantizes_within_its_documented_error_at_a_quarter_of_the_bytes(update):
    restored, sent, full = _round_trip(update, "8bit")
    for name, value in update.items():
        if not value.is_floating_point():
            assert torch.equal(restored[name], value)
            continue
        error = (restored[name] - value).abs().ravel()
        flat = value.ravel()
        for start in range(0, flat.numel(), BLOCKSIZE):  # bound: a fraction of the largest magnitude of each block
            block = slice(start, start + BLOCKSIZE)
            assert error[block].max() <= BLOCKWISE8_ERROR * flat[block].abs().max() + 1e-12, name
        assert error.max() > 0  # it did quantize
    assert sent / full <= 0.27


def test_quantizer_accepts_numpy_updates_and_the_dequantizer_passes_unquantized_ones():
    ctx = FLContext()
    values = {"w": np.linspace(-1, 1, 10_000, dtype=np.float32), "n": np.array(5, dtype=np.int64)}
    sent = UpdateQuantizer("8bit").process(DXO(DataKind.WEIGHTS, dict(values)).to_shareable(), ctx)
    restored = from_shareable(UpdateDequantizer().process(fobs.loads(fobs.dumps(sent)), ctx)).data
    assert isinstance(restored["w"], np.ndarray) and restored["w"].dtype == np.float32
    assert np.abs(restored["w"] - values["w"]).max() <= BLOCKWISE8_ERROR * 1.0 + 1e-7
    assert restored["n"] == 5
    unquantized = DXO(DataKind.WEIGHTS, {"w": torch.ones(3)}).to_shareable()
    assert torch.equal(from_shareable(UpdateDequantizer().process(unquantized, ctx)).data["w"], torch.ones(3))


def test_an_update_claiming_quantization_without_its_values_is_refused():
    ctx = FLContext()
    sent = UpdateQuantizer("fp16").process(DXO(DataKind.WEIGHT_DIFF, {"w": torch.ones(8)}).to_shareable(), ctx)
    broken = from_shareable(sent)
    broken.data.pop("cxrfl.quantized")
    with pytest.raises(ValueError, match="without its packed values"):
        UpdateDequantizer().dequantization(broken.data, broken.meta["quant_state"], "float16",
                                           broken.meta["source_datatype"], ctx)
    short = from_shareable(UpdateQuantizer("fp16").process(
        DXO(DataKind.WEIGHT_DIFF, {"w": torch.ones(8)}).to_shareable(), ctx))
    short.data["cxrfl.quantized"] = short.data["cxrfl.quantized"][:4]
    with pytest.raises(ValueError, match="holds 4 values"):
        UpdateDequantizer().dequantization(short.data, short.meta["quant_state"], "float16",
                                           short.meta["source_datatype"], ctx)


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="fp16, 8bit"):
        UpdateQuantizer("4bit")


@pytest.mark.parametrize("other, reason", [
    ({"he": True, "cross_site_eval": False}, "does not combine with --he"),
    ({"dp": "percentile"}, "does not combine with --dp percentile"),
    ({"absent_weights": "keep"}, "--absent-weights keep"),
    ({"algorithm": "scaffold"}, "scaffold does not combine with --quantize"),
])
def test_quantize_refuses_what_it_does_not_combine_with(other, reason):
    with pytest.raises(ConfigError, match=reason):
        FLConfig(quantize="8bit", **other)
    FLConfig(**other)  # each is fine without --quantize


def test_quantized_job_carries_the_filters_and_sends_differences(tmp_path):
    from cxrfl.fl.simulator import export_job

    cfg = FLConfig(task="classify", model="cnn5", image_size=32, quantize="fp16", classes=("normal", "pneumonia"))
    job = export_job(cfg, tmp_path)
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    client_filters = [f["path"] for chain in client["task_result_filters"] for f in chain["filters"]]
    assert client_filters[-1] == "app_custom.quantization.UpdateQuantizer"  # the last thing before sending
    server_filters = [f["path"] for chain in server["task_result_filters"] for f in chain["filters"]]
    assert server_filters.index("app_custom.quantization.UpdateDequantizer") < server_filters.index(
        "app_custom.contributions.UpdateValidator")  # the checks see float32 values
    assert (job / "app" / "custom" / "app_custom" / "quantization.py").is_file()
    executor = client["executors"][0]["executor"]["args"]
    assert executor["params_transfer_type"] == "DIFF"
