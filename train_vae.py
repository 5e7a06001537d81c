"""Train the Problem 1 VAE on SVHN and write every Problem 1 figure and number into one run folder.

    python train_vae.py                              # the assignment: 30 epochs, Adam 1e-4, batch 64, z_dim 32
    python train_vae.py --epochs 2 --limit-train 512 --limit-test 256 --out-dir runs/vae-smoke

Figures (question ids of the seed): 1.3a training time, 1.3b prior samples during training, 1.3c reconstructions
during training, 1.3d final samples, 1.3e per-class latent profiles, 1.3f latent interpolations. Metrics: per-epoch
rows in metrics.jsonl; summary.json holds the final ones, among them the importance-sampled test log-likelihood.
"""
import argparse
import json
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

import vae_solution
from studylib import UserError
from studylib.data import batch_indices, first_per_class, load_split, to_unit_range
from studylib.plots import pyplot, save_image_grid, save_time_figure
from studylib.run import (RESUMABLE_COMMON, make_config, make_parser, parse_with_recipe, positive_int,
                          seed_everything, time_metrics)
from studylib.trainer import (TrainingRun, autocast, check_batch, optimizer_kwargs, prepare_model, run_main,
                              sync_batchnorm, use_amp, wrap)

# ---- hyperparameters: the assignment's. Each is the default of the flag of the same name ----------------------------
DEFAULTS = dict(
    epochs=30,                                   # passes over the training set
    batch_size=vae_solution.train_batch_size,    # images per optimizer step (64)
    lr=vae_solution.lr,                          # Adam step size (1e-4); Adam's betas and eps are torch's defaults
    z_dim=vae_solution.z_dim,                    # latent dimensions (32)
    sample_every=5,                              # epochs between the 1.3b / 1.3c progress figures
    ll_k=100,                                    # importance samples per test image for log p(x)
    profile_per_class=100,                       # training images per digit averaged in the 1.3e latent profile
)
FEATURES = 32          # encoder and decoder base channels (the template's nef = ndf = 32)
FIGURE_Z = 64          # fixed prior draws decoded in every 1.3b grid
EVAL_BATCH = 500       # images per evaluation batch (memory only, not results)
ACTIVE_UNIT = 0.01     # a latent unit is active when its posterior mean varies more than this over the data
# what a --resume may change besides the common flags: what the final stage measures, not what trains
RESUMABLE = RESUMABLE_COMMON | {'sample_every', 'll_k', 'profile_per_class'}
NUM_PIXELS = 3 * 32 * 32


def parse_args(argv=None):
    parser = make_parser(__doc__.split('\n')[0], out_dir='runs/vae')
    vae = parser.add_argument_group('VAE study')
    vae.add_argument('--z-dim', type=positive_int, help='latent dimensions')
    vae.add_argument('--sample-every', type=positive_int,
                     help='save the 1.3b samples and 1.3c reconstructions every N epochs (and after the last)')
    vae.add_argument('--ll-k', type=positive_int,
                     help='importance samples per test image for the final log-likelihood (1.3 metrics)')
    vae.add_argument('--profile-per-class', type=positive_int,
                     help='training images per digit averaged in the 1.3e latent profile')
    return parse_with_recipe(parser, argv, DEFAULTS)


def bits_per_dim(log_likelihood_nats):
    """Nats per image of a density on [-1, 1]^D -> bits per dimension of the 8-bit images it models.

    A pixel value p in {0..255} is stored as x = p/127.5 - 1, so each discrete level owns a bin of width
    2/255 in x; P(pixel level) ~= p(x) * 2/255 per dimension, hence bpd = (-log p(x)/D + log 127.5) / log 2.
    """
    return (-log_likelihood_nats / NUM_PIXELS + math.log(127.5)) / math.log(2)


@torch.no_grad()
def evaluate_elbo(model, images):
    """Mean -log p(x|z) and KL over `images` (uint8 on the model's device), one z draw per image."""
    model.eval()
    nll_sum = kl_sum = 0.0
    for idx in batch_indices(len(images), EVAL_BATCH, shuffle=False, device=images.device):
        _, nll, kl = model(to_unit_range(images[idx]))
        nll_sum += nll.sum()
        kl_sum += kl.sum()
    return float(nll_sum) / len(images), float(kl_sum) / len(images)


@torch.no_grad()
def test_log_likelihood(model, images, K):
    """Mean importance-sampled log p(x) (nats per image) over `images`."""
    model.eval()
    total = 0.0
    batches = batch_indices(len(images), EVAL_BATCH, shuffle=False, device=images.device)
    for idx in tqdm(batches, desc=f'test log-likelihood, K={K}', leave=False):
        total += model.log_likelihood(to_unit_range(images[idx]), K=K).sum()
    return float(total) / len(images)


