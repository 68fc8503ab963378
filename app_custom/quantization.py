"""Compressed updates (`--quantize fp16 | 8bit`): what a site sends, quantized in NVFlare's quantization
filters (`nvflare.app_opt.pt.quantization`), dequantized by the server before anything reads it.

The filters are NVFlare's `ModelQuantizer` / `ModelDequantizer` (their 1-to-N locking, DXO meta keys and
wire format: `processed_algorithm`, `quant_state`, `source_datatype`, `quantized_flag`) with the per-tensor
step replaced, because NVFlare 2.9's refuses integer tensors (BatchNorm's `num_batches_tracked` counters:
"Invalid source data type") and moves 8-bit work to CUDA, which a CPU site does not have.

- fp16: each floating-point value rounded to float16 (clamped to its range); relative error <= 2^-11.
- 8bit: bitsandbytes' blockwise dynamic 8-bit quantization (NVFlare's "blockwise8": one float32 absmax per
  block of 4096 values, one byte per value), on the tensor's own device. The 256-value code book is the
  same for every tensor, so it is not sent with each one (NVFlare's format would add 1 KiB per tensor: 2 %
  of a DenseNet121 update). Error <= `BLOCKWISE8_ERROR` x the largest magnitude in the value's block.

Sites send weight differences when quantizing (cxrfl/fl/job.py): the error is then a fraction of what a
round changed, not of the weights. Integer tensors travel exactly. The server keeps its global model in
float32 and sends it unquantized (NVFlare's quantizer on the server would round the broadcast in place,
i.e. the server's own global model).
"""

from __future__ import annotations

import numpy as np
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

# --quantize value -> NVFlare's quantization type name (what the DXO's processed_algorithm meta says)
QUANTIZATION_TYPES = {"fp16": "float16", "8bit": "blockwise8"}
BLOCKSIZE = 4096
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}  # what a quantized tensor may be restored to
PACKED = "cxrfl.quantized"  # the update's key holding every floating-point tensor's codes
# Half the largest gap between neighbouring values of bitsandbytes' dynamic 8-bit code (0.00703; at the
# top of the range, near the block's absmax), rounded up.
BLOCKWISE8_ERROR = 0.0071
FP16_RELATIVE_ERROR = 2.0 ** -11  # round to nearest, 11 significant bits
FP16_ABSOLUTE_ERROR = 2.0 ** -25  # below float16's smallest normal number (subnormal spacing / 2)


def _as_tensor(values) -> tuple[torch.Tensor, bool]:
    """(tensor, came as numpy)."""
    if isinstance(values, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(values)), True
    if isinstance(values, torch.Tensor):
        return values, False
    raise ValueError(f"cannot quantize a {type(values).__name__}: numpy arrays or torch tensors only")


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).split(".")[1]  # what NVFlare's source_datatype meta holds: "float32", "int64"


def _back(tensor: torch.Tensor, as_numpy: bool):
    tensor = tensor.detach().cpu()
    return tensor.numpy() if as_numpy else tensor


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantize_tensor(tensor: torch.Tensor, quantization_type: str) -> tuple[torch.Tensor, dict]:
    """(quantized tensor, its state) for one floating-point tensor."""
    if quantization_type == "float16":
        limit = torch.finfo(torch.float16).max
        return tensor.float().clamp(-limit, limit).to(torch.float16), {}
    from bitsandbytes.functional import quantize_blockwise  # lazy: ~1 s of imports only runs that quantize

    flat = tensor.detach().to(_device(), torch.float32).contiguous().view(-1)
    quantized, state = quantize_blockwise(flat, blocksize=BLOCKSIZE)
    return quantized.cpu(), {"absmax": state.absmax.float().cpu()}


def dequantize_tensor(quantized: torch.Tensor, state: dict, quantization_type: str, shape) -> torch.Tensor:
    """float32 values of one quantized tensor."""
    if quantization_type == "float16":
        return quantized.float().reshape(tuple(shape))
    from bitsandbytes.functional import dequantize_blockwise

    absmax = torch.as_tensor(state["absmax"]).to(_device(), torch.float32)
    values = dequantize_blockwise(quantized.to(_device()), absmax=absmax, blocksize=BLOCKSIZE)
    return values.float().cpu().reshape(tuple(shape))


