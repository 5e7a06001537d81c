"""Train SimSiam on CIFAR-10 with a kNN monitor, its ablations (3.4, 3.5a, 3.5b) and a final linear probe.

    python train_simsiam.py --experiment all         # baseline + every variant, every figure (GPU: a few hours)
    python train_simsiam.py --experiment 3.4 --epochs 3 --limit-train 2048 --limit-test 512   # a CPU taste

Three recipes (docs/studies.md#recipes): `tuned` (the default) is the SimSiam paper's CIFAR setting: a CIFAR
ResNet-18 (3x3 stride-1 stem, no max-pool), batch 512, random-resized-crop scale (0.2, 1). `assignment` is the course template exactly:
torchvision's ImageNet ResNet-18, batch 1024, crop scale (0.08, 1). Both: SGD momentum 0.9, weight decay 5e-4,
lr 0.03 * batch / 256 (--lr is that base rate per 256 images, as in the official code) with cosine decay per epoch
(the predictor's lr kept fixed), 100 epochs. `cpu` is the tuned recipe on a ResNet-18 a quarter as wide
(studylib.narrow_resnet) at batch 128, for the CPU-scale study (docs/results.md gives its command).
"""
import argparse
import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import q3_solution
from studylib import UserError
from studylib.augment import CIFAR_MEAN as MEAN, CIFAR_STD as STD, SimSiamAugment
from studylib.data import CIFAR_CLASSES, batch_indices, load_split
from studylib.narrow_resnet import narrow_cifar_resnet18
from studylib.plots import pyplot
from studylib.ssl_objectives import ObjectiveStep, effective_rank, make_views
from studylib.run import (RESUMABLE_COMMON, RunDir, claim_folder, make_config, make_parser, parse_with_recipe,
                          positive_float, positive_int, read_summary, recipe_help, seed_everything, time_metrics)
from studylib.trainer import (Ranks, TrainingRun, all_sum, autocast, check_batch, gather_rows, optimizer_kwargs,
                              prepare_model, run_main, sync_batchnorm, to_device_batch, use_amp, wrap)

