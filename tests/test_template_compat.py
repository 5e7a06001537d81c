"""The course's real clients run unchanged: the autograder and the starter notebooks were written against the
assignment template (WANG-CR/Homework3; docs in README, "Compatibility with the course template").

Each test pins one contract the template fixes and that an earlier version of this repository broke: the U-Net's
additive time conditioning (state_dict keys and shapes, outputs), the float32 schedule arithmetic, module-level
names read at call time, t on another device than x, q3_misc's return values and `gpu` argument, the notebook's
knn_predict layout, and the VAE decoder's argument name. The oracles are written out here from the template's
description (docs/api.md), not taken from the module under test.
"""
import inspect
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm_solution as D
import q3_misc as M
import q3_solution as Q
import vae_solution as V
from studylib import UserError

pytestmark = pytest.mark.usefixtures('isolated_torch_state')

SCHEDULE_NAMES = ('betas', 'alphas', 'sqrt_recip_alphas', 'alphas_cumprod', 'sqrt_alphas_cumprod',
                  'sqrt_one_minus_alphas_cumprod', 'alphas_cumprod_prev', 'posterior_variance')


# ----------------------------------------------------------------------------------------------------------------
# 1. The U-Net is the template's: additive time conditioning.

def template_resnet_block(block, x, time_emb=None):
    """The template's ResnetBlock.forward written with functional ops on `block`'s own weights:
    h = SiLU(GN(conv(x))); h = h + Linear(SiLU(t)) broadcast over H, W; h = SiLU(GN(conv(h))); h + res_conv(x)."""
    def block_fn(b, inp):
        y = F.conv2d(inp, b.proj.weight, b.proj.bias, padding=1)
        y = F.group_norm(y, b.norm.num_groups, b.norm.weight, b.norm.bias, b.norm.eps)
        return F.silu(y)
    h = block_fn(block.block1, x)
    if time_emb is not None:
        lin = block.mlp[1]
        h = h + F.linear(F.silu(time_emb), lin.weight, lin.bias)[:, :, None, None]
    h = block_fn(block.block2, h)
    res = x if isinstance(block.res_conv, nn.Identity) else F.conv2d(x, block.res_conv.weight, block.res_conv.bias)
    return h + res


def test_unet_has_the_templates_parameter_count_and_time_projection_shapes():
    """Unet(dim=32, channels=3, dim_mults=(1, 2, 4, 8)) has the template's 8,073,331 parameters (the scale/shift
    variant had 8,321,011), and every ResnetBlock's time projection maps the 4*dim embedding to dim_out channels:
    e.g. downs.0.0.mlp.1.weight is (32, 128), not (64, 128)."""
    model = D.Unet(dim=32, channels=3, dim_mults=(1, 2, 4, 8))
    assert sum(p.numel() for p in model.parameters()) == 8_073_331
    state = model.state_dict()
    assert state['downs.0.0.mlp.1.weight'].shape == (32, 128)
    blocks = [m for m in model.modules() if isinstance(m, D.ResnetBlock)]
    assert len(blocks) == 17   # 4 levels x 2 down, 2 middle, 3 levels x 2 up, 1 final
    for block in blocks:
        out_channels = block.block1.proj.out_channels
        if block.mlp is not None:
            assert block.mlp[1].weight.shape == (out_channels, 128)
            assert block.mlp[1].bias.shape == (out_channels,)
    # the final block has no time input at all, as in the template
    assert model.final_conv[0].mlp is None


@pytest.mark.parametrize('dims', [(16, 32), (32, 32)])
def test_resnet_block_adds_the_time_embedding(dims):
    """A seeded ResnetBlock equals the functional template block (with and without a residual 1x1 conv, with and
    without a time embedding). A scale/shift block fails: its mlp output has 2*dim_out channels."""
    torch.manual_seed(0)
    block = D.ResnetBlock(dims[0], dims[1], time_emb_dim=24)
    for p in block.parameters():   # away from the default init so that GroupNorm affine terms matter too
        nn.init.normal_(p, std=0.3)
    x, emb = torch.randn(3, dims[0], 6, 6), torch.randn(3, 24)
    torch.testing.assert_close(block(x, emb), template_resnet_block(block, x, emb))
    torch.testing.assert_close(block(x), template_resnet_block(block, x, None))


