"""Train the Problem 2 DDPM on SVHN and write every Problem 2 figure and number into one run folder.

    python train_ddpm.py                                  # the assignment: T=1000, 30 epochs, Adam 1e-4, batch 64
    python train_ddpm.py --recipe cpu                     # the CPU study's recipe (docs/studies.md#recipes)
    python train_ddpm.py --timesteps 500 --out-dir runs/ddpm-T500      # the 2.3a study: T=500 and T=1500
    python compare_ddpm.py runs/ddpm-T500 runs/ddpm runs/ddpm-T1500 --out-dir runs/ddpm-compare

Figures (question ids of the seed): 2.2a training and sampling time, 2.2b samples during training, 2.2c the t'
sweep (test images noised to t' and restored by the reverse process from t'), 2.2d final samples (beside the VAE's
with --compare-vae). t* is the first t' whose restorations have lost the digit half way: the first t' where the
share of restorations that the digit classifier (studylib.digit_net) still reads as the original digit falls below
the midpoint between its accuracy on the clean images and on unrelated ones (each image's label against another
image), over --sweep-images test images; the PSNR of the restorations is reported beside it. Sample quality
(studylib.digit_net): the Frechet distance and the kernel distance (KID) of a small SVHN digit classifier's
features between --quality-samples final samples and the first test images, and its confidence, for the DDPM, the
VAE and, to calibrate, as many training images; the classifier is trained (or loaded from its cache,
studylib.digit_net.cache_dir()) before the DDPM trains, so that a problem with it shows at once. 2.2d also shows
the template's own sampler (p_sample_loop, unclipped) beside the run's when they differ.
"""
import argparse
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import ddpm_solution
from studylib import UserError
from studylib.data import load_split, to_unit_range
from studylib.digit_net import accuracy, digit_quality, inception_fd, load_or_train
from studylib.plots import grid_array, pyplot, save_image_grid, save_time_figure
from studylib.run import (RESUMABLE_COMMON, make_config, make_parser, parse_with_recipe, positive_int, recipe_help,
                          seed_everything, time_metrics)
from studylib.trained import load_vae
from studylib.trainer import (TrainingRun, autocast, check_batch, optimizer_kwargs, prepare_model, run_main,
                              use_amp, wrap)

# ---- hyperparameters: the assignment's. Each is the default of the flag of the same name, and a recipe changes some
DEFAULTS = dict(
    epochs=30,                                   # passes over the training set
    batch_size=ddpm_solution.train_batch_size,   # images per optimizer step (64)
    lr=ddpm_solution.lr,                         # Adam step size (1e-4); Adam's betas and eps are torch's defaults
    timesteps=ddpm_solution.T,                   # diffusion steps T (1000); betas linear from 1e-4 to 0.02
    ema_decay=0.995,                             # weight EMA per step (a horizon of ~200 steps); 0 = none
    sample_every=5,                              # epochs between the 2.2b sample grids
    sweep_images=256,                            # test images noised and restored in the 2.2c sweep (t*)
    num_samples=64,                              # images per sampled batch (figures, timing)
    quality_samples=1000,                        # samples each model is scored on at the end (2.2d: FD, KID)
    sampler='ddpm',                              # the 2.2b/2.2d sampler: the exact T-step chain, as the template
    sample_steps=50,                             # DDIM steps when sampler is ddim
    clip_denoised=False,                         # x_0 clipped to [-1, 1] at every sampling step (not in the template)
)
DIM, DIM_MULTS = 32, (1, 2, 4, 8)   # U-Net base channels and their multiplier per resolution (the template's)
SWEEP_GRID = 8                      # of the 2.2c sweep's test images, those shown in its grid
# images per reverse step of the sweep, by device: one CPU core runs the U-Net ~1.8x faster per image at 64 than at
# 1024 (cache). Each batch draws its noise in turn, so another split draws other, equally distributed noise.
SWEEP_BATCH = {'cpu': 64, 'cuda': 1024}
QUALITY_REFERENCE = 2000            # test images the sample-quality measure compares against
RECIPES = {
    'assignment': {},   # the template's settings, sampled as the template samples
    # the CPU study's (docs/results.md): 4x the optimizer steps per epoch at twice the step size, so that half an hour
    # on one core draws digits; sampled with DDIM-50 (cheap enough to score every few epochs), x_0 clipped
    'cpu': dict(batch_size=16, lr=2e-4, sampler='ddim', clip_denoised=True),
}
# what a --resume may change besides the common flags: how the run samples and reports, not what it trains
RESUMABLE = RESUMABLE_COMMON | {'inception_fid', 'compare_vae', 'sample_every', 'num_samples', 'sampler',
                                'sample_steps', 'clip_denoised', 't_primes', 'sweep_images', 'quality_samples'}


