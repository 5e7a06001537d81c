"""Problem 2: a Denoising Diffusion Probabilistic Model (Ho, Jain & Abbeel, 2020) for 32x32 RGB images.

Self-contained solution module: it imports only the standard library, numpy, torch and tqdm, so a course
autograder can import it alone. Names, arguments and return values follow the assignment template (SPEC.md).
Images are (B, 3, 32, 32) tensors scaled to [-1, 1].

    forward process  q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I)                    (DDPM eq. 4)
    reverse step     p(x_{t-1} | x_t) = N(mu_theta(x_t, t), beta~_t I),
                     mu_theta = 1/sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - abar_t) * eps_theta(x_t, t))  (eq. 11)
    loss             Huber(eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t), eps),  t ~ U{0..T-1}

Index 0 of every schedule tensor is the first diffusion step (the paper's t = 1). The module-level tensors and
functions are the T = 1000 schedule of the assignment; `DiffusionSchedule(T, beta_start, beta_end)` does the same
computations for any other T (the T = 500 / 1500 study).
"""
import math
import random
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# Template constants.
train_batch_size = 64
lr = 1e-4
T = 1000
beta_start = 0.0001
beta_end = 0.02
image_size = 32
input_channels = 3
data_root = './data'
device = 'cuda' if torch.cuda.is_available() else 'cpu'


def fix_experiment_seed(seed=0):
    """Seed python, numpy and torch (CPU and every GPU) and make cuDNN pick deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------------------------------------------
# The U-Net noise predictor eps_theta(x_t, t): the template's architecture, written with plain torch reshapes.

def exists(x):
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if callable(d) else d


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args, **kwargs):
        return self.fn(x, *args, **kwargs) + x


def Upsample(dim):
    return nn.ConvTranspose2d(dim, dim, 4, 2, 1)       # (B, dim, H, W) -> (B, dim, 2H, 2W)


def Downsample(dim):
    return nn.Conv2d(dim, dim, 4, 2, 1)                # (B, dim, H, W) -> (B, dim, H/2, W/2)


class SinusoidalPositionEmbeddings(nn.Module):
    """The Transformer's sinusoidal encoding of the (integer) time step: (B,) -> (B, dim)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, time):
        half_dim = self.dim // 2
        freqs = torch.exp(torch.arange(half_dim, device=time.device) * (-math.log(10000) / (half_dim - 1)))
        args = time[:, None].float() * freqs[None, :]                  # (B, half_dim)
        return torch.cat((args.sin(), args.cos()), dim=-1)             # (B, dim)


class Block(nn.Module):
    """conv 3x3 -> GroupNorm -> optional FiLM (x * (scale + 1) + shift) from the time embedding -> SiLU."""

    def __init__(self, dim, dim_out, groups=8):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if exists(scale_shift):
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two Blocks with a residual connection; the time embedding scales and shifts the first (Wide ResNet style)."""

    def __init__(self, dim, dim_out, *, time_emb_dim=None, groups=8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2)) if exists(time_emb_dim) else None
        self.block1 = Block(dim, dim_out, groups=groups)
        self.block2 = Block(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb=None):
        scale_shift = None
        if exists(self.mlp) and exists(time_emb):
            time_emb = self.mlp(time_emb)[:, :, None, None]            # (B, 2*dim_out, 1, 1)
            scale_shift = time_emb.chunk(2, dim=1)
        h = self.block1(x, scale_shift=scale_shift)
        h = self.block2(h)
        return h + self.res_conv(x)


class Attention(nn.Module):
    """Multi-head softmax self-attention over the H*W positions."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))  # (B, h, d, n)
        q = q * self.scale
        sim = torch.einsum('bhdi,bhdj->bhij', q, k)                    # (B, heads, n, n)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        out = torch.einsum('bhij,bhdj->bhid', attn, v)                 # (B, heads, n, d)
        out = out.permute(0, 1, 3, 2).reshape(b, -1, h, w)             # (B, heads*d, H, W)
        return self.to_out(out)