@torch.no_grad()
def save_progress_figures(model, folder, epoch, fixed_z, fixed_x):
    """1.3b (decoded fixed prior draws) and 1.3c (fixed test images above their reconstructions)."""
    model.eval()
    samples = model.decode(fixed_z).mode()                                    # (64, 3, 32, 32)
    x = to_unit_range(fixed_x)                                                # (24, 3, 32, 32)
    recon = model.decode(model.encode(x).mode()).mode()
    rows = torch.cat([torch.stack([x[i:i + 8], recon[i:i + 8]]) for i in range(0, len(x), 8)])  # orig/recon rows
    b = save_image_grid(samples, folder.file(f'1.3b_samples_epoch{epoch:03d}.png'),
                        f'Samples from 64 fixed prior draws z ~ N(0,I), epoch {epoch}')
    c = save_image_grid(rows.flatten(0, 1), folder.file(f'1.3c_reconstructions_epoch{epoch:03d}.png'),
                        f'Test images and their reconstructions (decoder mean at the posterior mean), epoch {epoch}',
                        row_labels=['original', 'reconstruction'] * (len(x) // 8))
    return b, c


def spike_bars(ax, values, limit):
    """One bar per latent dimension of `values` (z,), the 3 largest |value| red and numbered, y in [-limit, limit];
    returns those 3 as [[dimension, value], ...]."""
    spikes = values.abs().argsort(descending=True)[:3].tolist()
    ax.bar(range(len(values)), values.numpy(),
           color=['tab:red' if d in spikes else 'tab:blue' for d in range(len(values))])
    for d in spikes:
        ax.annotate(str(d), (d, float(values[d])), ha='center', fontsize=7, va='bottom' if values[d] >= 0 else 'top')
    ax.axhline(0, color='black', linewidth=0.5)
    ax.set_ylim(-limit, limit)
    return [[d, round(float(values[d]), 4)] for d in spikes]


@torch.no_grad()
def save_latent_profiles(model, images, labels, per_class, folder, epoch):
    """1.3e: mean posterior mean of `per_class` training images of each digit, one bar plot per digit."""
    plt = pyplot()
    model.eval()
    idx = first_per_class(labels.cpu(), per_class).to(images.device)
    mu = torch.cat([model.encode(to_unit_range(images[idx[b]])).mean
                    for b in batch_indices(len(idx), EVAL_BATCH, shuffle=False)])   # (10*per_class, z)
    profile = mu.view(10, per_class, -1).mean(1).cpu()                         # (10, z)
    limit = 1.1 * float(profile.abs().max())
    fig, axes = plt.subplots(2, 5, figsize=(15, 5.6), sharey=True)
    top = {}
    for digit, ax in enumerate(axes.flat):
        top[digit] = spike_bars(ax, profile[digit], limit)
        ax.set_title(f'digit {digit}', fontsize=10)
        ax.set_xlabel('latent dimension')
    for ax in axes[:, 0]:
        ax.set_ylabel('mean of posterior means')
    fig.suptitle(f'Latent profile per digit: average posterior mean of {per_class} training images each, '
                 f'epoch {epoch} (red, numbered: the 3 largest |mean| dimensions)', fontsize=11)
    fig.tight_layout()
    path = folder.file('1.3e_latent_profiles.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    with open(folder.file('1.3e_latent_profiles.json'), 'w') as f:
        json.dump({'per_class': per_class, 'profile': profile.tolist(), 'top_dims': top}, f, indent=1)
    return path, profile


@torch.no_grad()
def posterior_mean_variance(model, images):
    """Per latent dimension, the variance over `images` of the posterior mean E_q[z|x]: a unit is active when it
    exceeds ACTIVE_UNIT (Burda et al. 2016, Sec. 5.2), i.e. when the encoder uses it to tell images apart."""
    model.eval()
    mu = torch.cat([model.encode(to_unit_range(images[b])).mean
                    for b in batch_indices(len(images), EVAL_BATCH, shuffle=False, device=images.device)])
    return mu.var(0).cpu()                                                      # (z,)


def save_class_minus_mean(profile, variance, folder, epoch, *, n_images):
    """1.3e, the offset removed: the mean over the ten digits of their profiles (what every digit shares), each
    digit's profile minus it (what tells the digit apart) with its 3 largest dimensions, and the active units.
    Returns (figure path, the latent metrics of summary.json: active_units, the offset's largest dimension and
    value, and each digit's largest class-specific dimension and value)."""
    plt = pyplot()
    offset = profile.mean(0)                                                    # (z,)
    specific = profile - offset                                                 # (10, z)
    z_dim = profile.shape[1]
    active = [d for d in range(z_dim) if variance[d] > ACTIVE_UNIT]
    fig = plt.figure(figsize=(15, 8.2))
    grid = fig.add_gridspec(3, 5)
    top_axes = fig.add_subplot(grid[0, :2]), fig.add_subplot(grid[0, 2:])
    top_axes[0].bar(range(z_dim), offset.numpy(), color='tab:gray')
    top_axes[0].set_title('offset: the mean of the ten digit profiles', fontsize=10)
    top_axes[0].set_ylabel('mean of posterior means', fontsize=8)
    top_axes[1].bar(range(z_dim), variance.numpy(), color=['tab:green' if d in active else 'tab:gray'
                                                           for d in range(z_dim)])
    top_axes[1].axhline(ACTIVE_UNIT, color='black', linestyle='--', linewidth=0.8)
    top_axes[1].set_yscale('log')
    top_axes[1].set_title(f'{len(active)} of {z_dim} units active (green): variance of the posterior mean over the '
                          f'{n_images:,} training images > {ACTIVE_UNIT}', fontsize=10)
    top_axes[1].set_ylabel('variance (log scale)', fontsize=8)
    limit = 1.1 * float(specific.abs().max())
    marks = {}
    for digit in range(10):
        ax = fig.add_subplot(grid[1 + digit // 5, digit % 5])
        marks[digit] = spike_bars(ax, specific[digit], limit)
        ax.set_title(f'digit {digit} minus the offset', fontsize=9)
        if digit % 5 == 0:
            ax.set_ylabel('difference', fontsize=8)
    for ax in (*top_axes, *fig.axes[2:]):
        ax.set_xlabel('latent dimension', fontsize=8)
    fig.suptitle(f'Latent profiles with the shared offset removed, epoch {epoch} (red, numbered: each digit\'s 3 '
                 f'largest |difference|)', fontsize=11)
    fig.tight_layout()
    path = folder.file('1.3e_class_minus_mean.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    with open(folder.file('1.3e_class_minus_mean.json'), 'w') as f:
        json.dump({'offset': offset.tolist(), 'top_dims': marks, 'posterior_mean_variance': variance.tolist(),
                   'active_units': active}, f, indent=1)
    offset_dim = int(offset.abs().argmax())
    top = specific.abs().argmax(1)                                              # (10,)
    return path, dict(active_units=len(active), offset_dim=offset_dim, offset_value=float(offset[offset_dim]),
                      class_top_dim=top.tolist(), class_top_value=specific.gather(1, top[:, None])[:, 0].tolist())


@torch.no_grad()
def save_interpolations(study, epoch, n_points=10):
    """1.3f: rows decoding n_points from z_1 to z_2, for pairs of test posterior means and pairs of prior draws."""
    model, test_images, test_labels, folder = study.model, study.test_x, study.test_y, study.run.folder
    model.eval()
    pairs = [(0, 4), (1, 5), (2, 6), (3, 7)]
    mu = model.encode(to_unit_range(test_images[:8])).mean                        # (8, z)
    rows, labels = [], []
    for a, b in pairs:
        rows.append(vae_solution.interpolate(model, mu[a:a + 1], mu[b:b + 1], n_points))
        labels.append(f'test {int(test_labels[a])} -> {int(test_labels[b])}')
    z = torch.randn(8, model.z_dim, generator=study.figure_rng).to(mu.device)
    for i in range(4):
        rows.append(vae_solution.interpolate(model, z[2 * i:2 * i + 1], z[2 * i + 1:2 * i + 2], n_points))
        labels.append(f'prior pair {i + 1}')
    return save_image_grid(torch.cat(rows), folder.file('1.3f_interpolations.png'),
                           f'Decoded linear interpolations z_1 -> z_2 ({n_points} points, ends included), '
                           f'epoch {epoch}', nrow=n_points, row_labels=labels)


class ReparamStep(nn.Module):
    """VAE.forward's loss terms with the reparameterisation noise passed in: (nll (B,), kl (B,)) for x and
    eps ~ N(0, I) of shape (B, z_dim). Under torchrun each rank passes its rows of one global draw (studylib.trainer);
    in one process the draw is the very one VAE.forward would make (tests/test_train_vae.py)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, eps):
        posterior = self.vae.encode(x)
        z = posterior.mean + posterior.std * eps                          # (B, z_dim)
        return self.vae.decode(z).nll(x), posterior.kl()


def build(model_config, lr, device, ranks=None, compile_model=False):
    """The VAE, the module its training step calls (laid out, data-parallel under torchrun, compiled when asked)
    and its Adam: (model, step_model, optimizer). bench.py times the same."""
    model = vae_solution.VAE(**model_config, device=device).to(device)
    sync_batchnorm(model, ranks)   # the encoder's batch norm sees the global batch under torchrun
    step_model = prepare_model(ReparamStep(model), device, compile_model, wrap=lambda m: wrap(m, ranks))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, **optimizer_kwargs(device))
    return model, step_model, optimizer


def train_step(step_model, optimizer, x, eps, amp, loss_scale=1.0):
    """One optimizer step on the negative ELBO, (nll + kl).mean(), with the reparameterisation noise eps given:
    (loss, nll (B,), kl (B,)). loss_scale weights this rank's share of the global batch (studylib.trainer)."""
    with autocast(x.device, amp):
        nll, kl = step_model(x, eps)                                    # (B,), (B,)
        loss = (nll + kl).mean()
    optimizer.zero_grad(set_to_none=True)
    (loss * loss_scale).backward()
    optimizer.step()
    return loss, nll, kl


def load_data(args, ranks):
    """The SVHN splits as uint8 tensors, checked against every flag that needs images, before any writing."""
    train_x, train_y = load_split('svhn', args.data_dir, 'train', not args.no_download, args.limit_train)
    test_x, test_y = load_split('svhn', args.data_dir, 'test', not args.no_download, args.limit_test)
    if args.batch_size > len(train_x):
        raise UserError(f'--batch-size {args.batch_size} is larger than the {len(train_x)} training images')
    check_batch(ranks, args.batch_size)
    if len(test_x) < 8:
        raise UserError(f'the figures need at least 8 test images, got {len(test_x)} (--limit-test)')
    first_per_class(train_y, args.profile_per_class)   # 1.3e's images exist: checked now, not after training
    return train_x, train_y, test_x, test_y


@dataclass
class Study:
    """Everything one VAE run holds between its steps: the flags, the run folder, the model and its optimizer, the
    data (uint8 on the device) and the fixed inputs of the progress figures (comparable across epochs)."""
    args: argparse.Namespace
    run: TrainingRun
    model: vae_solution.VAE
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    amp: bool
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    figure_rng: torch.Generator   # the fixed prior draws of 1.3b, then the 1.3f prior pairs
    fixed_z: torch.Tensor         # (FIGURE_Z, z_dim)
    fixed_x: torch.Tensor         # (24 or 8, 3, 32, 32) uint8 test images


def setup_study(args, command, ranks):
    """Data first (a missing file fails in seconds, before the run folder is touched), then the run folder, the
    model and its optimizer, restored from the checkpoint under --resume."""
    device = ranks.device
    seed_everything(args.seed)
    train_x, train_y, test_x, test_y = load_data(args, ranks)
    model_config = dict(in_channels=vae_solution.input_channels, encoder_features=FEATURES,
                        decoder_features=FEATURES, z_dim=args.z_dim, input_size=vae_solution.image_size)
    config = make_config(args, 'vae', model_config, device, command,
                         constants=dict(figure_z=FIGURE_Z, eval_batch=EVAL_BATCH, active_unit=ACTIVE_UNIT))
    run = TrainingRun(ranks, args, config, RESUMABLE)
    model, step_model, optimizer = build(model_config, args.lr, device, ranks, args.compile)
    run.resume(model, optimizer, figures={'1.3b': [], '1.3c': []})
    print(f'VAE: {sum(p.numel() for p in model.parameters()):,} parameters; '
          f'{len(train_x)} train / {len(test_x)} test images on {device}')
    figure_rng = torch.Generator().manual_seed(args.seed)
    fixed_z = torch.randn(FIGURE_Z, args.z_dim, generator=figure_rng).to(device)
    fixed_x = test_x[:24 if len(test_x) >= 24 else 8].to(device)
    return Study(args, run, model, step_model, optimizer, use_amp(args.amp, device), train_x.to(device), train_y,
                 test_x.to(device), test_y, figure_rng, fixed_z, fixed_x)   # whole dataset on the device as uint8


def train(args, command, ranks):
    # ---- setup, data, model, optimizer: under torchrun every rank seeds alike and draws the same global batches
    study = setup_study(args, command, ranks)
    run, device = study.run, ranks.device

    # ---- training loop
    for epoch in run.epochs():
        study.model.train()
        loop = run.epoch_loop(epoch, len(study.train_x), num_sums=3)   # loss, nll, kl summed on the device
        for idx in loop:
            x = to_unit_range(study.train_x[idx])                 # (B, 3, 32, 32) in [-1, 1]
            eps = torch.randn((loop.global_batch, args.z_dim), device=device)[loop.part]   # this rank's rows
            loss, nll, kl = train_step(study.step_model, study.optimizer, x, eps, study.amp, loop.loss_scale)
            loop.record(loss, torch.stack([loss.detach() * len(idx), nll.detach().sum(), kl.detach().sum()]))
        sums, seconds = loop.finish()
        with loop.end_of_epoch():   # a signal here keeps the epoch's training (exit 130)
            test_nll, test_kl = evaluate_elbo(study.model, study.test_x)   # every rank: the RNG streams stay alike
            if ranks.is_main:   # rank 0 alone writes the log, the figures and the checkpoint
                train_loss, train_nll, train_kl = (sums / loop.images).tolist()   # one host sync per epoch
                end_of_epoch(study, epoch, dict(train_loss=train_loss, train_nll=train_nll, train_kl=train_kl,
                                                test_nll=test_nll, test_kl=test_kl,
                                                test_neg_elbo=test_nll + test_kl, seconds=seconds))
    if not ranks.is_main:
        return None
    return final_stage(study)


def end_of_epoch(study, epoch, row):
    """The epoch's log row and checkpoint; every --sample-every epochs (and the last) the 1.3b and 1.3c figures."""
    args, run = study.args, study.run
    figures = []
    if epoch % args.sample_every == 0 or epoch == args.epochs:
        figures = save_progress_figures(study.model, run.folder, epoch, study.fixed_z, study.fixed_x)  # draws nothing
        run.state['figures']['1.3b'].append(figures[0])
        run.state['figures']['1.3c'].append(figures[1])
    run.log(dict(epoch=epoch, **row), figures)
    tqdm.write(f'epoch {epoch}: train loss {row["train_loss"]:.2f} (nll {row["train_nll"]:.2f}, kl '
               f'{row["train_kl"]:.2f}), test -ELBO {row["test_neg_elbo"]:.2f}, {row["seconds"]:.1f} s')
    run.save(epoch)


def final_stage(study):
    """1.3a, 1.3d, 1.3e, 1.3f and the test log-likelihood of the trained VAE (rank 0 alone): summary.json."""
    args, run, model = study.args, study.run, study.model
    figures = run.state['figures']
    rows = run.folder.read_metrics()
    epoch = rows[-1]['epoch']
    figures['1.3a'] = [save_time_figure([r['epoch'] for r in rows], [r['seconds'] for r in rows],
                                        run.folder.file('1.3a_training_time.png'),
                                        f'VAE training wall-clock time on {run.config["device_name"]} '
                                        f'({len(study.train_x)} SVHN images per epoch)')]
    model.eval()
    torch.manual_seed(args.seed + 1)   # not args.seed: that would redraw the fixed z of the 1.3b grids
    samples = model.sample(64)                                        # (64, 3, 32, 32) in [-1, 1]
    figures['1.3d'] = [save_image_grid(samples, run.folder.file('1.3d_final_samples.png'),
                                       f'64 samples from the VAE after {epoch} epochs '
                                       f'(decoder mean of z ~ N(0,I))')]
    run.folder.save_samples(samples)
    profiles, profile = save_latent_profiles(model, study.train_x, study.train_y, args.profile_per_class,
                                             run.folder, epoch)
    minus_mean, latent = save_class_minus_mean(profile, posterior_mean_variance(model, study.train_x),
                                               run.folder, epoch, n_images=len(study.train_x))
    figures['1.3e'] = [profiles, minus_mean]
    figures['1.3f'] = [save_interpolations(study, epoch)]
    ll = test_log_likelihood(model, study.test_x, args.ll_k)
    last = rows[-1]
    metrics = dict(epochs=epoch, num_train=len(study.train_x), num_test=len(study.test_x),
                   final_train_loss=last['train_loss'], final_test_neg_elbo=last['test_neg_elbo'],
                   final_test_nll=last['test_nll'], final_test_kl=last['test_kl'],
                   test_log_likelihood=ll, test_bits_per_dim=bits_per_dim(ll), ll_k=args.ll_k,
                   **latent,
                   **time_metrics(rows), device=run.config['device_name'])
    run.write_summary('vae', figures, metrics)
    return metrics


def main(argv=None):
    return run_main('train_vae.py', parse_args, train, argv)


if __name__ == '__main__':
    main()