# ---- hyperparameters: the SimSiam paper's CIFAR setting. Each is the default of the flag of the same name ----------
DEFAULTS = dict(
    epochs=100,          # passes over the training set (the paper: 800; the course notebook: 100)
    lr=0.03,             # SGD lr per 256 images: lr * batch / 256, cosine-decayed per epoch (the official --lr)
    dim=2048,            # projector output dimension (paper Sec. 4.4)
    pred_dim=512,        # predictor hidden dimension
    knn_k=200,           # kNN monitor: neighbours (Wu et al., 2018)
    knn_t=0.1,           # kNN monitor: temperature
)
MOMENTUM = 0.9               # SGD momentum
WEIGHT_DECAY = 5e-4          # SGD weight decay (L2, on every trainable weight)
PROBE_EPOCHS = 100           # full-batch epochs of the final linear probe on frozen features
EVAL_BATCH = 1024            # images per evaluation batch (memory only, not results)
# a recipe sets --batch-size and two settings that are no flag: the encoder and the crop scale
RECIPES = {
    'tuned': dict(arch='cifar_resnet18', batch_size=512, crop_scale=[0.2, 1.0]),
    'assignment': dict(arch='resnet18', batch_size=1024, crop_scale=[0.08, 1.0]),
    # the CPU study (docs/results.md): the tuned recipe on a ResNet-18 a quarter as wide (studylib.narrow_resnet)
    'cpu': dict(arch='narrow_cifar_resnet18', batch_size=128, crop_scale=[0.2, 1.0]),
}
# Each variant changes one thing of the baseline; each question compares the baseline with its variants.
VARIANTS = {
    'baseline': {},
    'no-stop-grad': {'stop_grad': False},
    'identity-pred': {'predictor': 'identity'},
    'fixed-random-pred': {'predictor': 'fixed-random'},
    'dim4096': {'dim': 4096},
    # the written questions, measured (studylib.ssl_objectives: the objectives and the heavy augmentations)
    'barlow-2048': {'objective': 'barlow', 'predictor': 'identity', 'stop_grad': False},
    'barlow-4096': {'objective': 'barlow', 'predictor': 'identity', 'stop_grad': False, 'dim': 4096},
    'heavy-aug': {'heavy': True},
    'heavy-aug-dssl': {'objective': 'dssl'},
    'no-stop-grad-vicreg': {'objective': 'vicreg', 'stop_grad': False},
    'byol': {'objective': 'byol'},
    'byol-no-stop-grad': {'objective': 'byol', 'stop_grad': False},
    'mean-target': {'objective': 'mean-target'},
}
QUESTIONS = {
    '3.4': ('with and without stop-gradient', ['baseline', 'no-stop-grad']),
    '3.5a': ('trainable vs identity predictor (and a fixed random one)', ['baseline', 'identity-pred',
                                                                           'fixed-random-pred']),
    '3.5b': ('projector output dimension 2048 vs 4096', ['baseline', 'dim4096']),
    '3.5c': ('Barlow Twins with a 2048 and a 4096 projector, beside SimSiam', ['baseline', 'barlow-2048',
                                                                             'barlow-4096']),
    '3.6': ('heavy augmentations: SimSiam on heavy views, and heavy views learning only from standard ones (DSSL)',
            ['baseline', 'heavy-aug', 'heavy-aug-dssl']),
    '3.7': ('no stop-gradient, alone and with VICReg variance and covariance terms',
            ['baseline', 'no-stop-grad-vicreg', 'no-stop-grad']),
    '3.8': ('a momentum target (BYOL) with and without stop-gradient, beside SimSiam',
            ['baseline', 'byol', 'byol-no-stop-grad', 'no-stop-grad']),
    '3.9': ('asymmetry (arXiv 2204.00613): each target the mean encoding of two views', ['baseline', 'mean-target']),
}
EXPERIMENTS = {
    **{qid: members for qid, (_, members) in QUESTIONS.items()},
    '3.5a': ['baseline', 'identity-pred'],                # the fixed random predictor only with ablations or all
    'ablations': ['baseline', 'no-stop-grad', 'identity-pred', 'fixed-random-pred', 'dim4096'],   # 3.4-3.5b
    'all': list(VARIANTS),
}
PREDICTOR_MODES = {'mlp': None, 'identity': 'no_pred_mlp', 'fixed-random': 'fixed_random_init'}
# what a --resume may change besides the common flags: which configurations run, not how one trains
RESUMABLE = RESUMABLE_COMMON | {'experiment'}


def parse_args(argv=None):
    parser = make_parser(__doc__.split('\n')[0], out_dir='runs/simsiam',
                         lr_help='base learning rate per 256 images, as the official SimSiam --lr: the SGD lr is '
                                 'LR * batch / 256 (0.06 for the tuned recipe\'s batch 512), cosine-decayed per epoch')
    s = parser.add_argument_group('SimSiam study')
    s.add_argument('--recipe', choices=sorted(RECIPES), default='tuned',
                   help=f'the defaults it sets ({recipe_help(RECIPES)}); tuned is the SimSiam paper\'s CIFAR '
                        f'setting, assignment the course template exactly, cpu the CPU study; --batch-size given '
                        f'explicitly wins')
    s.add_argument('--experiment', type=experiment_names, default='single', metavar='NAME',
                   help='single: one configuration from the flags; a question id (' + ', '.join(QUESTIONS) + '): '
                        'the baseline and that question\'s variants; ablations: 3.4-3.5b; all: every configuration '
                        'and figure; or configurations by name, comma-separated (' + ', '.join(VARIANTS) + '), '
                        'e.g. to share an experiment between machines')
    s.add_argument('--no-stop-grad', action='store_true', help='(single) drop the stop-gradient on z')
    s.add_argument('--predictor', choices=sorted(PREDICTOR_MODES), default='mlp',
                   help='(single) trainable MLP, identity, or a frozen random MLP')
    s.add_argument('--dim', type=positive_int, help='projector output dimension')
    s.add_argument('--pred-dim', type=positive_int, help='predictor hidden dimension')
    s.add_argument('--knn-k', type=positive_int, help='neighbours of the kNN monitor')
    s.add_argument('--knn-t', type=positive_float, help='temperature of the kNN monitor')
    args = parse_with_recipe(parser, argv, DEFAULTS, RECIPES)
    if args.batch_size < 2:
        parser.error(f'--batch-size {args.batch_size}: batch norm needs at least 2 images per batch')
    return args