class UpdateQuantizer(ModelQuantizer):
    """NVFlare's quantizer filter (`quantization`: "fp16" or "8bit"), on any device and any state dict.

    The floating-point tensors are quantized one by one (8-bit blocks never span two tensors) and their
    codes sent as one packed tensor (`PACKED`), with their names and shapes in the quant state: a tensor
    on the wire carries ~300 bytes of framing, which a packed update pays once instead of 600 times."""

    def __init__(self, quantization: str = "8bit"):
        if quantization not in QUANTIZATION_TYPES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_TYPES)}, got {quantization!r}")
        super().__init__(quantization_type=QUANTIZATION_TYPES[quantization])

    def quantization(self, params: dict, fl_ctx: FLContext):
        tensors = {name: _as_tensor(values) for name, values in params.items()}
        names = [n for n, (t, _) in tensors.items() if t.is_floating_point() and t.numel()]
        if not names:
            return params, {}, {n: _dtype_name(t) for n, (t, _) in tensors.items()}
        as_numpy = tensors[names[0]][1]
        codes, absmax = [], []
        for name in names:
            params.pop(name)
            quantized, state = quantize_tensor(tensors[name][0], self.quantization_type)
            codes.append(quantized.ravel())
            if "absmax" in state:
                absmax.append(state["absmax"].ravel())
        packed = {"names": names, "shapes": [list(tensors[n][0].shape) for n in names],
                  "dtypes": [_dtype_name(tensors[n][0]) for n in names]}
        if absmax:
            packed["absmax"] = _back(torch.cat(absmax), as_numpy)
        params[PACKED] = _back(torch.cat(codes), as_numpy)
        source_datatype = {n: _dtype_name(_as_tensor(v)[0]) for n, v in params.items()}
        self.log_info(fl_ctx, f"quantized {len(names)} tensors to {self.quantization_type}")
        return params, {PACKED: packed}, source_datatype


class UpdateDequantizer(ModelDequantizer):
    """NVFlare's dequantizer filter for what UpdateQuantizer sends: float32 again before any check or sum."""

    def dequantization(self, params: dict, quant_state: dict, quantization_type: str, source_datatype: dict,
                       fl_ctx: FLContext):
        if quantization_type not in QUANTIZATION_TYPES.values():
            raise ValueError(f"unknown quantization {quantization_type!r} in an update")
        packed = quant_state.get(PACKED)
        if PACKED not in params or not packed:
            raise ValueError("a quantized update without its packed values or their names and shapes")
        codes, as_numpy = _as_tensor(params.pop(PACKED))
        absmax = torch.as_tensor(packed["absmax"]) if "absmax" in packed else None
        sizes = [int(np.prod(shape)) if shape else 1 for shape in packed["shapes"]]
        if sum(sizes) != codes.numel() or not len(sizes) == len(packed["names"]) == len(packed["dtypes"]):
            raise ValueError(f"a quantized update holds {codes.numel()} values, its names and shapes list {sum(sizes)}")
        unknown = set(packed["dtypes"]) - FLOAT_DTYPES
        if unknown:
            raise ValueError(f"a quantized update names dtypes {sorted(unknown)}; only {sorted(FLOAT_DTYPES)} are quantized")
        code_at = block_at = 0
        for name, n, shape, dtype in zip(packed["names"], sizes, packed["shapes"], packed["dtypes"]):
            state = {}
            if absmax is not None:
                blocks = -(-n // BLOCKSIZE)
                state["absmax"] = absmax[block_at:block_at + blocks]
                block_at += blocks
            restored = dequantize_tensor(codes[code_at:code_at + n], state, quantization_type, shape)
            code_at += n
            params[name] = _back(restored.to(getattr(torch, dtype)), as_numpy)
        return params

    def process_dxo(self, dxo, shareable, fl_ctx: FLContext):
        if not dxo.get_meta_prop("quantized_flag"):
            return dxo  # not quantized (NVFlare's would fail on it): the update checks judge it as it is
        return super().process_dxo(dxo, shareable, fl_ctx)