def parse_t_primes(text):
    try:
        values = sorted({int(v) for v in text.split(',') if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}')
    if not values or values[0] < 0:
        raise argparse.ArgumentTypeError(f'expected integers >= 0, got {text!r}')
    return values


def default_t_primes(timesteps):
    """Every 5% of T up to 60%, then 70%, 80%, 90% and the last step T-1: dense where the digit is lost."""
    fractions = [k / 20 for k in range(1, 13)] + [0.7, 0.8, 0.9]
    return sorted({round(f * timesteps) for f in fractions} | {timesteps - 1})


def build_parser():
    parser = make_parser(__doc__.split('\n')[0], out_dir='runs/ddpm')
    ddpm = parser.add_argument_group('DDPM study')
    ddpm.add_argument('--recipe', choices=sorted(RECIPES), default='assignment',
                      help=f'the defaults of the flags it names ({recipe_help(RECIPES)}); flags given explicitly '
                           f'win')
    ddpm.add_argument('--timesteps', type=positive_int,
                      help='diffusion steps T (linear betas from 1e-4 to 0.02 whatever T is)')
    ddpm.add_argument('--sample-every', type=positive_int, help='save the 2.2b samples every N epochs (and after '
                                                                'the last)')
    ddpm.add_argument('--num-samples', type=positive_int,
                      help='images per sampled batch (2.2b, 2.2d, sampling time, quality)')
    ddpm.add_argument('--t-primes', type=parse_t_primes, default=None, metavar='T1,T2,...',
                      help="noise levels t' (0-based step indices < T) of the 2.2c sweep; default: every 5%% of T "
                           "to 60%%, then 70%%, 80%%, 90%% and T-1. t* is the first t' where the share of "
                           "restorations the digit classifier reads as the original digit falls below the midpoint "
                           "between its accuracy on the clean images and on unrelated ones")
    ddpm.add_argument('--quality-samples', type=positive_int,
                      help='samples of the DDPM, of the VAE (--compare-vae) and training images scored at the end '
                           '(digit FD and KID, each with a second draw), in batches of --num-samples; at least '
                           '--num-samples')
    ddpm.add_argument('--sweep-images', type=positive_int,
                      help="test images noised and restored at each t' of the 2.2c sweep (at most the test images; "
                           "the reverse passes cost about their number times the sum of the t')")
    ddpm.add_argument('--compare-vae', default=None, metavar='RUN_DIR',
                      help='a train_vae.py run folder: its samples are shown beside the DDPM ones in 2.2d')
    ddpm.add_argument('--ema-decay', type=float,
                      help="exponential moving average of the weights, updated every step; samples and the t' "
                           "sweep use it (0 = sample from the raw weights)")
    ddpm.add_argument('--sampler', choices=['ddpm', 'ddim'],
                      help="sampler of the 2.2b/2.2d figures: the exact DDPM ancestral chain with T steps (the "
                           "seed's), or deterministic DDIM (eta=0) with --sample-steps steps. The final stage also "
                           "times and scores DDIM with 50 and 100 steps beside DDPM")
    ddpm.add_argument('--sample-steps', type=positive_int, help='DDIM steps when --sampler ddim')
    ddpm.add_argument('--clip-denoised', action=argparse.BooleanOptionalAction,
                      help="clip each sampling step's predicted x_0 to [-1, 1] (lucidrains' clip_denoised, "
                           "diffusers' clip_sample); the template's p_sample does not")
    ddpm.add_argument('--inception-fid', action='store_true',
                      help='also report the standard Inception FID of the final samples against the quality '
                           'reference (needs torch-fidelity and the Inception weights: a connected machine)')
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parse_with_recipe(parser, argv, DEFAULTS, RECIPES)
    if not 0 <= args.ema_decay < 1:
        parser.error(f'--ema-decay must be in [0, 1), got {args.ema_decay}')
    if args.timesteps < 2:
        parser.error(f'--timesteps {args.timesteps}: a diffusion needs at least 2 steps')
    if args.num_samples < 2:
        parser.error(f'--num-samples {args.num_samples}: the Frechet distance of the quality measure needs at least '
                     f'2 samples')
    if args.sampler == 'ddim':
        try:   # the sampler's own rule (2 <= steps <= T), checked now rather than after the first epoch
            ddpm_solution.DiffusionSchedule(args.timesteps).ddim_timesteps(args.sample_steps)
        except ValueError as exc:
            parser.error(f'--sample-steps {args.sample_steps}: {exc}')
    args.quality_samples = max(args.quality_samples, args.num_samples)
    if args.t_primes is None:
        args.t_primes = default_t_primes(args.timesteps)
    if args.t_primes[-1] >= args.timesteps:
        parser.error(f"--t-primes: {args.t_primes[-1]} is not a step index of T={args.timesteps} (max T-1)")
    return args


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), one value per image: (B,).

    Both sets are clamped to [-1, 1] first, as they are when shown or saved: a chain that overshoots the pixel
    range is judged by the image it produces."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