def test_seeded_unet_output_equals_the_template_blocks_everywhere(monkeypatch):
    """The whole small U-Net gives the same output when every ResnetBlock is replaced by the functional template
    block: the additive conditioning is what the network runs, at every level."""
    torch.manual_seed(0)
    model = D.Unet(dim=16, channels=3, dim_mults=(1, 2)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        ours = model(x, t)
        monkeypatch.setattr(D.ResnetBlock, 'forward', template_resnet_block)
        theirs = model(x, t)
    torch.testing.assert_close(ours, theirs)


def test_a_template_shaped_state_dict_loads_strictly():
    """A state_dict with the template's keys and shapes (built here by name from the architecture) loads with
    strict=True into the drivers' U-Net."""
    model = D.Unet(dim=32, channels=3, dim_mults=(1, 2, 4, 8))
    template_shapes = {k: v.shape for k, v in model.state_dict().items()}
    # the shapes the template's additive mlp has: dim_out rows for every mlp.1 tensor
    for key in [k for k in template_shapes if '.mlp.1.' in k]:
        conv_key = key.replace('mlp.1.weight', 'block1.proj.weight').replace('mlp.1.bias', 'block1.proj.weight')
        assert template_shapes[key][0] == template_shapes[conv_key][0], key
    fake = {k: torch.full(s, 0.01) for k, s in template_shapes.items()}
    model.load_state_dict(fake, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# 2. Schedule numerics: float32, the template's order.

def template_schedule_float32(T=1000, beta_start=0.0001, beta_end=0.02):
    betas = torch.linspace(beta_start, beta_end, T)
    alphas = 1. - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    return dict(betas=betas, alphas=alphas, sqrt_recip_alphas=torch.sqrt(1.0 / alphas), alphas_cumprod=alphas_cumprod,
                sqrt_alphas_cumprod=torch.sqrt(alphas_cumprod),
                sqrt_one_minus_alphas_cumprod=torch.sqrt(1. - alphas_cumprod),
                alphas_cumprod_prev=alphas_cumprod_prev,
                posterior_variance=betas * (1. - alphas_cumprod_prev) / (1. - alphas_cumprod))


def test_schedule_tensors_equal_the_float32_template_formulas():
    """Every module-level tensor is allclose (default tolerances, as a grader compares) to the float32 template
    formulas, and so is DiffusionSchedule(1000)'s, bit for bit. The same formulas in float64 then cast are NOT
    allclose for two of them: the check can tell the two arithmetics apart."""
    ref = template_schedule_float32()
    sched = D.DiffusionSchedule(1000)
    for name in SCHEDULE_NAMES:
        ours = getattr(D, name)
        assert ours.dtype == torch.float32 and ours.shape == (1000,) and ours.device.type == 'cpu', name
        assert torch.allclose(ours, ref[name]), name
        assert torch.equal(getattr(sched, name), ours), name
    b64 = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    acp64 = torch.cumprod(1 - b64, 0)
    assert not torch.allclose((1 - acp64).sqrt().float(), ref['sqrt_one_minus_alphas_cumprod'])
    prev64 = F.pad(acp64[:-1], (1, 0), value=1.0)
    assert not torch.allclose((b64 * (1 - prev64) / (1 - acp64)).float(), ref['posterior_variance'])


def test_q_sample_and_p_sample_match_float32_formulas_at_small_t():
    """q_sample and p_sample at t = 0, 1, 2, 5 against the template's arithmetic on the float32 reference tensors,
    with torch.allclose at its default tolerances (where a float64 schedule fails)."""
    ref = template_schedule_float32()
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 1, 2, 5])
    col = (lambda a: a[t].view(-1, 1, 1, 1))
    expected = col(ref['sqrt_alphas_cumprod']) * x0 + col(ref['sqrt_one_minus_alphas_cumprod']) * noise
    assert torch.allclose(D.q_sample(x0, t, noise), expected)

    model = lambda x, tt: 0.3 * x + 0.1    # noqa: E731  (a known eps_theta)
    eps_coef = col(ref['betas']) / col(ref['sqrt_one_minus_alphas_cumprod'])
    mean = col(ref['sqrt_recip_alphas']) * (x0 - eps_coef * model(x0, t))
    assert torch.allclose(D.p_sample(model, x0, t, 0), mean)
    torch.manual_seed(3)
    z = torch.randn_like(x0)
    torch.manual_seed(3)
    assert torch.allclose(D.p_sample(model, x0, t, 1), mean + torch.sqrt(col(ref['posterior_variance'])) * z)


