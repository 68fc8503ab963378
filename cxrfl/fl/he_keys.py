"""TenSEAL contexts for runs outside a provisioned deployment, and decryption of saved HE models.

Provisioned kits get their contexts from the project file's HEBuilder; the simulator has no kits,
so `cxrfl sim --he` makes the same contexts (same builder, same parameters) for its workspace.
"""

from __future__ import annotations

from pathlib import Path

import tenseal as ts
import torch
import yaml
from nvflare.lighter.impl.he import HEBuilder

from app_custom.ckks_packing import decrypt_and_unpack, is_packed
from app_custom.wire import SUM_WEIGHT
from cxrfl.keyfiles import write_private_bytes
from lightning_modules.weights import load_checkpoint

from cxrfl.fl.provision import PROJECT_FILE
SERVER_CONTEXT = "server_context.tenseal"  # public: can add ciphertexts, cannot decrypt
CLIENT_CONTEXT = "client_context.tenseal"  # holds the secret key: sites only


def he_builder_args(project_file: Path = PROJECT_FILE) -> dict:
    project = yaml.safe_load(Path(project_file).read_text())
    for builder in project.get("builders", []):
        if builder["path"].endswith("HEBuilder"):
            return dict(builder.get("args") or {})
    raise ValueError(f"{project_file}: no HEBuilder among the builders")


def write_he_contexts(folder: Path, project_file: Path = PROJECT_FILE) -> None:
    """Write server and client contexts into `folder` (a simulator workspace's startup/). The
    client context holds the secret key: 0600, and the folder 0700 (NVFlare's HEBuilder leaves
    both to the umask)."""
    builder = HEBuilder(**he_builder_args(project_file))
    builder.initialize(None, None)
    folder = Path(folder)
    write_private_bytes(folder / CLIENT_CONTEXT, builder.get_serialized_context(is_client=True))
    (folder / SERVER_CONTEXT).write_bytes(builder.get_serialized_context(is_client=False))


def decrypt_checkpoint(path: Path, client_context: Path) -> dict[str, torch.Tensor]:
    """The plaintext state_dict of a saved HE global model (NVFlare persistor or round file),
    with a site's secret-key context. The file is read without running code from it; ValueError
    (one line, naming the file) for any other kind of file."""
    saved = load_checkpoint(path)
    if saved.kind != "nvflare":
        raise ValueError(f"{path}: a {saved.kind} model file, not a federated (NVFlare) global model")
    weights, meta = saved.state, saved.info
    if not any(is_packed(k) for k in weights):
        return {k: torch.as_tensor(v) for k, v in weights.items()}  # round 0: plaintext
    if not meta.get(SUM_WEIGHT):
        raise ValueError(f"{path}: an encrypted model without its {SUM_WEIGHT}")
    context = ts.context_from(Path(client_context).read_bytes())
    if not context.is_private():
        raise ValueError(f"{client_context}: this context has no secret key (a server context?)")
    plain = decrypt_and_unpack(weights, context, float(meta[SUM_WEIGHT]))
    return {k: torch.as_tensor(v) for k, v in plain.items()}