class Parts(NamedTuple):
    """What build() makes: the U-Net, the module its training step calls, the diffusion schedule and Adam."""
    model: torch.nn.Module
    step_model: torch.nn.Module
    diffusion: ddpm_solution.DiffusionSchedule
    optimizer: torch.optim.Optimizer


def build(model_config, diffusion_config, lr, device, ranks=None, compile_model=False):
    """The U-Net (laid out, data-parallel under torchrun, compiled when asked), its schedule and Adam: Parts.
    bench.py times the same."""
    model = ddpm_solution.Unet(**model_config).to(device)
    step_model = prepare_model(model, device, compile_model, wrap=lambda m: wrap(m, ranks))
    diffusion = ddpm_solution.DiffusionSchedule(**diffusion_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, **optimizer_kwargs(device))
    return Parts(model, step_model, diffusion, optimizer)


def train_step(parts, x, t, noise, amp, loss_scale=1.0):
    """One optimizer step on the Huber loss between the drawn noise and the U-Net's prediction of it at x_t
    (q_sample of x with t and noise given): the loss. loss_scale weights this rank's share (studylib.trainer)."""
    with autocast(x.device, amp):
        loss = parts.diffusion.p_losses(parts.step_model, x, t, noise)
    parts.optimizer.zero_grad(set_to_none=True)
    (loss * loss_scale).backward()
    parts.optimizer.step()
    return loss


@torch.no_grad()
def t_prime_sweep(diffusion, model, x0, t_primes, seed):
    """Noise x0 to each t' with q_sample, then run the reverse process from t' down to 0.

    All t' share one pass over i = max(t') ... 0: at step i only the images whose t' >= i are updated, so the
    cost is sum(t') images, in batches, rather than len(t') separate chains. Returns (noised, restored), each
    (len(t_primes), B, C, H, W).
    """
    model.eval()
    k, b = len(t_primes), len(x0)
    devices = [torch.cuda.current_device()] if x0.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        start = torch.tensor(t_primes, device=x0.device).repeat_interleave(b)           # (k*B,)
        noised = diffusion.q_sample(x0.repeat(k, 1, 1, 1), start)                        # (k*B, C, H, W)
        x = noised.clone()
        for i in tqdm(reversed(range(max(t_primes) + 1)), total=max(t_primes) + 1, desc="t' sweep", leave=False):
            active = torch.nonzero(start >= i).flatten()
            for rows in active.split(SWEEP_BATCH.get(x.device.type, 64)):
                t = torch.full((len(rows),), i, device=x.device, dtype=torch.long)
                x[rows] = diffusion.p_sample(model, x[rows], t, i)
    return noised.view(k, b, *x0.shape[1:]), x.view(k, b, *x0.shape[1:])


def choose_t_star(t_primes, values, chance, start=None):
    """(t*, threshold): the first t' whose value (the restorations' digit accuracy, or their PSNR) is below the
    midpoint of `start` (the clean images' accuracy; by default the value at the smallest t') and `chance` (the
    value of unrelated images); the last t' when none is."""
    threshold = ((values[0] if start is None else start) + chance) / 2
    for t_prime, value in zip(t_primes, values):
        if value < threshold:
            return t_prime, threshold
    return t_primes[-1], threshold


def make_ema(model, decay, state=None):
    """The EMA of the weights that samples (Ho et al. 2020), or None for decay 0. It starts as a copy of the
    weights; `state` (a checkpoint's) is loaded when given: a checkpoint without one resumes with that copy."""
    if decay <= 0:
        return None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    if state is not None:
        ema.load_state_dict(state)
    return ema


