"""The pieces the CPU-scale study adds: the recipes, the narrow backbone, samples.npz and the untrained model's
monitors (epoch 0), checked without real data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import q3_solution
import train_ddpm
import train_simsiam
from studylib.augment import SimSiamAugment
from studylib.narrow_resnet import narrow_cifar_resnet18
from studylib.run import RunDir


# ---- DDPM recipes --------------------------------------------------------------------------------------------------
def test_ddpm_assignment_recipe_is_the_default_and_the_template_settings():
    args = train_ddpm.parse_args([])
    assert (args.recipe, args.batch_size, args.lr, args.ema_decay) == ('assignment', 64, 1e-4, 0.995)
    assert (args.sampler, args.clip_denoised) == ('ddpm', False)


def test_ddpm_cpu_recipe_and_explicit_flags_win():
    cpu = train_ddpm.parse_args(['--recipe', 'cpu'])
    assert (cpu.batch_size, cpu.lr, cpu.sampler, cpu.sample_steps, cpu.clip_denoised) == (16, 2e-4, 'ddim', 50,
                                                                                          True)
    mixed = train_ddpm.parse_args(['--recipe', 'cpu', '--lr', '3e-4', '--no-clip-denoised', '--sampler', 'ddpm',
                                   '--batch-size', '8', '--ema-decay', '0'])
    assert (mixed.batch_size, mixed.lr, mixed.sampler, mixed.clip_denoised, mixed.ema_decay) == (8, 3e-4, 'ddpm',
                                                                                                 False, 0.0)
    clipped = train_ddpm.parse_args(['--clip-denoised'])   # the assignment recipe with the clipping sampler
    assert clipped.clip_denoised is True and clipped.batch_size == 64


# ---- the narrow ResNet-18 ------------------------------------------------------------------------------------------
def test_narrow_resnet_has_resnet18_topology_at_a_quarter_width():
    net = narrow_cifar_resnet18(num_classes=10)
    wide = q3_solution.cifar_resnet18(num_classes=10)
    assert net.fc.in_features == 128 and wide.fc.in_features == 512
    assert [layer[0].conv1.out_channels for layer in (net.layer1, net.layer2, net.layer3, net.layer4)] == [16, 32, 64,
                                                                                                          128]
    assert [len(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)] == [2, 2, 2, 2]
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(net) < count(wide) / 12   # conv weights scale with width squared: ~1/16
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 10)
    features = torch.nn.Sequential(*list(net.children())[:-1], torch.nn.Flatten())   # what the probe uses
    assert features(x).shape == (2, 128)


def test_narrow_resnet_zero_init_residual_makes_each_block_start_as_identity():
    net = narrow_cifar_resnet18(num_classes=10, zero_init_residual=True).eval()
    block = net.layer1[1]   # same width in and out: no downsample, so the block must return relu(x)
    x = torch.randn(3, 16, 8, 8)
    assert torch.equal(block(x), F.relu(x))
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for layer in (net.layer1, net.layer4) for b in layer)


def test_simsiam_accepts_the_narrow_encoder_as_the_template_does():
    model = q3_solution.SimSiam(narrow_cifar_resnet18, dim=64, pred_dim=16)
    p1, p2, z1, z2 = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert p1.shape == z2.shape == (4, 64) and not z1.requires_grad and p1.requires_grad
    args = train_simsiam.parse_args(['--recipe', 'cpu'])
    assert args.batch_size == 128
    built = train_simsiam.build_model(train_simsiam.variant_settings(args, 'dim4096') | {'pred_dim': 16})
    assert built.encoder.fc[6].out_features == 4096 and built.encoder.fc[0].in_features == 128


# ---- samples.npz ---------------------------------------------------------------------------------------------------
def test_samples_npz_is_uint8_nhwc_under_arr_0(tmp_path):
    images = torch.zeros(2, 3, 4, 5)
    images[0, 0] = -1.0            # red channel of image 0: black
    images[0, 1] = 1.0             # green: full
    images[1, 2, 3, 4] = 0.5       # one blue pixel of image 1: (0.5 + 1) * 127.5 = 191.25 -> 191
    images[1, 1, 0, 0] = 7.0       # out of range: clipped to 255
    folder = RunDir(str(tmp_path))
    path = folder.save_samples(images)
    arr = np.load(path)['arr_0']
    assert arr.dtype == np.uint8 and arr.shape == (2, 4, 5, 3)
    assert (arr[0, :, :, 0] == 0).all() and (arr[0, :, :, 1] == 255).all() and (arr[0, :, :, 2] == 128).all()
    assert arr[1, 3, 4, 2] == 191 and arr[1, 0, 0, 1] == 255 and arr[1, 0, 0, 0] == 128
    assert not list(tmp_path.glob('*.tmp'))


# ---- SimSiam's epoch 0 ---------------------------------------------------------------------------------------------
class _Run:
    def __init__(self):
        self.rows = []
        self.ranks = train_simsiam.Ranks(device=torch.device('cpu'))

    def log(self, row, figures=()):
        self.rows.append(row)


def test_initial_monitors_change_neither_the_model_nor_the_random_stream():
    torch.manual_seed(0)
    model = q3_solution.SimSiam(narrow_cifar_resnet18, dim=32, pred_dim=8)
    gen = torch.Generator().manual_seed(1)
    train_x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=gen)
    train_y = torch.arange(40) % 10
    args = train_simsiam.parse_args(['--recipe', 'cpu', '--batch-size', '16', '--knn-k', '5'])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    run = _Run()
    member = train_simsiam.Member(args, 'baseline', {'dim': 32}, run, model,
                                  (train_x, train_y, train_x[:20], train_y[:20]))
    train_simsiam.initial_monitors(member, SimSiamAugment(crop_scale=(0.2, 1)))
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # batch-norm statistics included
    (row,) = run.rows
    assert row['epoch'] == 0 and row['lr'] is None and row['seconds'] == 0
    assert 0 < row['z_std'] <= 1 / 32 ** 0.5 + 1e-6 and -1 <= row['train_loss'] <= 1
    assert 0 <= row['knn_top1'] <= 100


def test_collapse_indicator_is_the_papers_std_of_normalised_z():
    healthy = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    # i.i.d. Gaussian directions: each coordinate of z/||z|| has std 1/sqrt(d)
    assert float(train_simsiam.collapse_indicator(healthy)) == pytest.approx(1 / 8, rel=0.03)
    collapsed = torch.ones(4096, 64) + 1e-4 * healthy
    assert float(train_simsiam.collapse_indicator(collapsed)) < 1e-4