class LinearAttention(nn.Module):
    """Attention linear in H*W (Shen et al., 2021): softmax over features for q, over positions for k."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))  # (B, h, d, n)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum('bhdn,bhen->bhde', k, v)                # (B, heads, d, d)
        out = torch.einsum('bhde,bhdn->bhen', context, q)              # (B, heads, d, n)
        return self.to_out(out.reshape(b, -1, h, w))


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.fn = fn
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x):
        return self.fn(self.norm(x))


class Unet(nn.Module):
    def __init__(self, dim, init_dim=None, out_dim=None, dim_mults=(1, 2, 4, 8), channels=3, with_time_emb=True,
                 resnet_block_groups=8):
        super().__init__()
        self.channels = channels
        init_dim = default(init_dim, dim // 3 * 2)
        self.init_conv = nn.Conv2d(channels, init_dim, 7, padding=3)
        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        block_klass = partial(ResnetBlock, groups=resnet_block_groups)

        if with_time_emb:
            time_dim = dim * 4
            self.time_mlp = nn.Sequential(SinusoidalPositionEmbeddings(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                          nn.Linear(time_dim, time_dim))
        else:
            time_dim = None
            self.time_mlp = None

        self.downs = nn.ModuleList([])
        self.ups = nn.ModuleList([])
        num_resolutions = len(in_out)
        for ind, (dim_in, dim_out) in enumerate(in_out):
            is_last = ind >= num_resolutions - 1
            self.downs.append(nn.ModuleList([
                block_klass(dim_in, dim_out, time_emb_dim=time_dim),
                block_klass(dim_out, dim_out, time_emb_dim=time_dim),
                Residual(PreNorm(dim_out, LinearAttention(dim_out))),
                Downsample(dim_out) if not is_last else nn.Identity(),
            ]))

        mid_dim = dims[-1]
        self.mid_block1 = block_klass(mid_dim, mid_dim, time_emb_dim=time_dim)
        self.mid_attn = Residual(PreNorm(mid_dim, Attention(mid_dim)))
        self.mid_block2 = block_klass(mid_dim, mid_dim, time_emb_dim=time_dim)

        for ind, (dim_in, dim_out) in enumerate(reversed(in_out[1:])):
            is_last = ind >= num_resolutions - 1
            self.ups.append(nn.ModuleList([
                block_klass(dim_out * 2, dim_in, time_emb_dim=time_dim),
                block_klass(dim_in, dim_in, time_emb_dim=time_dim),
                Residual(PreNorm(dim_in, LinearAttention(dim_in))),
                Upsample(dim_in) if not is_last else nn.Identity(),
            ]))

        out_dim = default(out_dim, channels)
        self.final_conv = nn.Sequential(block_klass(dim, dim), nn.Conv2d(dim, out_dim, 1))

    def forward(self, x, time):
        x = self.init_conv(x)                                          # (B, init_dim, H, W)
        t = self.time_mlp(time) if exists(self.time_mlp) else None     # (B, 4*dim)
        h = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t)
            x = block2(x, t)
            x = attn(x)
            h.append(x)
            x = downsample(x)
        x = self.mid_block1(x, t)                                      # (B, 8*dim, H/8, W/8) for the defaults
        x = self.mid_attn(x)
        x = self.mid_block2(x, t)
        for block1, block2, attn, upsample in self.ups:
            x = torch.cat((x, h.pop()), dim=1)                         # skip connection
            x = block1(x, t)
            x = block2(x, t)
            x = attn(x)
            x = upsample(x)
        return self.final_conv(x)                                      # (B, out_dim, H, W)


# ----------------------------------------------------------------------------------------------------------------
# The diffusion: schedule, forward process, reverse process, loss.

def linear_beta_schedule(beta_start, beta_end, timesteps, dtype=torch.float32):
    return torch.linspace(beta_start, beta_end, timesteps, dtype=dtype)


def extract(a, t, x_shape):
    """a[t] for a batch of time indices t (B,), shaped (B, 1, ..., 1) to broadcast against x, on t's device."""
    out = a.gather(-1, t.to(a.device))
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1))).to(t.device)