@dataclass
class Study:
    """Everything one DDPM run holds between its steps: the flags, the run folder, the model and its EMA, the data
    (uint8 on the device) and the quality references. `samples` is the latest sampled batch."""
    args: argparse.Namespace
    run: TrainingRun
    parts: Parts
    ema: AveragedModel
    amp: bool
    train_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor        # labels 0-9 of test_x (CPU): the 2.2c sweep asks the digit classifier about them
    reference: torch.Tensor     # float test images in [-1, 1] the digit FD compares samples against
    digit_net: tuple = None     # (net, info) on rank 0; None elsewhere
    vae: tuple = None           # (model, epoch) of --compare-vae
    samples: torch.Tensor = None

    @property
    def sample_model(self):
        return self.ema.module if self.ema is not None else self.parts.model

    @property
    def sampler(self):
        """The figures' sampler, in words."""
        a = self.args
        name = f'DDIM, {a.sample_steps} steps' if a.sampler == 'ddim' else f'DDPM, T={a.timesteps} steps'
        return name + (', x0 clipped to [-1, 1]' if a.clip_denoised else '')


@torch.no_grad()
def draw_samples(study, n, seed, sampler=None, steps=None, *, clip=None):
    """n samples from pure noise with a fixed seed (the global RNG is left as it was), and the seconds it took.

    sampler 'ddpm': the ancestral chain over all T steps; 'ddim': DDIM (eta=0) over `steps` of them (default: the
    run's --sampler and --sample-steps); x_0 clipped at every step when `clip` (default: --clip-denoised)."""
    args, model, diffusion = study.args, study.sample_model, study.parts.diffusion
    sampler, steps = sampler or args.sampler, steps or args.sample_steps
    clip = args.clip_denoised if clip is None else clip
    model.eval()
    devices = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else []
    shape = (n, ddpm_solution.input_channels, ddpm_solution.image_size, ddpm_solution.image_size)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        if sampler == 'ddim':
            x = diffusion.ddim_sample(model, shape, steps=steps, progress=True, clip_denoised=clip)
        else:
            x = diffusion.sample(model, shape, progress=True, clip_denoised=clip)
        if x.is_cuda:
            torch.cuda.synchronize()
    return x, time.perf_counter() - t0


def load_data(args, ranks):
    """The SVHN images as uint8 tensors, checked against every flag that needs images, before any writing."""
    train_x, _ = load_split('svhn', args.data_dir, 'train', not args.no_download, args.limit_train)
    test_x, test_y = load_split('svhn', args.data_dir, 'test', not args.no_download, args.limit_test)
    if args.batch_size > len(train_x):
        raise UserError(f'--batch-size {args.batch_size} is larger than the {len(train_x)} training images')
    check_batch(ranks, args.batch_size)
    if len(test_x) < 2 * SWEEP_GRID:
        raise UserError(f'the 2.2c sweep needs at least {2 * SWEEP_GRID} test images, got {len(test_x)}')
    if args.inception_fid:   # fail now, not after hours of training, when torch-fidelity or the weights are missing
        few = to_unit_range(test_x[:4])
        inception_fd(few[:2], few[2:])
    return train_x, test_x, test_y


def setup_study(args, command, ranks):
    """Data first, and the quality measure's classifier (a problem with either fails in seconds), then the run
    folder, the model, its optimizer and EMA, restored from the checkpoint under --resume."""
    device = ranks.device
    seed_everything(args.seed)
    vae = load_vae(args.compare_vae, device) if args.compare_vae else None   # fail early on a bad folder
    train_x, test_x, test_y = load_data(args, ranks)
    digit_net = load_or_train(args.data_dir, device, not args.no_download) if ranks.is_main else None
    model_config = dict(dim=DIM, channels=ddpm_solution.input_channels, dim_mults=list(DIM_MULTS))
    diffusion_config = dict(timesteps=args.timesteps, beta_start=ddpm_solution.beta_start,
                            beta_end=ddpm_solution.beta_end)
    config = make_config(args, 'ddpm', {**model_config, **diffusion_config}, device, command,
                         constants=dict(sweep_grid=SWEEP_GRID, quality_reference=QUALITY_REFERENCE))
    run = TrainingRun(ranks, args, config, RESUMABLE)
    parts = build(model_config, diffusion_config, args.lr, device, ranks, args.compile)
    state = run.resume(parts.model, parts.optimizer, figures={'2.2b': []}, sample_seconds=None, ema=None)
    ema = make_ema(parts.model, args.ema_decay, state['ema'])
    state['ema'] = ema.state_dict if ema is not None else None   # called at each save
    print(f'U-Net: {sum(p.numel() for p in parts.model.parameters()):,} parameters; T={args.timesteps}; '
          f'{len(train_x)} train / {len(test_x)} test images on {device}')
    train_x, test_x = train_x.to(device), test_x.to(device)   # whole dataset on the device as uint8
    return Study(args, run, parts, ema, use_amp(args.amp, device), train_x, test_x, test_y,
                 reference=to_unit_range(test_x[:QUALITY_REFERENCE]), digit_net=digit_net, vae=vae)


