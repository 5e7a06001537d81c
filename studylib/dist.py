"""Data-parallel training under torchrun: one process per device, DistributedDataParallel, rank 0 writes.

    torchrun --nproc_per_node=4 train_simsiam.py ...      # 4 GPUs (nccl), or 4 CPU processes (gloo)

`--batch-size` stays the GLOBAL batch: every rank draws the same permutation (same seed) and takes its contiguous
slice of each global batch, and the random numbers of a step (noise, time steps, augmentation parameters) are drawn
for the whole global batch on every rank, each rank keeping its slice. With batch norm synchronised across ranks,
an N-process run therefore computes what the single-process run computes, up to the order of float reductions;
the learning-rate rules that depend on the batch (SimSiam's 0.03 * batch / 256) use the global batch.
A plain `python train_X.py` (no torchrun environment) is one process and none of this applies.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import UserError
from .run import pick_device


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world > 1


def setup(device_flag):
    """The process group when torchrun started this process (nccl on CUDA, gloo on the CPU), else one process."""
    try:
        world = int(os.environ.get('WORLD_SIZE', '1'))
    except ValueError:
        raise UserError(f'WORLD_SIZE={os.environ["WORLD_SIZE"]!r} is not a number: start with torchrun, or unset '
                        f'it') from None
    if world == 1:
        return Ranks(device=pick_device(device_flag))
    if 'RANK' not in os.environ:
        raise UserError(f'WORLD_SIZE={world} is set but RANK is not: start with torchrun, or unset WORLD_SIZE '
                        f'for a single process')
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    device = pick_device(device_flag)
    if device.type == 'cuda':
        if local_rank >= torch.cuda.device_count():
            raise UserError(f'local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): '
                            f'lower --nproc_per_node')
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return Ranks(rank, world, device)


def teardown(ranks):
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(ranks, batch_size):
    if batch_size % ranks.world:
        raise UserError(f'--batch-size {batch_size} (the global batch) is not divisible by the {ranks.world} '
                        f'processes; each must get the same share')


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the sum is used by every rank, so each input's gradient is the sum of
    every rank's gradient of it (DistributedDataParallel then averages the parameter gradients as usual)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose batch statistics are all-reduced over the ranks (torch's SyncBatchNorm is CUDA-only); the
    gradient flows through the all-reduced statistics."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), x.pow(2).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean.pow(2)                          # biased, as batch norm normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            # momentum None: a cumulative average, as torch's batch norm
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))   # unbiased, as batch norm keeps
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module, ranks):
    """Every batch norm of `module` synchronised across the ranks (torch's SyncBatchNorm on CUDA, ours on CPU)."""
    if ranks is None or not ranks.distributed:
        return module
    if ranks.device.type == 'cuda':
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.requires_grad_(any(p.requires_grad for p in child.parameters()) if child.affine else False)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, ranks)
    return module


def wrap(model, ranks):
    """DistributedDataParallel over the ranks (the model itself keeps the weights and plain parameter names)."""
    if ranks is None or not ranks.distributed:
        return model
    ids = [ranks.device.index] if ranks.device.type == 'cuda' else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_sum(tensor, ranks):
    if ranks.distributed:
        dist.all_reduce(tensor)
    return tensor


def gather_rows(part, ranks):
    """Concatenate every rank's (n_r, ...) block in rank order (blocks may differ in length by one)."""
    if not ranks.distributed:
        return part
    sizes = [torch.zeros(1, dtype=torch.long, device=part.device) for _ in range(ranks.world)]
    dist.all_gather(sizes, torch.tensor([len(part)], device=part.device))
    longest = int(max(s.item() for s in sizes))
    padded = F.pad(part, [0, 0] * (part.dim() - 1) + [0, longest - len(part)])
    blocks = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(blocks, padded)
    return torch.cat([b[:int(s.item())] for b, s in zip(blocks, sizes)])


def barrier(ranks):
    if ranks.distributed:
        dist.barrier()
