"""Packed CKKS encryption of whole models: what three DenseNet121 sites send, the server's
ciphertext-only sum (after a FOBS round trip like the wire), and what a site decrypts, against the
plaintext FedAvg of the same updates. Contexts use the project file's HEBuilder parameters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import torch

from app_custom.global_model import GlobalModel
from app_custom.ckks_packing import (MAX_WEIGHTED_ABS, PACKED_PREFIX, CiphertextSum, decrypt_and_unpack,
                                     pack_and_encrypt, parse_bucket_key, plan_buckets)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    """A client context (secret key) and the server's copy without it, as NVFlare's HEBuilder makes them."""
    from cxrfl.fl.he_keys import CLIENT_CONTEXT, write_he_contexts

    folder = tmp_path_factory.mktemp("he")
    write_he_contexts(folder)
    ctx = ts.context_from((folder / CLIENT_CONTEXT).read_bytes())
    server = ts.context_from(ctx.serialize(save_secret_key=False))
    return ctx, server


def _fobs_round_trip(obj):
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_opt.he import decomposers
    from nvflare.fuel.utils import fobs

    common_decomposers.register()
    decomposers.register()
    return fobs.loads(fobs.dumps(obj))


def test_buckets_cover_every_float_tensor_once_in_order():
    params = {"a": np.zeros((3, 4), np.float32), "count": np.array(5), "b": np.zeros(10, np.float32),
              "big": np.zeros(25, np.float32), "c": np.zeros(2, np.float32)}
    buckets = plan_buckets(params, None, pack_size=20)
    assert buckets == [[("a", (3, 4))], [("b", (10,))], [("big", (25,))], [("c", (2,))]]
    assert plan_buckets(params, None, pack_size=100) == [[("a", (3, 4)), ("b", (10,)), ("big", (25,)), ("c", (2,))]]


def test_pack_round_trip_restores_names_shapes_and_plaintext_counters(contexts):
    ctx, _ = contexts
    rng = np.random.default_rng(0)
    params = {"conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "bn.num_batches_tracked": np.array(7),
              "fc.bias": rng.normal(size=2).astype(np.float32)}
    packed, processed = pack_and_encrypt(params, ctx, weight=3.0, encrypt_layers="conv", pack_size=1000)
    assert sum(processed.values()) == 1 and processed["fc.bias"] is False and processed["bn.num_batches_tracked"] is False
    np.testing.assert_allclose(packed["fc.bias"], params["fc.bias"] * 3)  # chosen not to encrypt: plaintext
    restored = decrypt_and_unpack(_fobs_round_trip(packed), ctx, sum_of_weights=3.0)
    assert set(restored) == set(params)
    assert restored["conv.weight"].shape == (4, 1, 3, 3)
    np.testing.assert_allclose(restored["conv.weight"], params["conv.weight"], atol=1e-5)
    with pytest.raises(ValueError, match="nothing to encrypt"):
        pack_and_encrypt(params, ctx, encrypt_layers="no-such-layer")
    for bad in (np.nan, MAX_WEIGHTED_ABS):  # would decrypt to garbage: refused at the site, naming the tensor
        with pytest.raises(ValueError, match="conv.weight"):
            pack_and_encrypt(dict(params, **{"conv.weight": np.full((2, 2), bad)}), ctx, weight=3.0)


def test_three_densenet121_sites_aggregate_to_the_plaintext_fedavg(contexts):
    ctx, server_ctx = contexts
    base = {k: v.numpy() for k, v in GlobalModel(task="classify", model="densenet121").state_dict().items()}
    n_values = sum(v.size for v in base.values())
    assert len(base) == 727 and n_values > 7_000_000  # the whole model, every tensor
    rng = np.random.default_rng(1)
    weights = {"site-a": 120.0, "site-b": 45.0, "site-c": 300.0}
    updates = {s: {k: (v + rng.normal(scale=0.05, size=v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v + i
                   for k, v in base.items()} for i, s in enumerate(weights)}

    # server: the HE aggregator's running sum (weights applied at the sites), with the public context
    summed = CiphertextSum(server_ctx)
    for site, w in weights.items():
        packed, processed = pack_and_encrypt(updates[site], ctx, weight=w)
        assert 0 < sum(processed.values()) <= 8  # a handful of CKKS vectors, not 727
        received = _fobs_round_trip(packed)
        vector = next(v for k, v in received.items() if k.startswith(PACKED_PREFIX))
        assert isinstance(vector, bytes)  # ciphertext only: no context (and so no key) travels with it
        summed.add(received, w)
    assert summed.sum_of_weights == sum(weights.values())
    wire = _fobs_round_trip(summed.serialized())  # the server sends the ciphertext sum back, as bytes
    assert all(isinstance(v, bytes) for k, v in wire.items() if k.startswith(PACKED_PREFIX))

    site_view = decrypt_and_unpack(wire, ctx, summed.sum_of_weights)
    total = sum(weights.values())
    assert set(site_view) == set(base)
    worst = 0.0
    for name, value in base.items():
        expected = sum(updates[s][name].astype(np.float64) * w for s, w in weights.items()) / total
        assert site_view[name].shape == value.shape
        worst = max(worst, float(np.max(np.abs(site_view[name] - expected))))
    assert worst < 1e-6, worst  # CKKS precision, after weighting by hundreds of samples

    model = GlobalModel(task="classify", model="densenet121")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in site_view.items()})  # loads as a real model


def test_server_context_cannot_decrypt_the_aggregate(contexts):
    ctx, server_ctx = contexts
    packed, _ = pack_and_encrypt({"w": np.ones(10, np.float32)}, ctx)
    blob = next(v for v in packed.values())
    on_server = ts.ckks_vector_from(server_ctx, blob)
    with pytest.raises(Exception):
        on_server.decrypt()
    assert parse_bucket_key(next(iter(packed))) == [("w", (10,))]


def test_sum_refuses_an_update_packed_differently(contexts):
    ctx, server_ctx = contexts
    summed = CiphertextSum(server_ctx)
    summed.add(pack_and_encrypt({"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}, ctx)[0], 1.0)
    with pytest.raises(ValueError, match="differ"):
        summed.add(pack_and_encrypt({"a": np.ones(3, np.float32)}, ctx)[0], 1.0)


def test_packing_loads_without_nvflare():
    """A key holder decrypts a saved global model with ckks_packing alone: it must not need NVFlare."""
    code = "import sys, app_custom.ckks_packing; print(sorted(m for m in sys.modules if m.split('.')[0] == 'nvflare'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