def train(args, command, ranks):
    # ---- setup, data, model, optimizer: under torchrun every rank seeds alike and draws the same global batches
    study = setup_study(args, command, ranks)
    run, parts, ema, device = study.run, study.parts, study.ema, ranks.device

    # ---- training loop
    for epoch in run.epochs():
        parts.model.train()
        loop = run.epoch_loop(epoch, len(study.train_x), num_sums=1)
        for idx in loop:
            x = to_unit_range(study.train_x[idx])                 # (B, 3, 32, 32) in [-1, 1]
            # t and the noise are drawn for the whole global batch; this rank keeps its rows (studylib.trainer)
            t = parts.diffusion.t_sample(loop.global_batch, device)[loop.part]            # (B,) in {0..T-1}
            noise = torch.randn((loop.global_batch, *x.shape[1:]), device=device)[loop.part]
            loss = train_step(parts, x, t, noise, study.amp, loop.loss_scale)
            if ema is not None:
                ema.update_parameters(parts.model)
            loop.record(loss, loss.detach().view(1) * len(idx))
        loss_sum, seconds = loop.finish()
        with loop.end_of_epoch():   # a signal here keeps the epoch's training (exit 130)
            if ranks.is_main:       # rank 0 alone samples, writes the log, the figures and the checkpoint
                end_of_epoch(study, epoch, float(loss_sum) / loop.images, seconds)
    if not ranks.is_main:
        return None
    return final_stage(study)


def end_of_epoch(study, epoch, train_loss, seconds):
    """The epoch's log row and checkpoint; every --sample-every epochs (and the last) also a batch of samples, its
    figure and its digit FD, so that quality can be read against training minutes."""
    args, run = study.args, study.run
    row, figures = dict(epoch=epoch, train_loss=train_loss, seconds=seconds), []
    if epoch % args.sample_every == 0 or epoch == args.epochs:
        study.samples, row['sample_seconds'] = draw_samples(study, args.num_samples, args.seed)
        run.state['sample_seconds'] = row['sample_seconds']
        row['digit_fd'] = digit_quality(study.digit_net[0], study.samples, study.reference)['digit_fd']
        figures = [save_image_grid(
            study.samples, run.folder.file(f'2.2b_samples_epoch{epoch:03d}.png'),
            f'Samples after epoch {epoch} ({study.sampler}, same seed every time'
            + (f', EMA {args.ema_decay} weights)' if study.ema is not None else ')'))]
        run.state['figures']['2.2b'] += figures
    run.log(row, figures)
    tqdm.write(f'epoch {epoch}: loss {train_loss:.4f}, {seconds:.1f} s'
               + (f', sampling {row["sample_seconds"]:.1f} s, digit FD {row["digit_fd"]:.1f}'
                  if 'digit_fd' in row else ''))
    run.save(epoch)


@dataclass
class Quality:
    """studylib.digit_net's scores of the DDPM's samples, of as many training images (the calibration) and, with
    --compare-vae, of the VAE's samples, each against the same test images."""
    ddpm: dict
    reference: dict
    vae: dict = None
    vae_samples: torch.Tensor = None
    vae_epoch: int = None

    def metrics(self):
        """Flat summary.json keys: digit_fd, reference_digit_fd, vae_digit_fd, ..."""
        groups = [('', self.ddpm), ('reference_', self.reference)] + ([('vae_', self.vae)] if self.vae else [])
        return {prefix + k: v for prefix, scores in groups for k, v in scores.items()}


def quality_line(scores):
    kid = f', KID {scores["digit_kid"]:.4f} (subsets: +-{scores["digit_kid_std"]:.4f})' if 'digit_kid' in scores else ''
    return f'digit FD {scores["digit_fd"]:.1f}{kid}, confidence {scores["digit_confidence"]:.2f}'


