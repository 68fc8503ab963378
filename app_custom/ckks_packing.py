"""Whole models packed into few CKKS vectors (TenSEAL): what a site encrypts, what the server adds, what a
site decrypts. Plain numpy + TenSEAL, no NVFlare: the NVFlare filters, aggregator, generator and persistor
that use it are in he_packing.py, and a key holder can decrypt a saved global model with this alone.

- Packing: the floating-point tensors are concatenated, in state-dict order, into buckets of at most
  `pack_size` values, one CKKS vector per bucket (not one per tensor: fewer ciphertexts, no half-empty
  slots). Each bucket's key names its tensors and shapes, so a packed model is self-describing.
- Weighting: each site multiplies its values by its sample count before encrypting; the server only adds
  ciphertexts (`CiphertextSum`, no multiplication, so one CKKS data prime suffices) and sends the sum of
  weights in plaintext meta (SUM_WEIGHT); the sites divide after decrypting.
- Ciphertexts travel as serialised bytes, without a copy of the context.
Integer tensors (BatchNorm's `num_batches_tracked` counters) stay plaintext: they carry no image
information, and CKKS would lose their exactness.
"""

from __future__ import annotations

import json
import re

import numpy as np
import tenseal as ts

PACKED_PREFIX = "cxrfl.he.packed:"
DEFAULT_PACK_SIZE = 1 << 21  # values per CKKS vector: 512 ciphertexts, ~60 MB serialised
# With the project's context (data prime 54 bits, scale 2^27) a sum stays exact up to |2^26|:
# each site's weighted values must stay below this so that 16 sites still fit.
MAX_WEIGHTED_ABS = float(2 ** 22)


def bucket_key(index: int, members: list[tuple[str, tuple[int, ...]]]) -> str:
    return PACKED_PREFIX + json.dumps([index, [[name, list(shape)] for name, shape in members]],
                                      separators=(",", ":"))


def parse_bucket_key(key: str) -> list[tuple[str, tuple[int, ...]]]:
    _, members = json.loads(key[len(PACKED_PREFIX):])
    return [(name, tuple(shape)) for name, shape in members]


def is_packed(key) -> bool:
    return isinstance(key, str) and key.startswith(PACKED_PREFIX)


def should_encrypt(name: str, value: np.ndarray, pattern: re.Pattern | None) -> bool:
    if not np.issubdtype(np.asarray(value).dtype, np.floating):
        return False
    return pattern is None or bool(pattern.search(name))


def plan_buckets(params: dict, pattern: re.Pattern | None, pack_size: int) -> list[list[tuple[str, tuple]]]:
    """Tensors to encrypt, grouped in state-dict order into buckets of <= pack_size values
    (a tensor larger than pack_size gets a bucket of its own)."""
    buckets, current, size = [], [], 0
    for name, value in params.items():
        if not should_encrypt(name, value, pattern):
            continue
        n = int(np.size(value))
        if current and size + n > pack_size:
            buckets.append(current)
            current, size = [], 0
        current.append((name, tuple(np.shape(value))))
        size += n
    if current:
        buckets.append(current)
    return buckets


def pack_and_encrypt(params: dict, context: ts.Context, weight: float = 1.0, encrypt_layers: str | None = None,
                     pack_size: int = DEFAULT_PACK_SIZE) -> tuple[dict, dict]:
    """(packed params, {key: encrypted?}); each packed vector as serialised ciphertext bytes. Every
    value is multiplied by `weight` first (FedAvg's sample weight: the server only adds
    ciphertexts and divides by the sum of weights)."""
    pattern = re.compile(encrypt_layers) if encrypt_layers else None
    buckets = plan_buckets(params, pattern, pack_size)
    if not buckets:
        raise ValueError(f"nothing to encrypt: no floating-point tensor matches encrypt_layers={encrypt_layers!r}")
    packed_names = {name for bucket in buckets for name, _ in bucket}
    out, processed = {}, {}
    for index, bucket in enumerate(buckets):
        flat = np.concatenate([np.asarray(params[name], dtype=np.float64).ravel() for name, _ in bucket]) * weight
        peak = float(np.max(np.abs(flat))) if flat.size else 0.0
        if not np.isfinite(peak) or peak > MAX_WEIGHTED_ABS:
            worst = max((name for name, _ in bucket), key=lambda n: float(np.max(np.abs(params[n]))))
            raise ValueError(f"cannot encrypt: a value of {worst} times the weight {weight:g} is {peak:.3g}, beyond "
                             f"the CKKS context's exact range ({MAX_WEIGHTED_ABS:.3g}); NaN/Inf or diverged training?")
        key = bucket_key(index, bucket)
        out[key] = ts.ckks_vector(context, flat).serialize()  # bytes: FOBS ships no context copy with them
        processed[key] = True
    for name, value in params.items():
        if name not in packed_names:
            out[name] = np.asarray(np.asarray(value) * weight)  # 0-d stays an array (FOBS has no scalar decomposer)
            processed[name] = False
    return out, processed


def decrypt_and_unpack(params: dict, context: ts.Context, sum_of_weights: float = 1.0) -> dict:
    """Inverse of pack_and_encrypt: decrypt, divide by the sum of the weights the values carry
    (a summed model's SUM_WEIGHT meta; a single site's update: its own weight), unpack."""
    out = {}
    for key, value in params.items():
        if not is_packed(key):
            out[key] = np.asarray(value) / sum_of_weights
            continue
        vector = ts.ckks_vector_from(context, value) if isinstance(value, bytes) else value
        flat = np.asarray(vector.decrypt(secret_key=context.secret_key()), dtype=np.float64) / sum_of_weights
        members = parse_bucket_key(key)
        expected = sum(int(np.prod(shape)) for _, shape in members)
        if flat.size != expected:
            raise ValueError(f"packed vector holds {flat.size} values, its key lists {expected}")
        offset = 0
        for name, shape in members:
            n = int(np.prod(shape))
            out[name] = flat[offset:offset + n].astype(np.float32).reshape(shape)
            offset += n
    return out


class CiphertextSum:
    """Running sum of packed updates, in place: ciphertexts are added, never multiplied or decrypted.
    Ciphertexts come and go as bytes; they are parsed (with the server's public `context`) only to add."""

    def __init__(self, context: ts.Context):
        self.context = context
        self.total: dict | None = None
        self.sum_of_weights = 0.0

    def _parsed(self, value):
        return ts.ckks_vector_from(self.context, value) if isinstance(value, (bytes, bytearray)) else value

    def add(self, data: dict, weight: float) -> None:
        if self.total is not None and set(data) != set(self.total):
            raise ValueError("the update's tensors or packing differ from the others' this round")
        if self.total is None:
            self.total = {k: self._parsed(v) if is_packed(k) else v for k, v in data.items()}
        else:
            for key, value in data.items():
                if is_packed(key):
                    self.total[key].add_(self._parsed(value))
                else:
                    self.total[key] = self.total[key] + value
        self.sum_of_weights += float(weight)

    def serialized(self) -> dict:
        """The sum with every ciphertext as bytes, as it is sent and stored."""
        if self.total is None:
            raise ValueError("nothing has been added")
        return {k: v.serialize() if isinstance(v, ts.CKKSVector) else v for k, v in self.total.items()}
