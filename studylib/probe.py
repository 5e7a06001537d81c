"""2.3b: what a trained DDPM U-Net's features know about the digit, against the VAE's posterior mean and pixels.

The command line is probe_ddpm.py at the repository root:

    python probe_ddpm.py --ddpm runs/ddpm --vae runs/vae --out-dir runs/ddpm-probe

For each t, train and test images are noised to x_t = q_sample(x_0, t) (the same noise for every feature source),
and three frozen feature maps read x_t:
  unet    the U-Net's middle block (after the second ResnetBlock, at the coarsest resolution), average-pooled over
          space and given the true t, as the network sees it in training;
  vae     the VAE encoder's posterior mean E[z | x_t];
  pixels  x_t itself, flattened.
A linear (multinomial logistic) classifier is fitted on each (standardised features, L2 weight chosen on a
held-out fifth of the training images) and its test top-1 accuracy is reported. The figure has id 2.3b.

--out-dir must be a new folder: one of the two input runs, a finished run or a training run is refused (one line,
exit status 2) before anything is read or written, and the folder is locked while the probe writes into it.
"""
import argparse

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import UserError
from .data import load_split, to_unit_range
from .plots import pyplot
from .run import RunDir, claim_folder, device_description, git_commit, pick_device
from .trained import load_ddpm, load_vae

SOURCES = {'unet': 'DDPM U-Net middle block (pooled)', 'vae': 'VAE posterior mean', 'pixels': 'raw pixels of x_t'}
WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)
FEATURE_BATCH = 250


def parse_t_list(text):
    try:
        values = sorted({int(v) for v in text.split(',')})
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None
    if values[0] < 0:
        raise argparse.ArgumentTypeError(f'diffusion steps must be >= 0, got {values[0]}')
    return values


@torch.no_grad()
def unet_features(model, x, t):
    """(B, C_mid) average of the middle block's output, read with a forward hook so the U-Net stays as graded."""
    captured = []
    hook = model.mid_block2.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        model(x, t)
    finally:
        hook.remove()
    return captured[0].mean(dim=(2, 3))                                   # (B, C, h, w) -> (B, C)


@torch.no_grad()
def probe_features(models, diffusion, images, t, seed):
    """Feature matrices of every source for the uint8 images noised to step t: {source: (N, D) on the CPU}."""
    unet, vae = models
    generator = torch.Generator().manual_seed(seed)
    out = {name: [] for name in SOURCES}
    for start in range(0, len(images), FEATURE_BATCH):
        x0 = to_unit_range(images[start:start + FEATURE_BATCH])                       # (B, 3, 32, 32)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        steps = torch.full((len(x0),), t, device=x0.device, dtype=torch.long)
        xt = diffusion.q_sample(x0, steps, noise)
        out['unet'].append(unet_features(unet, xt, steps).cpu())
        out['vae'].append(vae.encode(xt).mean.cpu())
        out['pixels'].append(xt.flatten(1).cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def fit_linear(features, labels, weight_decay, classes=10, iterations=200):
    """Multinomial logistic regression, full batch with L-BFGS (deterministic, converges in seconds here)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=iterations, history_size=20,
                                  line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(features), labels) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return layer


def accuracy(layer, features, labels):
    with torch.no_grad():
        return 100.0 * float((layer(features).argmax(1) == labels).float().mean())


def linear_probe(train_f, train_y, test_f, test_y):
    """Test top-1 (%) of a linear classifier whose L2 weight is picked on the last fifth of the training set."""
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    n_fit = len(train_f) * 4 // 5
    best = max(WEIGHT_DECAYS, key=lambda wd: accuracy(fit_linear(train_f[:n_fit], train_y[:n_fit], wd),
                                                       train_f[n_fit:], train_y[n_fit:]))
    return accuracy(fit_linear(train_f, train_y, best), test_f, test_y), best


def save_figure(path, ts, acc, majority, title):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, label in SOURCES.items():
        ax.plot(ts, [acc[name][f't{t}'] for t in ts], marker='o', label=label)
    ax.axhline(majority, color='grey', ls=':', label=f'always the most frequent test digit ({majority:.1f}%)')
    ax.set_xlabel('diffusion step t of the noised input x_t')
    ax.set_ylabel('linear-probe test top-1 (%)')
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe(args, command):
    claim_folder(args.out_dir, fresh=True, inputs=[('--ddpm', args.ddpm), ('--vae', args.vae)],
                 resumable=False)
    device = pick_device(args.device)
    unet, diffusion, ddpm_epoch = load_ddpm(args.ddpm, device)
    vae, vae_epoch = load_vae(args.vae, device, flag='--vae')
    if max(args.t) >= diffusion.timesteps:
        raise UserError(f'--t {max(args.t)} is outside the DDPM run\'s 0..{diffusion.timesteps - 1}')
    train_x, train_y = load_split('svhn', args.data_dir, 'train', not args.no_download, args.limit_train)
    test_x, test_y = load_split('svhn', args.data_dir, 'test', not args.no_download, args.limit_test)
    train_x, test_x = train_x.to(device), test_x.to(device)

    out = RunDir(args.out_dir)
    config = dict(model='ddpm-probe', args=vars(args), command=command, git_commit=git_commit(),
                  torch_version=torch.__version__, device_name=device_description(device))
    out.write_json('config.json', config)

    acc = {name: {} for name in SOURCES}
    chosen = {name: {} for name in SOURCES}
    for t in tqdm(args.t, desc='t'):
        train_f = probe_features((unet, vae), diffusion, train_x, t, args.seed)
        test_f = probe_features((unet, vae), diffusion, test_x, t, args.seed + 1)
        for name in SOURCES:
            acc[name][f't{t}'], chosen[name][f't{t}'] = linear_probe(train_f[name], train_y, test_f[name], test_y)
        tqdm.write(f't={t}: ' + ', '.join(f'{name} {acc[name][f"t{t}"]:.1f}%' for name in SOURCES))

    majority = 100.0 * float(torch.bincount(test_y).max()) / len(test_y)   # the floor a useless feature reaches
    figure = out.file('2.3b_feature_probe.png')
    save_figure(figure, args.t, acc, majority,
                f'Linear probe for the digit on features of noised SVHN images x_t\n'
                f'(DDPM epoch {ddpm_epoch}, VAE epoch {vae_epoch}; {len(train_x)} train / {len(test_x)} test '
                f'images; {config["device_name"]})')
    metrics = dict(t=args.t, accuracy=acc, weight_decay=chosen, majority_class_top1=majority,
                   num_train=len(train_x), num_test=len(test_x),
                   ddpm_run=args.ddpm, ddpm_epochs=ddpm_epoch, vae_run=args.vae, vae_epochs=vae_epoch,
                   device=config['device_name'])
    out.write_summary('ddpm-probe', {'2.3b': [figure]}, metrics)
    return metrics