# ----------------------------------------------------------------------------------------------------------------
# 3. Module-level names are what the functions use.

def test_rebinding_a_schedule_tensor_changes_q_sample_and_p_sample(monkeypatch):
    x0, noise, t = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.tensor([10, 20])
    monkeypatch.setattr(D, 'sqrt_alphas_cumprod', torch.full((1000,), 0.5))
    assert torch.equal(D.q_sample(x0, t, noise), torch.full_like(x0, 0.5))
    monkeypatch.setattr(D, 'betas', torch.zeros(1000))
    monkeypatch.setattr(D, 'sqrt_recip_alphas', torch.full((1000,), 2.0))
    out = D.p_sample(lambda x, tt: torch.ones_like(x), x0, t, 0)   # beta 0: mean = 2 * x
    assert torch.equal(out, 2 * x0)


def test_a_students_T500_schedule_by_rebinding(monkeypatch):
    """Re-deriving the module's schedule for T = 500 (rebinding every tensor and T) makes sample() run 500 steps on
    it, and q_sample use it."""
    new = template_schedule_float32(T=500)
    for name, value in new.items():
        monkeypatch.setattr(D, name, value)
    monkeypatch.setattr(D, 'T', 500)
    x0, noise, t = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.tensor([499, 0])
    col = (lambda a: a[t].view(-1, 1, 1, 1))
    assert torch.allclose(D.q_sample(x0, t, noise),
                          col(new['sqrt_alphas_cumprod']) * x0 + col(new['sqrt_one_minus_alphas_cumprod']) * noise)
    seen = []
    real = D.p_sample

    def spy(model, x, t, t_index):
        seen.append(t_index)
        return real(model, x, t, t_index)
    monkeypatch.setattr(D, 'p_sample', spy)
    out = D.sample(_ModelWithParam(nn.Conv2d(1, 1, 1)), image_size=2, batch_size=1, channels=1)
    assert out.shape == (500, 1, 1, 2, 2) and seen == list(range(499, -1, -1))


class _ModelWithParam(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t):
        return self.inner(x)


def test_p_losses_calls_the_modules_q_sample_and_sample_calls_p_sample_loop(monkeypatch):
    calls = []
    real_q = D.q_sample

    def q_spy(x_start, t, noise=None):
        calls.append('q_sample')
        return real_q(x_start, t, noise)
    monkeypatch.setattr(D, 'q_sample', q_spy)
    model = _ModelWithParam(nn.Conv2d(3, 3, 1))
    D.p_losses(model, torch.randn(2, 3, 4, 4), torch.tensor([1, 2]))
    assert calls == ['q_sample']

    def loop_spy(model, shape, timesteps):
        calls.append(('p_sample_loop', shape, timesteps))
        return torch.zeros(timesteps, *shape)
    monkeypatch.setattr(D, 'p_sample_loop', loop_spy)
    D.sample(model, image_size=4, batch_size=2, channels=3)
    assert calls[-1] == ('p_sample_loop', (2, 3, 4, 4), 1000)


# ----------------------------------------------------------------------------------------------------------------
# 4. The device of t: the starter loop's t_sample, then p_losses with x elsewhere (meta stands in for a GPU).

