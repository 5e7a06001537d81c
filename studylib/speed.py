"""What makes a training step fast without changing what it computes: bf16 autocast, channels_last, fused or
foreach optimiser kernels and torch.compile, chosen once from the common flags (--amp, --compile).

channels_last and fused kernels are CUDA's choices. STUDYLIB_SPEED_PATHS=all (for tests) takes them on the CPU
too, so that a CPU-only test suite runs every line a GPU user's defaults run, apart from the CUDA kernels."""
import contextlib
import os

import torch


def _gpu_paths(device):
    return device.type == 'cuda' or os.environ.get('STUDYLIB_SPEED_PATHS') == 'all'


def use_amp(amp, device):
    """bf16 autocast from the --amp value: auto turns it on on a CUDA GPU that supports bf16 and off on the CPU
    (where bf16 matmuls are emulated on most processors and slower than float32)."""
    if amp == 'auto':
        return device.type == 'cuda' and torch.cuda.is_bf16_supported()
    return amp == 'on'


def autocast(device, enabled):
    """The forward pass's precision context: bf16 needs no loss scaling (float32's exponent range)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def prepare_model(model, device, compile_model=False, wrap=None):
    """channels_last on CUDA (tensor-core convolutions want NHWC), then `wrap` (DistributedDataParallel under
    torchrun), then torch.compile when asked. Returns the module to call in the training step; `model` itself keeps
    the weights, so checkpoints and EMA see plain names."""
    if _gpu_paths(device):
        model = model.to(memory_format=torch.channels_last)
    if wrap is not None:
        model = wrap(model)
    return torch.compile(model) if compile_model else model


def optimizer_kwargs(device):
    """fused=True (one kernel for the whole update) on CUDA; the default foreach path elsewhere."""
    return {'fused': True} if _gpu_paths(device) else {}


def to_device_batch(x, device):
    """A batch onto the training device in the layout the model was prepared for."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if _gpu_paths(device) and x.dim() == 4 else x
