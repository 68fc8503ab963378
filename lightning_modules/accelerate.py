"""What a Trainer needs to keep a CUDA GPU busy, from a `TrainConfig`: the numeric precision
(`trainer_precision`), channels-last memory order for the convolutions (`device_callbacks`), where the
training images are kept (`training_data_device`), and the GPU ids a simulator run may use (`check_gpu_ids`).
On CPU none of them changes anything: precision 32, an inactive callback, images in host memory.
"""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch

from lightning_modules.config import ConfigError, TrainConfig

CUDA_ACCELERATORS = ("auto", "gpu", "cuda")  # accelerator settings under which Lightning picks a CUDA GPU


def on_cuda(accelerator: str) -> bool:
    """Whether a Trainer with this accelerator setting trains on a CUDA GPU on this machine."""
    return accelerator in CUDA_ACCELERATORS and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str, dp_sgd: bool = False) -> str:
    """The Trainer's `precision=` for a --precision setting on this machine (ConfigError when it cannot work here).

    auto: bf16-mixed on a GPU with native bfloat16 (no gradient scaling needed), 16-mixed (fp16 autocast; Lightning
    adds the gradient scaler) on older GPUs, 32 on CPU and with DP-SGD (see TrainConfig._check_device)."""
    cuda = on_cuda(accelerator)
    if precision == "auto":
        if dp_sgd or not cuda:
            return "32"
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    if precision == "16-mixed" and not cuda:  # Lightning would silently switch to bf16-mixed
        raise ConfigError("--precision 16-mixed needs a CUDA GPU and this machine trains on the CPU; "
                          "use --precision bf16-mixed or 32")
    if precision == "bf16-mixed" and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(f"--precision bf16-mixed: this GPU ({torch.cuda.get_device_name()}) has no native "
                          "bfloat16; use --precision 16-mixed or auto")
    return precision


def trainer_precision(cfg: TrainConfig) -> str:
    """`precision=` for every Trainer a run builds (training and evaluation alike)."""
    return resolve_precision(cfg.precision, cfg.accelerator, cfg.dp_sgd)


CHANNELS_LAST_DEVICES = ("cuda", "cpu")  # where channels-last was measured faster


class ChannelsLast(pl.Callback):
    """On a CUDA device or the CPU: the network's 4-D weights and every batch's images in channels-last
    order (NHWC). cuDNN runs mixed-precision convolutions in that layout without transposing each one;
    oneDNN's CPU convolutions are faster in it too (DenseNet121 at 96 px and the U-Net at 128 px train
    15-20 % faster per image on this project's 2-core machine, docs/performance.md). The usual order is
    restored when training ends (before NVFlare's FLCallback sends the weights) and when the trainer is
    done, so updates and the final weights are in it; a checkpoint saved during training holds the same
    values in NHWC strides (loading copies them into any layout). Other devices: nothing changes."""

    def __init__(self):
        self.active = False

    def setup(self, trainer, pl_module, stage):
        # the model is still on the CPU here; moving it to the GPU keeps its memory format
        self.active = trainer.strategy.root_device.type in CHANNELS_LAST_DEVICES
        if self.active:
            pl_module.to(memory_format=torch.channels_last)

    def _restore(self, pl_module) -> None:
        if self.active:
            pl_module.to(memory_format=torch.contiguous_format)

    def on_train_end(self, trainer, pl_module):
        self._restore(pl_module)

    def teardown(self, trainer, pl_module, stage):
        self._restore(pl_module)
        self.active = False

    def _images(self, batch) -> None:
        # the step receives this same dict: changing its entry changes what the network sees
        if self.active and isinstance(batch, dict):
            image = batch.get("image")
            if isinstance(image, torch.Tensor) and image.dim() == 4:
                batch["image"] = image.contiguous(memory_format=torch.channels_last)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._images(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._images(batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._images(batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._images(batch)


def device_callbacks(cfg: TrainConfig) -> list[pl.Callback]:
    """Callbacks every Trainer of a run adds: channels-last. Not under DP-SGD: Opacus's
    per-sample gradient hooks are not measured with channels-last weights."""
    return [] if cfg.dp_sgd else [ChannelsLast()]


def training_data_device(cfg: TrainConfig) -> torch.device | None:
    """With --gpu-data, the GPU the training images are kept and augmented on; None otherwise."""
    if not cfg.gpu_data:
        return None
    if not on_cuda(cfg.accelerator):
        raise ConfigError("--gpu-data needs a CUDA GPU and torch sees none on this machine; leave --gpu-data off")
    return torch.device("cuda", torch.cuda.current_device())


def parse_gpu_ids(text: str) -> tuple[int, ...]:
    """`--gpus 0,1` as device ids; ValueError naming the option for anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isascii() and p.isdigit() for p in parts):  # digits only: no sign, so no negative id
        raise ValueError(f"--gpus: expected GPU ids as non-negative whole numbers separated by commas (like 0,1), "
                         f"got {text!r}")
    ids = tuple(int(p) for p in parts)
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus: GPU {max(ids, key=ids.count)} is listed twice in {text!r}")
    return ids


def host_gpu_ids() -> list[int]:
    """The CUDA device ids a site may be given here, as nvidia-smi numbers them: those CUDA_VISIBLE_DEVICES lists
    when it lists numbers (a site's process gets CUDA_VISIBLE_DEVICES=<id>, replacing it), else 0..count-1."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if count and listed and all(v.isdigit() for v in listed):
        return [int(v) for v in listed[:count]]
    return list(range(count))


def check_gpu_ids(ids: tuple[int, ...]) -> None:
    """ConfigError naming the first id with no CUDA device behind it on this machine."""
    available = host_gpu_ids()
    for gpu in ids:
        if gpu not in available:
            offers = f"CUDA devices {','.join(map(str, available))}" if available else "no CUDA device"
            raise ConfigError(f"--gpus {','.join(map(str, ids))}: no CUDA device {gpu} on this machine "
                              f"(it offers {offers})")