def experiment_names(text):
    """--experiment: 'single', an experiment's name, or configuration names separated by commas."""
    if text == 'single' or text in EXPERIMENTS:
        return text
    names = text.split(',')
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f'{text!r}: expected single, one of {", ".join(EXPERIMENTS)}, or distinct configuration names from '
            f'{", ".join(VARIANTS)} separated by commas' + (f' (unknown: {", ".join(unknown)})' if unknown else ''))
    return text


def configurations(experiment):
    """The configuration names an --experiment value trains, in order."""
    if experiment == 'single':
        return ['single']
    return list(EXPERIMENTS[experiment]) if experiment in EXPERIMENTS else experiment.split(',')


def get_lr(epoch, base_lr, epochs):
    """Cosine decay per epoch (0-based), as the SimSiam paper: base_lr * 0.5 * (1 + cos(pi * epoch / epochs))."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def normalise(images):
    """uint8 (B, 3, 32, 32) -> float normalised with the CIFAR-10 statistics, no augmentation."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def embed(net, images):
    """net(normalised images) in eval mode, in chunks: (N, D)."""
    net.eval()
    return torch.cat([net(normalise(images[idx])) for idx in batch_indices(len(images), EVAL_BATCH,
                                                                            shuffle=False, device=images.device)])


def backbone(model):
    """The encoder without its projector (everything up to the global average pool): (B, 512) features."""
    return nn.Sequential(*list(model.encoder.children())[:-1], nn.Flatten())


@torch.no_grad()
def knn_accuracy(model, train_x, train_y, test_x, test_y, *, k, t, ranks=None):
    """Top-1 % of the weighted kNN monitor on the L2-normalised encoder output (the template's features).

    Under torchrun each rank embeds its share of the training set, the bank is gathered on every rank, and each
    rank classifies its share of the test set: the work is split, the answer is the single-process one."""
    ranks = ranks or Ranks(device=train_x.device)
    share = (lambda x: x.tensor_split(ranks.world)[ranks.rank])
    bank = gather_rows(F.normalize(embed(model.encoder, share(train_x)), dim=1), ranks).t()   # (dim, N)
    feats = F.normalize(embed(model.encoder, share(test_x)), dim=1)                          # (M / world, dim)
    pred = torch.cat([q3_solution.knn_predict(feats[idx], bank, train_y, len(CIFAR_CLASSES), k, t)[:, 0]
                      for idx in batch_indices(len(feats), EVAL_BATCH, shuffle=False)])
    correct = all_sum((pred == share(test_y)).sum().float(), ranks)
    return 100.0 * correct.item() / len(test_y)


