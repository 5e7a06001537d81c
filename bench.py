"""Measure every speed-critical unit of the study in one process, on one device, and print a table.

    python bench.py                      # auto device; add --peers to time lucidrains' DDPM and Lightly's SimSiam
    OMP_NUM_THREADS=2 python bench.py --device cpu --repeats 5

Units: images/s of the training step of each model (as the drivers run it: --amp auto, channels_last on CUDA);
the SimSiam input pipeline (pairs of views per second: batched on-device augmentation vs the torchvision
DataLoader with the same worker count); DDPM sampling seconds for a batch of 16 with DDPM-1000 (ancestral, every
step) and DDIM-50; peak memory. With --peers (pip install denoising-diffusion-pytorch lightly), the same units of
the libraries people would otherwise use are timed in the same process, interleaved with ours, and the table adds
project/peer time ratios (below 1: ours is faster). The last line is `aug_speedup_vs_torchvision: X.XX`.
"""
import argparse
import resource
import statistics
import sys
import time

import torch

import ddpm_solution
import q3_solution
import train_ddpm
import train_simsiam
import train_vae
from studylib.augment import SimSiamAugment
from studylib.benchmarks import measure_pipelines
from studylib.run import HelpFormatter, positive_int, user_errors
from studylib.run import device_description, pick_device

BATCH = 64           # the training-step batch of every model (the peers' comparison batch too)
SAMPLE_BATCH = 16    # the sampling batch


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device, repeats):
    """Median wall seconds of one call, after one untimed warm-up call (allocator, lazy init, compilation)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns, device, repeats):
    """Median seconds per call of several functions timed in turn, so that load on the machine hits all alike."""
    for fn in fns:
        fn()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def peak_memory(device):
    """Peak GPU memory allocated by tensors (MiB), or the process's peak resident memory on the CPU (MiB)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------------- the training steps

def vae_step(device, amp):
    """The driver's VAE step (train_vae.build / train_step): reparameterisation noise passed in, as it trains."""
    model_config = dict(in_channels=3, encoder_features=train_vae.FEATURES, decoder_features=train_vae.FEATURES,
                        z_dim=train_vae.DEFAULTS['z_dim'], input_size=32)
    _, step_model, optimizer = train_vae.build(model_config, train_vae.DEFAULTS['lr'], device)
    x = torch.rand(BATCH, 3, 32, 32, device=device) * 2 - 1
    eps = torch.randn(BATCH, train_vae.DEFAULTS['z_dim'], device=device)
    return lambda: train_vae.train_step(step_model, optimizer, x, eps, amp)


def ddpm_parts(device):
    model_config = dict(dim=train_ddpm.DIM, channels=3, dim_mults=list(train_ddpm.DIM_MULTS))
    diffusion_config = dict(timesteps=train_ddpm.DEFAULTS['timesteps'], beta_start=ddpm_solution.beta_start,
                            beta_end=ddpm_solution.beta_end)
    return train_ddpm.build(model_config, diffusion_config, train_ddpm.DEFAULTS['lr'], device)


def ddpm_step(device, amp):
    """The driver's DDPM step (train_ddpm.build / train_step): t and the noise drawn per step, as it trains."""
    parts = ddpm_parts(device)
    x = torch.rand(BATCH, 3, 32, 32, device=device) * 2 - 1

    def step():
        t = parts.diffusion.t_sample(BATCH, device)
        noise = torch.randn_like(x)
        train_ddpm.train_step(parts, x, t, noise, amp)
    return step


def ddpm_sample_step(device):
    """One reverse step of the exact DDPM sampler on a batch of 16 (the unit of DDPM-1000's cost)."""
    model, _, diffusion, _ = ddpm_parts(device)
    model.eval()
    x = torch.randn(SAMPLE_BATCH, 3, 32, 32, device=device)
    t = torch.full((SAMPLE_BATCH,), 500, device=device, dtype=torch.long)

    @torch.no_grad()
    def step():
        diffusion.p_sample(model, x, t, 500)
    return step, model, diffusion


def simsiam_settings():
    return dict(arch='cifar_resnet18', pred_dim=train_simsiam.DEFAULTS['pred_dim'], stop_grad=True, predictor='mlp',
                dim=train_simsiam.DEFAULTS['dim'])


def simsiam_step(device, amp, images):
    """The driver's SimSiam step (train_simsiam.build / train_step: the predictor's lr in its own group) on two
    views of a batch (views made once: the pipeline is timed on its own)."""
    _, _, step_model, optimizer = train_simsiam.build(simsiam_settings(), train_simsiam.DEFAULTS['lr'] * BATCH / 256,
                                                      device, amp=amp)
    x1, x2 = SimSiamAugment().two_views(images[:BATCH].to(device))
    return lambda: train_simsiam.train_step(step_model, optimizer, [x1, x2]), x1, x2


