"""Throughput of the SimSiam augmentation pipelines, for a bench script to call:

    from studylib.benchmarks import measure_pipelines
    measure_pipelines(train_images_uint8, batch_size=512, workers=2, repeats=4)

Every number is in pairs/s: source images per second turned into their two augmented views (x1, x2), the unit of
a SimSiam training step. The in-process pipelines use torch.get_num_threads() threads (set OMP_NUM_THREADS and pin
the process with taskset for comparable numbers); DataLoader workers run one thread each, as PyTorch sets them.
"""
import itertools
import time

import torch

from .augment import CIFAR_MEAN, CIFAR_STD, SimSiamAugment, torchvision_pipeline


class _TorchvisionViews(torch.utils.data.Dataset):
    """train_simsiam.Views: two torchvision draws per uint8 image; index i reads image i mod N."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return 1 << 30

    def __getitem__(self, i):
        image = self.images[i % len(self.images)]
        return self.transform(image), self.transform(image)


def kornia_pipeline(crop_scale, cropping_mode='resample'):
    """The same recipe with kornia.augmentation's modules (the comparison, not what training uses: see
    studylib/augment.py for how they deviate from torchvision), on float [0, 1] batches. Needs kornia."""
    import kornia.augmentation as K
    return torch.nn.Sequential(
        K.RandomResizedCrop((32, 32), scale=crop_scale, ratio=(3 / 4, 4 / 3), align_corners=False,
                            cropping_mode=cropping_mode),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.Normalize(torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)),
    )


def _pairs_per_s(step, batch_size, repeats, device):
    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    step()                                                   # warm-up: allocator, lazy imports, kernels
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return batch_size * repeats / (time.perf_counter() - start)


@torch.no_grad()
def measure_pipelines(images, *, batch_size=512, workers=0, repeats=4, crop_scale=(0.2, 1.0), device='cpu',
                      seed=0):
    """Pairs/s of each pipeline on `images` (uint8 (N, 3, 32, 32)), `repeats` timed batches of batch_size images:

        batched            SimSiamAugment.two_views on a uint8 batch already on `device` (as training indexes
                           its on-device dataset), after one untimed warm-up batch
        kornia_resample    kornia.augmentation, batched warp crop (uint8 -> float included), same conditions
        kornia_slice       kornia.augmentation, its default crop mode (a Python loop over the images)
        torchvision        the official code's per-image DataLoader on the CPU (two torchvision v2 draws per
                           image, `workers` processes, default collate), timed from the iterator's creation
                           because workers prefetch; make repeats a multiple of workers. The copy to `device`
                           is not included.

    A kornia entry is None when kornia is not installed. Returns dict(pairs_per_s={...},
    speedup_vs_torchvision={...}, batch_size, workers, repeats, threads, device).
    """
    device = torch.device(device)
    images = images.cpu()
    gen = torch.Generator().manual_seed(seed)
    batches = [images[torch.randint(len(images), (batch_size,), generator=gen)].to(device)
               for _ in range(repeats + 1)]
    results = {}

    aug = SimSiamAugment(crop_scale=crop_scale).to(device)
    source = itertools.cycle(batches)
    results['batched'] = _pairs_per_s(lambda: aug.two_views(next(source)), batch_size, repeats, device)

    for mode in ('resample', 'slice'):
        try:
            k_aug = kornia_pipeline(crop_scale, mode).to(device)
        except ImportError:
            results[f'kornia_{mode}'] = None
            continue
        source = itertools.cycle(batches)

        def kornia_step():
            x = next(source).float().div_(255)
            return k_aug(x), k_aug(x)
        results[f'kornia_{mode}'] = _pairs_per_s(kornia_step, batch_size, repeats, device)

    loader = torch.utils.data.DataLoader(
        _TorchvisionViews(images, torchvision_pipeline(crop_scale)), batch_size=batch_size, shuffle=False,
        drop_last=True, num_workers=workers)
    start = time.perf_counter()
    batch_iter = iter(loader)
    for _ in range(repeats):
        next(batch_iter)
    results['torchvision'] = batch_size * repeats / (time.perf_counter() - start)
    del batch_iter                                           # shuts the workers down

    return dict(pairs_per_s=results,
                speedup_vs_torchvision={k: None if v is None else v / results['torchvision']
                                        for k, v in results.items()},
                batch_size=batch_size, workers=workers, repeats=repeats, threads=torch.get_num_threads(),
                device=str(device))