class DiffusionSchedule(nn.Module):
    """The linear-beta DDPM for one T: schedule tensors (computed in float64, stored float32 as buffers, so that
    .to(device) moves them) and the forward/reverse computations on them."""

    def __init__(self, timesteps=T, beta_start=beta_start, beta_end=beta_end):
        super().__init__()
        self.timesteps = timesteps
        betas = linear_beta_schedule(beta_start, beta_end, timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        schedule = {
            'betas': betas,
            'alphas': alphas,
            'sqrt_recip_alphas': 1.0 / alphas.sqrt(),
            'alphas_cumprod': alphas_cumprod,
            'sqrt_alphas_cumprod': alphas_cumprod.sqrt(),
            'sqrt_one_minus_alphas_cumprod': (1.0 - alphas_cumprod).sqrt(),
            'alphas_cumprod_prev': alphas_cumprod_prev,
            # beta~_t of DDPM eq. 7: the variance of q(x_{t-1} | x_t, x_0), 0 at the first step.
            'posterior_variance': betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        }
        for name, value in schedule.items():
            self.register_buffer(name, value.float(), persistent=False)

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) in one step (DDPM eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    @torch.no_grad()
    def p_sample(self, model, x, t, t_index):
        """One reverse step x_t -> x_{t-1} (DDPM Algorithm 2, sigma_t^2 = beta~_t); the mean alone at t_index 0."""
        betas_t = extract(self.betas, t, x.shape)
        sqrt_one_minus_alphas_cumprod_t = extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape)
        sqrt_recip_alphas_t = extract(self.sqrt_recip_alphas, t, x.shape)
        model_mean = sqrt_recip_alphas_t * (x - betas_t * model(x, t) / sqrt_one_minus_alphas_cumprod_t)
        if t_index == 0:
            return model_mean
        posterior_std_t = extract(self.posterior_variance, t, x.shape).sqrt()   # the std, not the variance
        return model_mean + posterior_std_t * torch.randn_like(x)

    @torch.no_grad()
    def p_sample_loop(self, model, shape, timesteps=None):
        """Every step of the reverse process from pure noise, stacked on the CPU: (timesteps, *shape)."""
        return torch.stack(list(self.reverse_steps(model, torch.randn(shape, device=_device_of(model)),
                                                   default(timesteps, self.timesteps), keep='cpu')))

    @torch.no_grad()
    def sample(self, model, shape, progress=False):
        """x_0 alone, from pure noise: the same chain as p_sample_loop without keeping T copies of the batch."""
        x = torch.randn(shape, device=_device_of(model))
        for x in self.reverse_steps(model, x, self.timesteps, progress=progress):
            pass
        return x

    def reverse_steps(self, model, x, start, keep=None, progress=False):
        """Yield x_{i-1} for i = start ... 1 (time indices start-1 ... 0), starting from x = x_start."""
        steps = reversed(range(start))
        if progress:
            steps = tqdm(steps, total=start, desc='sampling', leave=False)
        for i in steps:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = self.p_sample(model, x, t, i)
            yield x.cpu() if keep == 'cpu' else x

    def p_losses(self, denoise_model, x_start, t):
        """Huber (smooth L1, delta 1) between the true noise and the model's prediction of it, batch mean."""
        noise = torch.randn_like(x_start)
        x_noisy = self.q_sample(x_start, t, noise)
        predicted_noise = denoise_model(x_noisy, t)
        return F.smooth_l1_loss(predicted_noise, noise)

    def t_sample(self, batch_size, device=None):
        return torch.randint(0, self.timesteps, (batch_size,), device=device)


def _device_of(model):
    return next(model.parameters()).device


# The assignment's T = 1000 schedule: module-level names for the autograder, the very tensors of this object.
schedule = DiffusionSchedule(T, beta_start, beta_end)
betas = schedule.betas
alphas = schedule.alphas
sqrt_recip_alphas = schedule.sqrt_recip_alphas
alphas_cumprod = schedule.alphas_cumprod
sqrt_alphas_cumprod = schedule.sqrt_alphas_cumprod
sqrt_one_minus_alphas_cumprod = schedule.sqrt_one_minus_alphas_cumprod
alphas_cumprod_prev = schedule.alphas_cumprod_prev
posterior_variance = schedule.posterior_variance


def q_sample(x_start, t, noise=None):
    return schedule.q_sample(x_start, t, noise)


@torch.no_grad()
def p_sample(model, x, t, t_index):
    return schedule.p_sample(model, x, t, t_index)


@torch.no_grad()
def p_sample_loop(model, shape, timesteps):
    return schedule.p_sample_loop(model, shape, timesteps)


@torch.no_grad()
def sample(model, image_size, batch_size=16, channels=3):
    return p_sample_loop(model, shape=(batch_size, channels, image_size, image_size), timesteps=T)


def p_losses(denoise_model, x_start, t):
    return schedule.p_losses(denoise_model, x_start, t)


def t_sample(timesteps, batch_size):
    """(batch_size,) time indices drawn uniformly from {0, ..., timesteps - 1}."""
    return torch.randint(0, timesteps, (batch_size,))