# ------------------------------------------------------------------------------------------------------ the peers

def lucidrains_steps(device):
    """denoising-diffusion-pytorch's default small model: Unet(dim=32, dim_mults=(1, 2, 4, 8)) + GaussianDiffusion
    (T=1000), its training step on a batch of 64 and one sampling step on a batch of 16."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    diffusion = GaussianDiffusion(Unet(dim=32, dim_mults=(1, 2, 4, 8)), image_size=32, timesteps=1000).to(device)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-4)
    images = torch.rand(BATCH, 3, 32, 32, device=device)   # [0, 1], which it normalises to [-1, 1] itself
    x = torch.randn(SAMPLE_BATCH, 3, 32, 32, device=device)

    def train():
        loss = diffusion(images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def sample():
        diffusion.eval()
        diffusion.p_sample(x, 500)
        diffusion.train()
    return train, sample, sum(p.numel() for p in diffusion.model.parameters())


def lightly_step(device, x1, x2):
    """Lightly's SimSiam heads and loss on the same CIFAR ResNet-18 backbone, the same views and optimiser."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    backbone = q3_solution.cifar_resnet18(num_classes=10)
    backbone.fc = torch.nn.Identity()                                      # (B, 512) features
    net = torch.nn.ModuleDict(dict(backbone=backbone, projector=SimSiamProjectionHead(512, 512, 2048),
                                   predictor=SimSiamPredictionHead(2048, 512, 2048))).to(device)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)

    def step():
        z1, z2 = net['projector'](net['backbone'](x1)), net['projector'](net['backbone'](x2))
        p1, p2 = net['predictor'](z1), net['predictor'](z2)
        loss = 0.5 * (criterion(p1, z2.detach()) + criterion(p2, z1.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


# --------------------------------------------------------------------------------------------------------- main

class Table:
    """The measured rows: (unit, value, unit of value, peer ratio text, peak memory MiB), echoed as they come."""

    def __init__(self):
        self.rows = []

    def add(self, name, value, unit, ratio='', memory=None):
        self.rows.append((name, value, unit, ratio, memory))
        print(f'  {name}: {value:,.2f} {unit} {ratio}', file=sys.stderr, flush=True)

    def print_markdown(self):
        print('\n| unit | measured | peer ratio | peak memory (MiB) |\n|---|---|---|---|')
        for name, value, unit, ratio, memory in self.rows:
            mem = f'{memory:,.0f}' if memory is not None else ''
            print(f'| {name} | {value:,.2f} {unit} | {ratio.strip("()")} | {mem} |')


def bench_ddpm(args, device, amp, table):
    """The DDPM train and sampling steps (against lucidrains' with --peers); returns the sampling step's seconds
    and the model and schedule, reused by bench_sampling."""
    reset_peak(device)
    ours = ddpm_step(device, amp)
    ours_sample, model, diffusion = ddpm_sample_step(device)
    if args.peers:
        peer_train, peer_sample, peer_params = lucidrains_steps(device)
        t_ours, t_peer = interleaved([ours, peer_train], device, args.repeats)
        ratio = f'(project/lucidrains time: {t_ours / t_peer:.2f}; U-Net parameters '
        ratio += f'{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M vs {peer_params / 1e6:.1f} M)'
        table.add('DDPM train step, batch 64', BATCH / t_ours, 'images/s', ratio, peak_memory(device))
        s_ours, s_peer = interleaved([ours_sample, peer_sample], device, args.repeats)
        table.add('DDPM sampling step, batch 16', 1 / s_ours, 'steps/s',
                  f'(project/lucidrains time: {s_ours / s_peer:.2f})')
    else:
        table.add('DDPM train step, batch 64', BATCH / seconds_per_call(ours, device, args.repeats), 'images/s',
                  memory=peak_memory(device))
        s_ours = seconds_per_call(ours_sample, device, args.repeats)
        table.add('DDPM sampling step, batch 16', 1 / s_ours, 'steps/s')
    return s_ours, model, diffusion


def bench_simsiam(args, device, amp, images, table):
    reset_peak(device)
    ours, x1, x2 = simsiam_step(device, amp, images)
    if args.peers:
        t_ours, t_peer = interleaved([ours, lightly_step(device, x1, x2)], device, args.repeats)
        table.add('SimSiam train step, batch 64 (two views)', BATCH / t_ours, 'images/s',
                  f'(project/Lightly time: {t_ours / t_peer:.2f})', peak_memory(device))
    else:
        table.add('SimSiam train step, batch 64 (two views)', BATCH / seconds_per_call(ours, device, args.repeats),
                  'images/s', memory=peak_memory(device))


@torch.no_grad()
def bench_sampling(args, device, model, diffusion, step_seconds, table):
    """DDPM-1000 vs DDIM-50 on a batch of 16: DDIM in full; DDPM-1000 is 1000 identical steps, timed in full with
    --full-sampling, else estimated from the median step (stated in the table)."""
    model.eval()
    start = time.perf_counter()
    diffusion.ddim_sample(model, (SAMPLE_BATCH, 3, 32, 32), steps=50)
    sync(device)
    ddim_seconds = time.perf_counter() - start
    if args.full_sampling:
        start = time.perf_counter()
        diffusion.sample(model, (SAMPLE_BATCH, 3, 32, 32))
        sync(device)
        table.add('DDPM-1000 sampling, batch 16 (timed)', time.perf_counter() - start, 's')
    else:
        table.add('DDPM-1000 sampling, batch 16 (1000 x median step)', 1000 * step_seconds, 's')
    table.add('DDIM-50 sampling, batch 16 (timed)', ddim_seconds, 's')


def bench_pipelines(args, device, images, table):
    """The SimSiam input pipeline: batched on the device against torchvision's per-image DataLoader; returns the
    speed-up."""
    pipes = measure_pipelines(images, batch_size=args.aug_batch, workers=args.workers, repeats=args.aug_repeats,
                              device=str(device))
    batched, torchvision = pipes['pairs_per_s']['batched'], pipes['pairs_per_s']['torchvision']
    table.add(f'SimSiam views, batched on {device.type} (batch {args.aug_batch})', batched, 'pairs/s')
    table.add(f'SimSiam views, torchvision DataLoader ({args.workers} workers)', torchvision, 'pairs/s')
    for name in ('kornia_resample', 'kornia_slice'):
        if pipes['pairs_per_s'].get(name):
            table.add(f'SimSiam views, {name.replace("_", " ")} (for reference)', pipes['pairs_per_s'][name],
                      'pairs/s')
    return batched / torchvision


def bench(args):
    device = pick_device(args.device)
    amp = device.type == 'cuda' and torch.cuda.is_bf16_supported()   # what the drivers' --amp auto picks
    torch.manual_seed(0)
    table = Table()
    print(f'bench on {device_description(device)}, torch {torch.__version__}, amp={amp}, '
          f'{torch.get_num_threads()} threads', file=sys.stderr)
    images = torch.randint(0, 256, (max(args.aug_batch, BATCH), 3, 32, 32), dtype=torch.uint8)

    reset_peak(device)   # training steps (ours, and the peers interleaved with ours)
    step = vae_step(device, amp)
    table.add('VAE train step, batch 64', BATCH / seconds_per_call(step, device, args.repeats), 'images/s',
              memory=peak_memory(device))
    step_seconds, model, diffusion = bench_ddpm(args, device, amp, table)
    bench_simsiam(args, device, amp, images, table)
    bench_sampling(args, device, model, diffusion, step_seconds, table)
    speedup = bench_pipelines(args, device, images, table)

    table.print_markdown()
    memory_kind = 'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'process peak RSS so far'
    print(f'\ndevice: {device_description(device)}; torch {torch.__version__}; {torch.get_num_threads()} threads; '
          f'amp={amp}; repeats={args.repeats}; memory: {memory_kind}')
    print(f'aug_speedup_vs_torchvision: {speedup:.2f}')
    return dict(rows=table.rows, aug_speedup=speedup)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=HelpFormatter)
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto', help='where to measure')
    parser.add_argument('--repeats', type=positive_int, default=5, help='timed calls per unit (median reported)')
    parser.add_argument('--workers', type=int, default=2, help='DataLoader workers of the torchvision pipeline')
    parser.add_argument('--aug-batch', type=positive_int, default=512, help='batch of the pipeline measurement')
    parser.add_argument('--aug-repeats', type=positive_int, default=4, help='timed batches per pipeline')
    parser.add_argument('--full-sampling', action='store_true',
                        help='time DDPM-1000 sampling in full instead of 1000 x the median step')
    parser.add_argument('--peers', action='store_true',
                        help='also time lucidrains\' denoising-diffusion-pytorch and Lightly (installed separately)')
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error('--workers must be >= 0')
    with user_errors():
        if args.peers:
            import importlib.util
            missing = [m for m in ('denoising_diffusion_pytorch', 'lightly') if importlib.util.find_spec(m) is None]
            if missing:
                from studylib import UserError
                raise UserError(f'--peers needs {" and ".join(missing)}: '
                                f'pip install denoising-diffusion-pytorch lightly')
        return bench(args)


if __name__ == '__main__':
    main(sys.argv[1:])
