"""Homomorphic encryption of the weight exchange, NVFlare side: the filters, aggregator, shareable generator
and persistor that move whole models packed into few CKKS vectors (the packing itself, without NVFlare, is
ckks_packing.py), summed by the server, divided by the sites.

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
"""

from __future__ import annotations

import time

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

from app_custom.ckks_packing import (DEFAULT_PACK_SIZE, CiphertextSum, decrypt_and_unpack, is_packed,
                                     pack_and_encrypt)
from app_custom.contributions import read_contribution
from app_custom.wire import SUM_WEIGHT


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