def test_t_sample_returns_t_on_the_modules_device(monkeypatch):
    monkeypatch.setattr(D, 'device', 'meta')
    t = D.t_sample(1000, 8)
    assert t.device.type == 'meta' and t.shape == (8,) and t.dtype == torch.long


def test_cpu_t_with_x_and_model_on_another_device():
    """x and the model on the meta device, t on the CPU: q_sample, p_sample and p_losses move t to x's device (the
    old extract put the coefficients on t's device, and CPU (B,1,1,1) times a device tensor fails)."""
    model = D.Unet(dim=8, channels=3, dim_mults=(1, 2)).to('meta')
    x, t = torch.randn(2, 3, 8, 8, device='meta'), torch.tensor([5, 900])
    assert D.q_sample(x, t).device.type == 'meta'
    assert D.p_sample(model, x, t, 5).device.type == 'meta'
    loss = D.p_losses(model, x, t)
    assert loss.device.type == 'meta' and loss.shape == ()
    sched = D.DiffusionSchedule(50)   # buffers left on the CPU: the same rule applies
    assert sched.p_losses(model, x, torch.tensor([1, 2])).device.type == 'meta'


# ----------------------------------------------------------------------------------------------------------------
# 5. q3_misc: the notebook's return values and every form of `gpu`.

class TinyNet(nn.Module):
    def __init__(self, num_classes=10, zero_init_residual=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _pretrained_file(tmp_path):
    src = Q.SimSiam(TinyNet, dim=16, pred_dim=8)
    path = tmp_path / 'checkpoint_0099.pth.tar'
    torch.save({'state_dict': src.state_dict(), 'optimizer': {}, 'epoch': 100}, path)
    return src, str(path)


@pytest.mark.parametrize('gpu', [None, 0, '0', 'cpu', torch.device('cpu'), 'cuda', torch.device('cuda')])
def test_load_pretrained_checkpoints_returns_three_values_for_every_gpu_form(tmp_path, gpu):
    """The notebook's linear-evaluation cell: model, optimizer, start_epoch = load_pretrained_checkpoints(path,
    model, optimizer, device). The file is read onto the CPU whatever `gpu` is (the template's map_location), so
    even a CUDA device works on a CPU-only machine."""
    src, path = _pretrained_file(tmp_path)
    backbone = TinyNet(num_classes=10)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    out = M.load_pretrained_checkpoints(path, backbone, opt, gpu)
    assert isinstance(out, tuple) and len(out) == 3
    model, optimizer, start_epoch = out
    assert model is backbone and optimizer is opt and start_epoch == 0
    assert torch.equal(backbone.conv.weight, src.encoder.conv.weight)


@pytest.mark.parametrize('gpu, expected', [(None, 'cpu'), (0, 'cuda:0'), (1, 'cuda:1'), ('2', 'cuda:2'),
                                           ('cpu', 'cpu'), ('cuda', 'cuda'), ('cuda:1', 'cuda:1'),
                                           (torch.device('cpu'), 'cpu'), (torch.device('cuda', 0), 'cuda:0')])
def test_load_checkpoints_maps_every_form_of_gpu(gpu, expected):
    """The template builds 'cuda:{gpu}', which turns a device into 'cuda:cpu' / 'cuda:cuda'. Ours maps each form."""
    assert M._map_location(gpu) == torch.device(expected)


@pytest.mark.parametrize('gpu', ['cpu', torch.device('cpu'), None])
def test_load_checkpoints_loads_with_a_device_argument(tmp_path, gpu):
    src = Q.SimSiam(TinyNet, dim=16, pred_dim=8)
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / 'checkpoint.pth.tar'
    torch.save({'state_dict': src.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 7}, path)
    dst = Q.SimSiam(TinyNet, dim=16, pred_dim=8)
    model, optimizer, start_epoch = M.load_checkpoints(str(path), dst, torch.optim.SGD(dst.parameters(), lr=1), gpu)
    assert start_epoch == 7 and optimizer.param_groups[0]['lr'] == 0.1
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


def test_bad_gpu_argument_is_refused():
    with pytest.raises(TypeError):
        M._map_location(1.5)


# ----------------------------------------------------------------------------------------------------------------
# 6. knn_predict: the notebook's contract.

def test_knn_predict_takes_the_bank_as_D_by_N_like_the_notebook():
    """The notebook builds feature_bank = cat(features).t(), (D, N), and reads pred_labels[:, 0]. With D != N the old
    (N, D) layout cannot even multiply. Oracle: nearest columns by hand."""
    bank_rows = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.9, 0.2],
                                          [0.0, 0.0, 1.0]]), dim=1)                   # (N=5, D=3)
    labels = torch.tensor([0, 0, 1, 1, 2])
    queries = F.normalize(torch.tensor([[1.0, 0.05, 0.0], [0.0, 1.0, 0.1], [0.1, 0.0, 1.0]]), dim=1)
    pred = Q.knn_predict(queries, bank_rows.t().contiguous(), labels, 3, 2, 0.1)
    assert pred.shape == (3, 3) and pred[:, 0].tolist() == [0, 1, 2]
    params = list(inspect.signature(Q.knn_predict).parameters)
    assert params == ['feature', 'feature_bank', 'feature_labels', 'classes', 'knn_k', 'knn_t']
    with pytest.raises(RuntimeError):
        Q.knn_predict(queries, bank_rows[:4], labels[:4], 3, 2, 0.1)   # (N, D) with N != D: refused by matmul


