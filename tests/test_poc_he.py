"""Homomorphic encryption on a provisioned POC: the server adds ciphertexts it cannot decrypt, and
what the sites decrypt is the sample-weighted mean of their updates within CKKS precision."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import torch
from conftest import readable_private_keys, running_poc

from app_custom.ckks_packing import decrypt_and_unpack, is_packed
from app_custom.wire import SUM_WEIGHT
from cxrfl.cli import main


@pytest.fixture(scope="module")
def he_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("poc-he")
    with running_poc(base, he=True) as (state, data):
        ws = state["workspace"]
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["poc", "submit", "--task", "classify", "--he", "--record-contributions", "--model", "cnn5",
                         "--rounds", "2", "--image-size", "32", "--batch-size", "8", "--data", str(data),
                         "--workspace", ws]) == 0
        job_id = out.getvalue().strip().splitlines()[-1]
        run = base / "run"
        assert main(["poc", "wait", job_id, "--workspace", ws, "--out", str(run), "--timeout", "600"]) == 0
        yield {"state": state, "run": run}


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_server_holds_only_ciphertexts_and_no_secret_key(he_run):
    kits = Path(he_run["state"]["kits"])
    server_ctx = ts.context_from((kits / "localhost" / "startup" / "server_context.tenseal").read_bytes())
    client_ctx = ts.context_from((kits / "st-mary-hospital" / "startup" / "client_context.tenseal").read_bytes())
    assert not server_ctx.is_private() and client_ctx.is_private()
    rounds = he_run["run"] / "models" / "rounds"
    for path in [he_run["run"] / "models" / "global_final.pt", rounds / "global_round_001.pt",
                 rounds / "st-mary-hospital_round_001.pt"]:
        params = _load(path)
        packed = {k: v for k, v in params.items() if is_packed(k)}
        assert packed and all(isinstance(v, bytes) for v in packed.values()), path  # serialised CKKS vectors
        # in plaintext only BatchNorm's batch counters; every weight is inside a ciphertext
        assert all(k.endswith("num_batches_tracked") for k in set(params) - set(packed)), path
    global_1 = _load(rounds / "global_round_001.pt")
    vector = ts.ckks_vector_from(server_ctx, next(v for k, v in global_1.items() if is_packed(k)))
    with pytest.raises(Exception):
        vector.decrypt()  # the server's context has no secret key
    summary = json.loads((he_run["run"] / "metrics.json").read_text())
    assert summary["status"] == "FINISHED:COMPLETED"
    # the coordinator's copy, decrypted with a site's key (all kits are on this machine), is what was tested
    assert (he_run["run"] / "models" / "decrypted" / "global_final.pt").is_file()
    assert 0.0 <= summary["test"]["test_auroc"] <= 1.0
    # after a job: every private key (TLS, root CA in state/cert.json, HE secret contexts) 0600 in 0700
    assert readable_private_keys(Path(he_run["state"]["workspace"])) == []


def test_decrypted_aggregate_is_the_sample_weighted_mean(he_run):
    kits = Path(he_run["state"]["kits"])
    ctx = ts.context_from((kits / "st-mary-hospital" / "startup" / "client_context.tenseal").read_bytes())
    rounds = he_run["run"] / "models" / "rounds"
    log = [json.loads(line) for line in (rounds / "round_log.jsonl").read_text().splitlines()]
    sites = he_run["state"]["sites"]
    weights = {e["site"]: e["weight"] for e in log if e["round"] == 1}
    assert set(weights) == set(sites) and all(w > 0 for w in weights.values())
    global_1 = _load(rounds / "global_round_001.pt")
    sent = {s: _load(rounds / f"{s}_round_001.pt") for s in sites}

    packed = [k for k in global_1 if is_packed(k)]
    assert packed
    # the server sent the sum of the pre-weighted updates, with the sum of the weights
    record = torch.load(rounds / "global_round_001.pt", map_location="cpu", weights_only=False)
    total = record["meta"][SUM_WEIGHT]
    assert total == pytest.approx(sum(weights.values()))
    site_models = {s: decrypt_and_unpack(sent[s], ctx, weights[s]) for s in sites}  # what each site trained
    global_model = decrypt_and_unpack(global_1, ctx, total)
    for name, value in global_model.items():
        expected = sum(site_models[s][name].astype(np.float64) * weights[s] for s in sites) / total
        np.testing.assert_allclose(value, expected, atol=1e-5, err_msg=name)
    # unpacked with a site's key, it is a loadable model of the job's network
    from app_custom.global_model import GlobalModel

    model = GlobalModel(task="classify", model="cnn5")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in global_model.items()})
