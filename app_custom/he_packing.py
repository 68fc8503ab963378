"""Homomorphic encryption of the weight exchange: whole models packed into few CKKS vectors,
summed by the server, divided by the sites.

Replaces NVFlare's client `HEModelEncryptor`/`HEModelDecryptor` and its server
`HEInTimeAccumulateWeightedAggregator`, `HEModelShareableGenerator` and `HEModelSerializeFilter`.
Why, measured on DenseNet121 (7.0 M values, 727 tensors):
- the stock encryptor makes one CKKS vector per tensor, and NVFlare's FOBS decomposer ships each
  vector with its own serialised context that the server rebuilds per vector (~7.4 MB RSS each):
  ~5.4 GB per site and round on the server, and padding in half the ciphertext slots. Here the
  tensors are concatenated, in state-dict order, into buckets of at most `pack_size` values, one
  CKKS vector per bucket; each bucket's key names its tensors and shapes, so a packed model is
  self-describing (a key holder can unpack a saved global model without the job's code).
- the stock aggregator multiplies the ciphertext sum by 1/sum(weights), which needs a second
  CKKS level and so doubles every ciphertext (14x fp32 on the wire). Here the server only adds
  (sites pre-weight by their sample count) and sends the sum with the sum of weights in
  plaintext meta; sites divide after decrypting. One data prime suffices: ~7.5x fp32.
- ciphertexts travel and are stored as serialised bytes; the server parses them only to add the
  sites' updates and serialises the sum once. The stock generator and persistor filter parse and
  re-serialise the whole global model several times per round (~9 s of a 49 s DenseNet121 round).
Integer tensors (BatchNorm's `num_batches_tracked` counters) stay plaintext: they carry no image
information, and CKKS would lose their exactness.
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import tenseal as ts

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_opt.he import decomposers
from nvflare.app_opt.he.constant import HE_ALGORITHM_CKKS
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, model_learnable_to_dxo
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_opt.he.homomorphic_encrypt import load_tenseal_context_from_workspace
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

from app_custom.contributions import read_contribution

PACKED_PREFIX = "cxrfl.he.packed:"
DEFAULT_PACK_SIZE = 1 << 21  # values per CKKS vector: 512 ciphertexts, ~60 MB serialised
SUM_WEIGHT = "cxrfl_he_sum_of_weights"  # meta of a summed model: what the sites divide by
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


class _ContextFilter(DXOFilter):
    def __init__(self, tenseal_context_file: str, data_kinds: list[str] | None = None):
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=data_kinds or kinds)
        self.tenseal_context_file = tenseal_context_file
        self.tenseal_context = None
        decomposers.register()

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.tenseal_context = load_tenseal_context_from_workspace(self.tenseal_context_file, fl_ctx)
        elif event_type == EventType.END_RUN:
            self.tenseal_context = None

    def _context(self, fl_ctx: FLContext) -> ts.Context:
        if self.tenseal_context is None:
            self.tenseal_context = load_tenseal_context_from_workspace(self.tenseal_context_file, fl_ctx)
        return self.tenseal_context


class PackedHEEncryptor(_ContextFilter):
    """Site side, on train results: weight by the local sample count, pack, encrypt."""

    def __init__(self, tenseal_context_file: str = "client_context.tenseal", encrypt_layers: str | None = None,
                 pack_size: int = DEFAULT_PACK_SIZE, data_kinds: list[str] | None = None):
        super().__init__(tenseal_context_file, data_kinds)
        if pack_size < 1:
            raise ValueError("pack_size must be >= 1")
        self.encrypt_layers = encrypt_layers  # regex on tensor names; None: every floating-point tensor
        self.pack_size = pack_size

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        weight = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        if weight is None:
            raise ValueError("the site's result has no NUM_STEPS_CURRENT_ROUND to weight it by")
        start = time.time()
        data, processed = pack_and_encrypt(dxo.data, self._context(fl_ctx), float(weight), self.encrypt_layers,
                                           self.pack_size)
        n_vectors = sum(processed.values())
        self.log_info(fl_ctx, f"encrypted {len(dxo.data)} tensors into {n_vectors} CKKS vectors "
                              f"in {time.time() - start:.1f} s")
        out = DXO(data_kind=dxo.data_kind, data=data, meta=dxo.meta)
        out.set_meta_prop(MetaKey.PROCESSED_KEYS, processed)
        out.set_meta_prop(MetaKey.PROCESSED_ALGORITHM, HE_ALGORITHM_CKKS)
        return out


class PackedHEDecryptor(_ContextFilter):
    """Site side, on incoming models: decrypt and unpack (a plaintext model, such as round 0's
    initial one, passes unchanged)."""

    def __init__(self, tenseal_context_file: str = "client_context.tenseal", data_kinds: list[str] | None = None):
        super().__init__(tenseal_context_file, data_kinds)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if not any(is_packed(k) for k in dxo.data):
            return None
        total = dxo.get_meta_prop(SUM_WEIGHT)
        if not total or total <= 0:
            raise ValueError(f"the encrypted global model has no positive {SUM_WEIGHT} to divide its sum by")
        start = time.time()
        dxo.data = decrypt_and_unpack(dxo.data, self._context(fl_ctx), float(total))
        dxo.remove_meta_props([MetaKey.PROCESSED_ALGORITHM, MetaKey.PROCESSED_KEYS, SUM_WEIGHT])
        self.log_info(fl_ctx, f"decrypted the global model ({len(dxo.data)} tensors) in {time.time() - start:.1f} s")
        return dxo


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


class HESumAggregator(Aggregator):
    """Server side: sums the sites' pre-weighted encrypted updates (one per site and round) and
    sends the sum with the sum of weights; the server never holds a decryption key or a plaintext
    weight tensor."""

    def __init__(self, tenseal_context_file: str = "server_context.tenseal"):
        super().__init__()
        self.tenseal_context_file = tenseal_context_file  # public: adds ciphertexts, cannot decrypt them
        self._context = None
        self._sum = None
        self._contributors: set[str] = set()
        decomposers.register()

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.reset(fl_ctx)

    def reset(self, fl_ctx: FLContext) -> None:
        if self._context is None:  # once per job: the context file does not change
            self._context = load_tenseal_context_from_workspace(self.tenseal_context_file, fl_ctx)
        self._sum = CiphertextSum(self._context)
        self._contributors = set()

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        update = read_contribution(shareable, fl_ctx, self._contributors)
        refusal = update.refusal
        if refusal is None and (update.dxo.data_kind != DataKind.WEIGHTS
                                or update.dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM) != HE_ALGORITHM_CKKS):
            refusal = "it is not an HE-encrypted weights update"
        if refusal is None:
            try:
                if self._sum is None:
                    self.reset(fl_ctx)
                self._sum.add(update.dxo.data, update.weight)
            except Exception as exc:
                refusal = str(exc)
        if refusal:
            self.log_warning(fl_ctx, f"rejected the update of {update.site}: {refusal}")
            return False
        self._contributors.add(update.site)
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        if self._sum is None or self._sum.total is None:
            raise RuntimeError("no accepted update to aggregate this round")
        data = self._sum.serialized()
        processed = {k: is_packed(k) for k in data}
        dxo = DXO(data_kind=DataKind.WEIGHTS, data=data,
                  meta={MetaKey.PROCESSED_KEYS: processed, MetaKey.PROCESSED_ALGORITHM: HE_ALGORITHM_CKKS,
                        SUM_WEIGHT: self._sum.sum_of_weights})
        self.log_info(fl_ctx, f"summed the encrypted updates of {sorted(self._contributors)}")
        self.reset(fl_ctx)
        return dxo.to_shareable()


class PackedHEShareableGenerator(ShareableGenerator):
    """Server side: global model <-> task data, ciphertexts left as bytes throughout. Written here
    because NVFlare's HEModelShareableGenerator (with its HEModelSerializeFilter on the persistor)
    parses the previous global model's ciphertexts every round only to replace them, and parses and
    re-serialises each new one around every save: several 200 MB passes per round for DenseNet121."""

    def learnable_to_shareable(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        return model_learnable_to_dxo(model_learnable).to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            raise ValueError(f"expected the summed weights, got {dxo.data_kind}")
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        model[ModelLearnableKey.WEIGHTS] = dxo.data  # whole: packed keys replace the initial tensor names
        model[ModelLearnableKey.META] = dxo.get_meta_props()
        return model


class _WholeModelFormatManager(PTModelPersistenceFormatManager):
    """Takes each new global model whole: under packing its keys are the packed vectors, not the
    network's tensor names that PTModelPersistenceFormatManager.update insists on."""

    def update(self, ml: ModelLearnable):
        self.meta = ml.get(ModelLearnableKey.META, None)
        self.var_dict = dict(ml.get(ModelLearnableKey.WEIGHTS, {}))  # ciphertexts are bytes already


class PackedHEModelPersistor(PTFileModelPersistor):
    """Server side: NVFlare's PyTorch file persistor (last and best global model, atomic writes)
    that stores the packed ciphertext model as it comes. Round 0's initial model is the plaintext
    network from `model`; every later global model is ciphertext bytes under packed keys."""

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        learnable = super().load_model(fl_ctx)
        if self.persistence_manager is not None and not isinstance(self.persistence_manager, _WholeModelFormatManager):
            self.persistence_manager = _WholeModelFormatManager(
                self.persistence_manager.to_persistence_dict(), default_train_conf=self.default_train_conf,
                allow_numpy_conversion=self._allow_numpy_conversion)
        return learnable