# ----------------------------------------------------------------------------------------------------------------
# 7. The VAE decoder's argument name.

def test_decoder_forward_argument_is_named_input():
    dec = V.Decoder(3, 8, 4, 32)
    assert list(inspect.signature(dec.forward).parameters) == ['input']
    assert dec(input=torch.randn(2, 4)).shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------------------
# Old checkpoints of the scale/shift U-Net are refused with one line.

def _old_ddpm_checkpoint(path):
    from studylib.run import CHECKPOINT_FORMAT, rng_state
    torch.save({'format': CHECKPOINT_FORMAT, 'model_name': 'ddpm', 'model_config': {'dim': 8},
                'model': {}, 'optimizer': {}, 'epoch': 1, 'rng': rng_state(), 'extra': {}}, path)


def test_old_ddpm_checkpoint_is_refused_with_one_line(tmp_path):
    from studylib.run import load_checkpoint
    from studylib.trained import load_ddpm
    _old_ddpm_checkpoint(tmp_path / 'checkpoint.pt')
    before = (tmp_path / 'checkpoint.pt').read_bytes()
    for call in (lambda: load_checkpoint(str(tmp_path / 'checkpoint.pt')), lambda: load_ddpm(str(tmp_path), 'cpu')):
        with pytest.raises(UserError) as info:
            call()
        message = str(info.value)
        assert 'model version 1' in message and 'version 2' in message and 'scale/shift' in message
        assert '\n' not in message
    assert (tmp_path / 'checkpoint.pt').read_bytes() == before


def test_train_ddpm_resume_of_an_old_checkpoint_exits_2(tmp_path, data_dir, capsys):
    import train_ddpm
    run = tmp_path / 'old'
    os.makedirs(run)
    _old_ddpm_checkpoint(run / 'checkpoint.pt')
    with pytest.raises(SystemExit) as info:
        train_ddpm.main(['--data-dir', data_dir, '--no-download', '--out-dir', str(run), '--resume',
                         '--limit-train', '64', '--limit-test', '16', '--device', 'cpu'])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'model version 1' in err[0]


def test_new_checkpoints_record_the_model_version(tmp_path):
    from studylib.run import MODEL_VERSIONS, load_checkpoint, save_checkpoint
    model = nn.Linear(2, 2)
    save_checkpoint(str(tmp_path / 'c.pt'), model_name='ddpm', model_config={}, model=model,
                    optimizer=torch.optim.SGD(model.parameters(), lr=1), epoch=1)
    assert load_checkpoint(str(tmp_path / 'c.pt'))['model_version'] == MODEL_VERSIONS['ddpm'] == 2
