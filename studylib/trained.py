"""Rebuild the trained models of finished run folders from their checkpoints alone (no training script needed)."""
import ddpm_solution
import vae_solution

from .run import load_trained


def load_vae(run_dir, device, flag='--compare-vae'):
    """The final VAE of a train_vae.py run folder, rebuilt from its checkpoint alone: (model, epoch)."""
    ckpt = load_trained(run_dir, 'vae', flag)
    model = vae_solution.VAE(**ckpt['model_config'], device=device)
    model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), ckpt['epoch']


def load_ddpm(run_dir, device, flag='--ddpm'):
    """The final U-Net and its schedule of a train_ddpm.py run folder: (model, diffusion, epoch)."""
    ckpt = load_trained(run_dir, 'ddpm', flag)
    config = dict(ckpt['model_config'])
    diffusion = ddpm_solution.DiffusionSchedule(**{k: config.pop(k) for k in ('timesteps', 'beta_start', 'beta_end')})
    model = ddpm_solution.Unet(**config)
    model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), diffusion.to(device), ckpt['epoch']