def save_final_samples(study, samples, epoch, quality):
    """2.2d: the final DDPM samples, beside the VAE's when a VAE is given, each titled with its measured quality."""
    folder, sampler, n_reference = study.run.folder, study.sampler, len(study.reference)
    n, q = len(samples), study.args.quality_samples
    calibration = (f'scored on {q} images each against {n_reference} test images (DigitNet features; lower is '
                   f'better); {q} training images score {quality_line(quality.reference)}.')
    if quality.vae is None:
        return save_image_grid(samples, folder.file('2.2d_final_samples.png'),
                               f'{n} of {q} DDPM samples after {epoch} epochs ({sampler})\n'
                               f'{quality_line(quality.ddpm)}\n{calibration}')
    plt = pyplot()
    nrow = math.ceil(math.sqrt(n))
    fig, axes = plt.subplots(1, 2, figsize=(11, 6.8))
    for ax, images, name, scores in [
            (axes[0], samples, f'DDPM, epoch {epoch} ({sampler})', quality.ddpm),
            (axes[1], quality.vae_samples[:n], f'VAE, epoch {quality.vae_epoch} (decoder mean)', quality.vae)]:
        ax.imshow(grid_array(images, nrow), interpolation='nearest')
        ax.set_title(f'{name}\n{quality_line(scores)}', fontsize=10)
        ax.axis('off')
    fig.suptitle(f'{n} of the {q} scored samples of each model, trained on the same SVHN images', fontsize=11)
    fig.text(0.5, 0.02, calibration, ha='center', fontsize=8.5)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))   # room for the suptitle above the panel titles
    path = folder.file('2.2d_ddpm_vs_vae.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class Sweep:
    """The 2.2c result: t* (the digit classifier's rule), the accuracies it is chosen from, and the PSNR rule's t*
    beside it (accuracies in %, PSNRs in dB, means over `images` test images)."""
    t_primes: list
    images: int
    t_star: int
    threshold: float
    clean_accuracy: float
    chance_accuracy: float
    restored_accuracy: list
    noised_accuracy: list
    t_star_psnr: int
    threshold_psnr: float
    chance_psnr: float
    restored_psnr: list
    noised_psnr: list

    def metrics(self):
        return dict(t_star=self.t_star, t_star_threshold=self.threshold, sweep_images=self.images,
                    clean_digit_accuracy=self.clean_accuracy, chance_digit_accuracy=self.chance_accuracy,
                    restored_digit_accuracy=self.restored_accuracy, noised_digit_accuracy=self.noised_accuracy,
                    t_star_psnr=self.t_star_psnr, t_star_threshold_psnr=self.threshold_psnr,
                    chance_psnr=self.chance_psnr, t_primes=self.t_primes, restored_psnr=self.restored_psnr,
                    noised_psnr=self.noised_psnr)


def restoration_sweep(study, epoch):
    """2.2c: test images noised to each t' and restored from t'; t* where the restorations have lost the digit half
    way (choose_t_star on the digit classifier's accuracy), the PSNR rule beside it. Returns the Sweep and its two
    figures."""
    args, net = study.args, study.digit_net[0]
    n = min(args.sweep_images, len(study.test_x))
    x0, labels = to_unit_range(study.test_x[:n]), study.test_y[:n]                  # labels on the CPU
    noised, restored = t_prime_sweep(study.parts.diffusion, study.sample_model, x0, args.t_primes, args.seed)
    unrelated = x0.roll(1, 0)   # each image's label against another test image
    clean, chance = accuracy(net, x0, labels), accuracy(net, unrelated, labels)
    restored_accuracy = [accuracy(net, r.clamp(-1, 1), labels) for r in restored]
    restored_psnr, chance_psnr = [float(psnr(r, x0).mean()) for r in restored], float(psnr(x0, unrelated).mean())
    t_star, threshold = choose_t_star(args.t_primes, restored_accuracy, chance, start=clean)
    t_star_psnr, threshold_psnr = choose_t_star(args.t_primes, restored_psnr, chance_psnr)
    sweep = Sweep(args.t_primes, n, t_star, threshold, clean, chance, restored_accuracy,
                  [accuracy(net, v.clamp(-1, 1), labels) for v in noised], t_star_psnr, threshold_psnr, chance_psnr,
                  restored_psnr, [float(psnr(v, x0).mean()) for v in noised])
    title = f'T={args.timesteps}, epoch {epoch}'
    grid = min(SWEEP_GRID, n)
    return sweep, [save_sweep_grid(study.run.folder, x0[:grid], noised[:, :grid], restored[:, :grid], sweep, title),
                   save_sweep_curve(study.run.folder, sweep, title)]


def save_sweep_grid(folder, x0, noised, restored, sweep, title):
    """2.2c's image grid: the originals, then the noised and restored images per t'."""
    rows = [x0] + [r for pair in zip(noised, restored) for r in pair]
    labels = ['original'] + [lab for tp in sweep.t_primes
                             for lab in (f"noised to t'={tp}", 'restored' + ('  <- t*' if tp == sweep.t_star else ''))]
    return save_image_grid(torch.cat(rows), folder.file('2.2c_tprime_sweep.png'),
                           f"Test images noised to t' with q_sample and restored by the reverse process from t' "
                           f"({title}); t*={sweep.t_star}", nrow=len(x0), row_labels=labels)


def save_sweep_curve(folder, sweep, title):
    """2.2c's curves, full width: the share of restorations read as the original digit (t* from it) and their
    PSNR (with that rule's t*), each with its chance level and threshold."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    left.plot(sweep.t_primes, sweep.restored_accuracy, marker='o', label='restored: read as the original digit')
    left.plot(sweep.t_primes, sweep.noised_accuracy, marker='s', linestyle=':', label="noised x_t': the same")
    left.axhline(sweep.clean_accuracy, color='tab:green', linestyle='--', linewidth=1,
                 label=f'clean images ({sweep.clean_accuracy:.1f}%)')
    left.axhline(sweep.chance_accuracy, color='gray', linestyle='--',
                 label=f'unrelated images ({sweep.chance_accuracy:.1f}%)')
    left.axhline(sweep.threshold, color='tab:red', linestyle=':', linewidth=1,
                 label=f'midpoint ({sweep.threshold:.1f}%)')
    left.axvline(sweep.t_star, color='tab:red', label=f't* = {sweep.t_star}')
    left.set_ylabel(f'digit classifier: original label kept (%, {sweep.images} images)')
    left.set_title("t*: the digit is lost half way", fontsize=10)
    right.plot(sweep.t_primes, sweep.restored_psnr, marker='o', label='restored vs original')
    right.plot(sweep.t_primes, sweep.noised_psnr, marker='s', linestyle=':', label="noised x_t' vs original")
    right.axhline(sweep.chance_psnr, color='gray', linestyle='--',
                  label=f'unrelated pairs ({sweep.chance_psnr:.1f} dB)')
    right.axhline(sweep.threshold_psnr, color='tab:red', linestyle=':', linewidth=1,
                  label=f'midpoint ({sweep.threshold_psnr:.1f} dB)')
    right.axvline(sweep.t_star_psnr, color='tab:red', linestyle='-.', label=f'PSNR rule: t = {sweep.t_star_psnr}')
    right.set_ylabel(f'PSNR to the original (dB), mean of {sweep.images} images')
    right.set_title('the same restorations by PSNR', fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("t' (0-based diffusion step the images are noised to)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    fig.suptitle(f"2.2c: restoration from t' by the reverse process ({title})", fontsize=11)
    fig.tight_layout()
    curve = folder.file('2.2c_tprime_psnr.png')
    fig.savefig(curve, dpi=110)
    plt.close(fig)
    return curve


def draw_many(study, n, seed, first=None):
    """n samples in batches of --num-samples: `first` (the figure's batch, drawn with `seed`) and then batch k with
    seed + 10,000 k, so that no batch repeats another's noise (a second draw starts from seed + 1)."""
    batches = [first] if first is not None else []
    while sum(len(b) for b in batches) < n:
        k = len(batches)
        batches.append(draw_samples(study, min(study.args.num_samples, n - k * study.args.num_samples),
                                    seed + 10_000 * k)[0])
    return torch.cat(batches)[:n]


def sample_quality(study, samples):
    """The digit measure (FD and KID) of --quality-samples DDPM samples (the figure's batch first), of as many
    training images and (with --compare-vae) of as many VAE samples. Each also scores a second draw of as many
    images (*_redraw: the next seed, the next training images), so that a difference between rows can be set
    against the spread between two draws of one row."""
    args, net, reference, train_x = study.args, study.digit_net[0], study.reference, study.train_x
    n = args.quality_samples
    samples, redraw = draw_many(study, n, args.seed, first=samples), draw_many(study, n, args.seed + 1)
    quality = Quality(ddpm=digit_quality(net, samples, reference),
                      reference=digit_quality(net, to_unit_range(train_x[:n]), reference))
    second = digit_quality(net, redraw, reference)
    quality.ddpm.update(digit_fd_redraw=second['digit_fd'], digit_kid_redraw=second['digit_kid'])
    if len(train_x) >= 2 * n:
        second = digit_quality(net, to_unit_range(train_x[n:2 * n]), reference)
        quality.reference.update(digit_fd_redraw=second['digit_fd'], digit_kid_redraw=second['digit_kid'])
    if study.vae is not None:
        vae, quality.vae_epoch = study.vae
        torch.manual_seed(args.seed)
        quality.vae_samples = vae.sample(n)
        quality.vae = digit_quality(net, quality.vae_samples, reference)
        torch.manual_seed(args.seed + 1)
        second = digit_quality(net, vae.sample(n), reference)
        quality.vae.update(digit_fd_redraw=second['digit_fd'], digit_kid_redraw=second['digit_kid'])
    if args.inception_fid:
        quality.ddpm['inception_fd'] = inception_fd(samples, reference, device=samples.device)
    return quality


def compare_samplers(study, samples, sample_seconds):
    """DDPM-T, DDIM-50 and DDIM-100 on the same noise seed and number of images: {name: seconds and quality}."""
    args = study.args
    samplers = {}
    for name, steps in [('ddpm', args.timesteps), ('ddim', 50), ('ddim', 100)]:
        if name == 'ddim' and steps >= args.timesteps:
            continue
        if name == args.sampler and steps == (args.timesteps if name == 'ddpm' else args.sample_steps):
            images, seconds = samples, sample_seconds   # the figure's own samples
        else:
            images, seconds = draw_samples(study, args.num_samples, args.seed, name, steps)
        samplers[f'{name}_{steps}'] = dict(seconds=seconds, **digit_quality(study.digit_net[0], images,
                                                                            study.reference))
    return samplers


def template_sampler(study, samples, epoch):
    """2.2d beside the run's sampler: the same noise seed through the template's sampler, p_sample_loop (the exact
    T-step chain, x_0 never clipped; DiffusionSchedule.sample computes the same chain keeping only x_t). Returns
    the figure and the template's samples' seconds and quality (None, {} when the run samples that way)."""
    args = study.args
    if args.sampler == 'ddpm' and not args.clip_denoised:
        return None, {}
    chain, seconds = draw_samples(study, len(samples), args.seed, 'ddpm', clip=False)
    scores = {name: digit_quality(study.digit_net[0], images, study.reference)
              for name, images in (('run', samples), ('template', chain))}
    plt = pyplot()
    nrow = math.ceil(math.sqrt(len(samples)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 6.6))
    for ax, images, name in [(axes[0], samples, f'this run\'s sampler: {study.sampler}'),
                             (axes[1], chain, f'the template\'s p_sample_loop: DDPM, T={args.timesteps}, unclipped')]:
        ax.imshow(grid_array(images, nrow), interpolation='nearest')
        ax.set_title(f'{name}\n{quality_line(scores["run" if ax is axes[0] else "template"])}', fontsize=9.5)
        ax.axis('off')
    fig.suptitle(f'{len(samples)} samples after {epoch} epoch{"s" * (epoch != 1)} from the same noise seed, two '
                 f'samplers', fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = study.run.folder.file('2.2d_template_sampler.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, dict(seconds=seconds, **scores['template'])


def final_stage(study):
    """2.2a, 2.2c, 2.2d, the sample quality and the samplers' comparison (rank 0 alone): summary.json."""
    args, run = study.args, study.run
    rows = run.folder.read_metrics()
    epoch = rows[-1]['epoch']
    figures, samples, sample_seconds = run.state['figures'], study.samples, run.state['sample_seconds']
    if samples is None:   # resumed after the last epoch: its samples were not kept
        samples, sample_seconds = draw_samples(study, args.num_samples, args.seed)
    figures['2.2a'] = [save_time_figure(
        [r['epoch'] for r in rows], [r['seconds'] for r in rows], run.folder.file('2.2a_training_time.png'),
        f'DDPM training wall-clock time on {run.config["device_name"]} ({len(study.train_x)} SVHN images per epoch)',
        note=f'sampling one batch of {args.num_samples} images ({study.sampler}): {sample_seconds:.1f} s')]
    sweep, figures['2.2c'] = restoration_sweep(study, epoch)
    run.folder.save_samples(samples)
    quality = sample_quality(study, samples)
    samplers = compare_samplers(study, samples, sample_seconds)
    figures['2.2d'] = [save_final_samples(study, samples, epoch, quality)]
    template_figure, template = template_sampler(study, samples, epoch)
    figures['2.2d'] += [template_figure] if template_figure else []
    ema = study.ema
    metrics = dict(epochs=epoch, timesteps=args.timesteps, num_train=len(study.train_x), num_test=len(study.test_x),
                   final_train_loss=rows[-1]['train_loss'], **time_metrics(rows),
                   sample_seconds=sample_seconds, sample_batch=args.num_samples,
                   **sweep.metrics(),
                   **quality.metrics(), quality_samples=args.quality_samples, quality_reference=len(study.reference),
                   digit_net_test_accuracy=study.digit_net[1]['test_accuracy'], samplers=samplers,
                   template_sampler=template,
                   sampler=study.sampler, clip_denoised=args.clip_denoised, ema_decay=args.ema_decay,
                   ema_updates=int(ema.n_averaged) if ema is not None else 0, device=run.config['device_name'])
    run.write_summary('ddpm', figures, metrics)
    return metrics


def main(argv=None):
    return run_main('train_ddpm.py', parse_args, train, argv)


if __name__ == '__main__':
    main()