def linear_probe(model, train_x, train_y, test_x, test_y, epochs=100):
    """Frozen backbone, a linear classifier on its (standardised) train features: test top-1 %."""
    net = backbone(model)
    train_f, test_f = embed(net, train_x), embed(net, test_x)                 # (N, 512), (M, 512)
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
    classifier = nn.Linear(train_f.shape[1], len(CIFAR_CLASSES)).to(train_f.device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in batch_indices(len(train_f), 256, g, device=train_f.device):
            loss = F.cross_entropy(classifier(train_f[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    with torch.no_grad():
        return 100.0 * (classifier(test_f).argmax(1) == test_y).float().mean().item()


def variant_settings(args, name):
    """The model settings of one configuration: the flags (single) or the baseline changed by a variant."""
    if name == 'single':
        base = dict(stop_grad=not args.no_stop_grad, predictor=args.predictor, dim=args.dim)
    else:
        base = dict(stop_grad=True, predictor='mlp', dim=args.dim) | VARIANTS[name]
    return dict(arch=args.arch, pred_dim=args.pred_dim, **base)


def build_model(settings):
    encoder = {'cifar_resnet18': q3_solution.cifar_resnet18, 'resnet18': _torchvision_resnet18,
               'narrow_cifar_resnet18': narrow_cifar_resnet18}[settings['arch']]
    return q3_solution.SimSiam(encoder, dim=settings['dim'], pred_dim=settings['pred_dim'],
                               stop_gradient=settings['stop_grad'], MLP_mode=PREDICTOR_MODES[settings['predictor']])


def _torchvision_resnet18(**kwargs):
    from torchvision.models import resnet18
    return resnet18(**kwargs)


def build(settings, lr, device, ranks=None, compile_model=False, amp=False):
    """The SimSiam model, its objective (studylib.ssl_objectives.ObjectiveStep: the loss of settings['objective'],
    SimSiam's by default), the module the training step calls (the objective laid out, data-parallel under torchrun,
    compiled when asked) and SGD with two parameter groups: the encoder's, whose lr follows the cosine schedule, and
    the predictor's, kept at the base lr (paper Sec. 4.2, the official fix_pred_lr: the predictor adapts to the
    latest representation). (model, objective, step_model, optimizer); bench.py times the same."""
    model = build_model(settings).to(device)
    sync_batchnorm(model, ranks)   # batch statistics over the global batch under torchrun (the paper's setting)
    objective = ObjectiveStep(model, settings, lambda: autocast(device, amp))
    step_model = prepare_model(objective, device, compile_model, wrap=lambda m: wrap(m, ranks))
    groups = [{'params': [p for p in model.encoder.parameters() if p.requires_grad], 'fix_lr': False},
              {'params': [p for p in model.predictor.parameters() if p.requires_grad], 'fix_lr': True}]
    groups = [g for g in groups if g['params']]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                **optimizer_kwargs(device))
    return model, objective, step_model, optimizer


def train_step(step_model, optimizer, views):
    """One optimizer step on the objective's loss of the views (SimSiam's symmetric negative cosine, stop-gradient
    inside the model, q3_solution.SimSiam, unless the configuration names another): (loss, z1)."""
    loss, z1 = step_model(views)                                         # the forward in bf16 under --amp
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, z1


def finished_metrics(args, folder, name):
    """The metrics of a configuration that --resume finds finished (its summary is enough), else None."""
    summary = read_summary(folder.path) if args.resume else None
    if summary is None:
        return None
    if summary.get('model') != 'simsiam' or 'epochs' not in summary['metrics']:
        raise UserError(f'--resume: {folder.path} holds a {summary.get("model")} run, not a SimSiam '
                        f'configuration; point --out-dir at a train_simsiam.py run')
    folder.check_same_flags(vars(args), RESUMABLE)   # a finished configuration of other flags is not this one
    if summary['metrics']['epochs'] >= args.epochs:
        print(f'{name}: already finished in {folder.path}')
        return summary['metrics']
    if not os.path.exists(folder.checkpoint_path):
        raise UserError(f'--resume: {folder.path} finished {summary["metrics"]["epochs"]} epochs and has no '
                        f'checkpoint to train on to --epochs {args.epochs}; rerun it in another --out-dir')
    return None


def step_views(augment, images, idx, loop, settings):
    """The step's views of this rank's rows (idx), made on the device: no per-image Python."""
    views = make_views(augment, images[idx], settings, n=loop.global_batch, part=loop.part)   # (B, 3, 32, 32) each
    return [to_device_batch(v, images.device) for v in views]


@dataclass
class Member:
    """One configuration of the study while it trains: its name and model settings, its run, its model, and the
    data (uint8 on the device: train_x, train_y, test_x, test_y)."""
    args: argparse.Namespace
    name: str
    settings: dict
    run: TrainingRun
    model: nn.Module
    data: tuple

    def knn(self):
        return knn_accuracy(self.model, *self.data, k=self.args.knn_k, t=self.args.knn_t, ranks=self.run.ranks)

    def healthy_z_std(self):
        return 1 / math.sqrt(self.settings['dim'])

    def erank(self):
        """The effective rank of the test images' encoder outputs (the kNN features, before normalisation)."""
        return effective_rank(embed(self.model.encoder, self.data[2]))


def train_config(args, name, data, ranks, command):
    """Train one configuration in its own run folder (resuming it if asked); returns its final metrics."""
    settings = variant_settings(args, name)
    folder = RunDir(config_dir(args, name))
    done = finished_metrics(args, folder, name)
    if done is not None:
        return done
    device, lr = ranks.device, args.lr * args.batch_size / 256   # --lr is per 256 images (the official code)
    config = make_config(args, 'simsiam', settings, device, command,
                         constants=dict(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, probe_epochs=PROBE_EPOCHS,
                                        eval_batch=EVAL_BATCH)) | {'configuration': name}
    # a configuration of an experiment not started yet starts fresh; a single run must have its checkpoint
    resume = args.resume and (args.experiment == 'single' or os.path.exists(folder.checkpoint_path))
    run = TrainingRun(ranks, args, config, RESUMABLE, out_dir=folder.path, resume=resume)
    model, objective, step_model, optimizer = build(settings, lr, device, ranks, args.compile,
                                                    use_amp(args.amp, device))
    state = run.resume(model, optimizer, target=None)
    objective.load_ema_state(state['target'])
    state['target'] = objective.ema_state   # byol's averaged weights, called at each save
    augment = SimSiamAugment(crop_scale=args.crop_scale)
    member = Member(args, name, settings, run, model, tuple(t.to(device) for t in data))   # uint8 on the device
    train_x = member.data[0]
    if run.ckpt is None:   # a fresh start: the monitors before any training are the log's epoch 0
        initial_monitors(member, augment)

    for epoch in run.epochs():
        epoch_lr = get_lr(epoch - 1, lr, args.epochs)
        for group in optimizer.param_groups:
            group['lr'] = lr if group['fix_lr'] else epoch_lr
        model.train()
        loop = run.epoch_loop(epoch, len(train_x), num_sums=2, drop_last=True)   # loss and z std, summed
        for idx in loop:
            views = step_views(augment, train_x, idx, loop, settings)
            loss, z1 = train_step(step_model, optimizer, views)
            collapse = collapse_indicator(z1)
            loop.record(loss, torch.stack([loss.detach(), collapse]) / ranks.world)   # means over ranks
        sums, seconds = loop.finish()
        with loop.end_of_epoch():   # a signal here keeps the epoch's training (exit 130)
            end_of_epoch(member, epoch, epoch_lr, sums / len(loop), seconds)
    if not ranks.is_main:
        return None
    return final_metrics(member)


def collapse_indicator(z):
    """The paper's collapse monitor (Sec. 4.1): the std over the batch of each dimension of z/||z||, averaged over
    the dimensions: about 1/sqrt(dim) for a healthy spread, 0 when every image maps to the same vector."""
    return F.normalize(z.detach(), dim=1).std(dim=0, correction=0).mean()


@torch.no_grad()
def initial_monitors(member, augment):
    """Epoch 0 of the log: the kNN monitor of the untrained model, and the loss and z std of its first batch
    (measured on a copy in training mode, so that neither the weights, the batch-norm statistics nor the training's
    random numbers change). Every rank runs the copy on the same batch: its batch norms are synchronised across the
    ranks, so a forward pass on rank 0 alone would wait for the others forever."""
    args, run = member.args, member.run
    knn = member.knn()
    train_x = member.data[0]
    with torch.random.fork_rng(devices=[train_x.device] if train_x.is_cuda else []):
        torch.manual_seed(args.seed)
        x = train_x[:args.batch_size]                                        # (B, 3, 32, 32) uint8
        views = [to_device_batch(v, x.device) for v in make_views(augment, x, member.settings)]
        probe = ObjectiveStep(copy.deepcopy(member.model).train(), member.settings, contextlib.nullcontext)
        loss, z1 = probe(views)
        loss, z_std = float(loss), float(collapse_indicator(z1))
    if not run.ranks.is_main:
        return
    erank = member.erank()
    run.log(dict(epoch=0, train_loss=loss, knn_top1=knn, z_std=z_std, erank=erank, lr=None, seconds=0.0))
    tqdm.write(f'{member.name} before training: loss {loss:.4f} (first batch), kNN top-1 {knn:.2f}%, z std '
               f'{z_std:.4f} (healthy ~{member.healthy_z_std():.4f}), effective rank {erank:.1f}')


def end_of_epoch(member, epoch, lr, means, seconds):
    """The kNN monitor (every rank: the work is split), then the log row and the checkpoint (rank 0)."""
    knn = member.knn()
    run = member.run
    if not run.ranks.is_main:
        return
    train_loss, z_std = means.tolist()
    erank = member.erank()
    run.log(dict(epoch=epoch, train_loss=train_loss, knn_top1=knn, z_std=z_std, erank=erank, lr=lr, seconds=seconds))
    tqdm.write(f'{member.name} epoch {epoch}: loss {train_loss:.4f}, kNN top-1 {knn:.2f}%, z std {z_std:.4f} '
               f'(healthy ~{member.healthy_z_std():.4f}), effective rank {erank:.1f}, lr {lr:.4f}, {seconds:.1f} s')
    run.save(epoch)


SPECTRUM_KEEP = 256   # leading singular values saved in spectrum.json


@torch.no_grad()
def embedding_spectrum(model, images):
    """The spread of the test embeddings along each principal direction (Jing et al. 2022, Sec. 3): the singular
    values, descending, of the centred z/||z|| (what the kNN monitor compares) divided by sqrt(N), so that their
    squares sum to the total variance. A full collapse leaves them all near 0; a partial one, a few above the rest."""
    z = F.normalize(embed(model.encoder, images), dim=1).double()                    # (N, dim)
    return (torch.linalg.svdvals(z - z.mean(0)) / math.sqrt(len(z)))[:SPECTRUM_KEEP].tolist()


def final_metrics(member):
    """The linear probe on the frozen backbone, the embedding spectrum (spectrum.json) and the configuration's
    summary.json (rank 0)."""
    run, (train_x, train_y, test_x, test_y) = member.run, member.data
    run.folder.write_json('spectrum.json', {'singular_values': embedding_spectrum(member.model, test_x),
                                            'images': len(test_x)})
    log = run.folder.read_metrics()
    init = [r for r in log if r['epoch'] == 0]   # the untrained model (absent in runs logged before epoch 0 was)
    rows = [r for r in log if r['epoch'] > 0]
    probe = linear_probe(member.model, train_x, train_y, test_x, test_y, PROBE_EPOCHS)
    metrics = dict(configuration=member.name, epochs=rows[-1]['epoch'], final_train_loss=rows[-1]['train_loss'],
                   final_knn_top1=rows[-1]['knn_top1'], best_knn_top1=max(r['knn_top1'] for r in rows),
                   init_knn_top1=init[0]['knn_top1'] if init else None,
                   init_z_std=init[0]['z_std'] if init else None, min_train_loss=min(r['train_loss'] for r in rows),
                   final_z_std=rows[-1]['z_std'], init_erank=init[0].get('erank') if init else None,
                   final_erank=rows[-1].get('erank'), linear_probe_top1=probe, num_train=len(train_x),
                   num_test=len(test_x), **time_metrics(rows), device=run.config['device_name'], **member.settings)
    run.write_summary('simsiam', {}, metrics)
    return metrics


def save_question_figures(out, qid, names, logs, rate_line, scale=''):
    """Loss and kNN accuracy against epoch (two panels, one legend; the untrained network's kNN as the floor), and
    the collapse monitors (z std and effective rank); `scale` (the run's encoder, images, batch and schedule) goes
    under both titles, so that a figure says what it measured."""
    plt = pyplot()
    title = QUESTIONS[qid][0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    barlow = [n for n in names if VARIANTS.get(n, {}).get('objective') == 'barlow']
    twin = left.twinx() if barlow else None
    for i, name in enumerate(names):
        epochs = [r['epoch'] for r in logs[name]]
        ax = twin if name in barlow else left
        ax.plot(epochs, [r['train_loss'] for r in logs[name]], marker='o', markersize=3, label=name,
                color=f'C{i}', linestyle='--' if name in barlow else '-')
        right.plot(epochs, [r['knn_top1'] for r in logs[name]], marker='o', markersize=3, color=f'C{i}')
    floor = logs[names[0]][0]['knn_top1'] if logs[names[0]][0]['epoch'] == 0 else None
    if floor is not None:
        right.axhline(floor, color='gray', linestyle=':', linewidth=1)
        right.annotate(f'untrained network: {floor:.1f}%', (0, floor), fontsize=8, va='bottom')
    left.set_ylabel('loss: -cos(p, z)  (-1 = aligned)')
    if twin is not None:
        twin.set_ylabel('Barlow Twins loss (dashed lines)')
    right.set_ylabel('kNN top-1 on the test set (%; chance 10)')
    _epoch_axes([left, right])
    handles = [h for ax in (left, twin) if ax is not None for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles, [h.get_label() for h in handles], loc='lower center', ncol=min(len(names), 5), frameon=False)
    fig.suptitle(f'{qid}: {title}' + (f'\n{scale}' if scale else ''), fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1), w_pad=3)
    curves = os.path.join(out, f'{qid}_loss_knn.png')
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [curves, save_collapse_figure(out, qid, names, logs, rate_line, scale)]


def _epoch_axes(axes):
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.set_xlabel('epoch (0 = before training)')
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save_collapse_figure(out, qid, names, logs, rate_line, scale):
    """The std of z/||z|| (0 = every image the same direction) beside the effective rank of the test embeddings
    (1 = one direction; a partial collapse keeps a spread in a few directions only)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, name in enumerate(names):
        epochs = [r['epoch'] for r in logs[name]]
        left.plot(epochs, [r['z_std'] for r in logs[name]], marker='o', markersize=3, label=name, color=f'C{i}')
        ranked = [r for r in logs[name] if r.get('erank') is not None and r['epoch'] > 0]
        right.plot([r['epoch'] for r in ranked], [r['erank'] for r in ranked], marker='o', markersize=3,
                   color=f'C{i}')
    dims = sorted({rate_line[n] for n in names})
    for dim in dims:
        left.axhline(1 / math.sqrt(dim), color='gray', linestyle='--', linewidth=1)
        left.annotate(f'healthy: 1/sqrt({dim})', (left.get_xlim()[0], 1 / math.sqrt(dim)), fontsize=8, va='bottom')
    left.set_ylabel('std of z/||z|| over the batch (mean over dims)')
    highest = max([1 / math.sqrt(d) for d in dims] + [r['z_std'] for n in names for r in logs[n]])
    left.set_ylim(0, 1.25 * highest)
    right.set_ylabel('effective rank of the test embeddings z')
    right.set_ylim(bottom=0)
    right.set_xlim(left.get_xlim())   # the same epoch axis as the z std panel
    right.set_title('from epoch 1 (before training, the untrained batch norm\'s running statistics dominate)',
                    fontsize=8)
    _epoch_axes([left, right])
    fig.legend(*left.get_legend_handles_labels(), loc='lower center', ncol=min(len(names), 5), frameon=False)
    fig.suptitle(f'{qid}: collapse monitors (std 0 or rank 1 = collapsed)' + (f'\n{scale}' if scale else ''),
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = os.path.join(out, f'{qid}_collapse.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_spectrum_figure(out, qid, names, scale):
    """The final embeddings' singular-value spectra of a question's configurations (those with a spectrum.json),
    on a log axis: [] when none has one (runs made before the spectrum was saved)."""
    spectra = {}
    for name in names:
        path = os.path.join(out, name, 'spectrum.json')
        if os.path.exists(path):
            with open(path) as f:
                spectra[name] = json.load(f)['singular_values']
    if not spectra:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.6))
    for i, name in enumerate(names):
        if name in spectra:   # directions without spread (beyond the embeddings' rank) are left out of a log axis
            values = [v for v in spectra[name] if v > 1e-7 * spectra[name][0]]
            ax.plot(range(1, len(values) + 1), values, color=f'C{i}', label=name)
    ax.set_yscale('log')
    ax.set_xlabel('principal direction (by decreasing spread)')
    ax.set_ylabel('singular value of the centred z/||z|| / sqrt(N)')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
    ax.set_title(f'{qid}: spread of the final test embeddings along each principal direction\n(all small = full '
                 f'collapse; a few large and the rest small = dimensional collapse)\n{scale}', fontsize=9.5)
    fig.tight_layout()
    path = os.path.join(out, f'{qid}_spectrum.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def config_dir(args, name):
    return os.path.join(args.out_dir, name) if args.experiment != 'single' else args.out_dir


def configuration_commit(folder):
    """The git commit a configuration's config.json records (the code its training last started with), or None."""
    try:
        with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
            return json.load(f).get('git_commit')
    except (OSError, ValueError):
        return None


def check_out_dir(args, names):
    """Before training anything: a fresh start never replaces a finished run or configuration, and a resume
    needs a SimSiam run there (not a missing folder, nor another model's run)."""
    if not args.resume:
        claim_folder(args.out_dir, fresh=True, members=[config_dir(args, n) for n in names])
        return
    top = read_summary(args.out_dir) if os.path.isdir(args.out_dir) else None
    if not os.path.isdir(args.out_dir):
        raise UserError(f'--resume: there is no run at {args.out_dir}; start without --resume, or point --out-dir '
                        f'at the run to continue')
    if top is not None and top.get('model') != 'simsiam':
        raise UserError(f'--resume: {args.out_dir} holds a {top.get("model")} run, not a SimSiam one; point '
                        f'--out-dir at a train_simsiam.py run')
    if args.experiment != 'single' and not os.path.exists(os.path.join(args.out_dir, 'config.json')) \
            and not any(os.path.isdir(config_dir(args, n)) for n in names):
        raise UserError(f'--resume: {args.out_dir} holds none of the configurations {names}; start without '
                        f'--resume, or point --out-dir at the experiment to continue')
    claim_folder(args.out_dir, fresh=False)


def train(args, command, ranks):
    # under torchrun every rank seeds alike and draws the same global batches (studylib.trainer)
    device = ranks.device
    seed_everything(args.seed)
    train_x, train_y = load_split('cifar10', args.data_dir, 'train', not args.no_download, args.limit_train)
    test_x, test_y = load_split('cifar10', args.data_dir, 'test', not args.no_download, args.limit_test)
    if args.batch_size > len(train_x):
        raise UserError(f'--batch-size {args.batch_size} is larger than the {len(train_x)} training images')
    check_batch(ranks, args.batch_size)
    if args.batch_size // ranks.world < 2:
        raise UserError(f'--batch-size {args.batch_size} gives each of the {ranks.world} processes fewer than 2 '
                        f'images: batch norm needs at least 2')
    names = configurations(args.experiment)
    if ranks.is_main:
        check_out_dir(args, names)
    print(f'SimSiam {args.experiment}: {names}; recipe {args.recipe}, batch {args.batch_size}, lr {args.lr} per 256 '
          f'images ({args.lr * args.batch_size / 256:.4f}); '
          f'{len(train_x)} train / {len(test_x)} test images on {device}')
    data = (train_x, train_y, test_x, test_y)
    results = {}
    for name in names:
        seed_everything(args.seed)   # every configuration starts from the same initial state
        results[name] = train_config(args, name, data, ranks, command)
    if args.experiment == 'single' or not ranks.is_main:
        return results

    exp = RunDir(args.out_dir)
    logs = {name: RunDir(os.path.join(args.out_dir, name)).read_metrics() for name in names}
    for name in names:   # each configuration's own code: a stopped experiment resumed later ran newer code
        results[name] = dict(results[name], git_commit=configuration_commit(os.path.join(args.out_dir, name)))
    dims = {name: results[name]['dim'] for name in names}
    figures = {}
    scale = (f'{args.arch}, {len(train_x):,} CIFAR-10 training images (the kNN bank), '
             f'{len(test_x):,} test images, batch {args.batch_size}, {args.epochs} epochs, lr {args.lr:g} per 256')
    for qid, (_, members) in QUESTIONS.items():
        if not set(members[:2]) <= set(names):   # a question needs the baseline and its own first variant
            continue
        members = [m for m in members if m in names]
        figures[qid] = save_question_figures(args.out_dir, qid, members, logs, dims, scale)
        figures[qid] += save_spectrum_figure(args.out_dir, qid, members, scale)
    exp.write_json('config.json', make_config(args, 'simsiam-experiment', {'configurations': names}, device,
                                              command))
    exp.write_summary('simsiam', figures, results)
    return results


def main(argv=None):
    return run_main('train_simsiam.py', parse_args, train, argv)


if __name__ == '__main__':
    main()
