"""The prepared GPU check: every CUDA-only path of the project, on one GPU, in about four minutes.

    python scripts/gpu_check.py --out plots/bench/gpu_check.md          # on a GPU box (one GPU is enough)
    python scripts/gpu_check.py --dry-run --out /tmp/gpu_check.md       # toy sizes on the CPU (what CI runs)

It makes its own small datasets in the standard file layouts (random pixels: the checkout travels without the
real ones), then runs, each in its own process with a time limit:
  1. the CUDA-only tests (`pytest -m cuda`);
  2. the course notebook's DDPM loop: t = t_sample(T, B), loss = p_losses(model, x_on_gpu, t), then sample();
  3. each driver for two short epochs with the defaults a GPU user gets (--amp auto = bf16, channels_last, fused
     optimisers), whose per-epoch times give the images/s of the projections;
  4. the VAE once with --compile;
  5. torchrun --nproc_per_node=1 (nccl; gloo in a dry run): a straight VAE run, and the same run SIGKILLed in
     epoch 2 and resumed with --resume, with deterministic algorithms switched on. The final weights must be
     bitwise equal; where a kernel has no deterministic version (torch only warns: warn_only), the difference
     is held to the bound 2 * lr * steps-after-the-kill (Adam moves a weight by at most about lr per step, so two
     runs whose gradients differ only by rounding cannot drift further apart);
  6. a short bench.py --device cuda.
and writes one markdown table of pass/fail and timings (--out), with the full logs beside it (--log).
A dry run (--dry-run, or no CUDA) shrinks every size, uses gloo and lists what it skipped; the CI test runs it.
"""
import argparse
import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# sizes: (GPU check, dry run)
SIZES = {
    'svhn_train': (4096, 256), 'svhn_test': (512, 64),
    'cifar_train': (10240, 320), 'cifar_test': (1024, 64),
}
LR_VAE = 1e-4            # the VAE driver's default --lr (the resume test's drift bound uses it)
BUDGET_SECONDS = 240     # the check's target wall time on one GPU; bench.py gets what is left of it


# ---------------------------------------------------------------------------------------------------------------
# data in the standard layouts

def make_data(folder, dry):
    """SVHN train/test_32x32.mat and CIFAR-10's cifar-10-batches-py pickles, random pixels, balanced labels."""
    from scipy.io import savemat
    rng = np.random.default_rng(0)
    k = 1 if dry else 0
    for split in ('train', 'test'):
        n = SIZES[f'svhn_{split}'][k]
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)          # 1..10, 10 meaning digit 0
        savemat(os.path.join(folder, f'{split}_32x32.mat'), {'X': x, 'y': y})
    cifar = os.path.join(folder, 'cifar-10-batches-py')
    os.makedirs(cifar, exist_ok=True)
    n_train, n_test = SIZES['cifar_train'][k], SIZES['cifar_test'][k]
    for name, n in [(f'data_batch_{i}', n_train // 5) for i in range(1, 6)] + [('test_batch', n_test)]:
        batch = {b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), b'labels': [i % 10 for i in range(n)]}
        with open(os.path.join(cifar, name), 'wb') as f:
            pickle.dump(batch, f)


# ---------------------------------------------------------------------------------------------------------------
# one in-process step, run as `gpu_check.py --step notebook DEVICE`

def notebook_loop(device):
    """The starter notebook's training cell and sampling call, as a student runs them against ddpm_solution."""
    import torch
    import ddpm_solution as D
    D.device = device   # the module picks 'cuda' by itself on a GPU box; the dry run points it at the CPU
    if device == 'cpu':
        D.T = 20        # toy size: sample() runs T steps (the schedule tensors keep their 1000 entries)
    model = D.Unet(dim=D.image_size, channels=D.input_channels, dim_mults=(1, 2, 4, 8)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=D.lr)
    x = torch.rand(8, 3, 32, 32, device=device) * 2 - 1
    for _ in range(3):
        optimizer.zero_grad()
        t = D.t_sample(D.T, x.shape[0])
        loss = D.p_losses(model, x, t)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss), loss
    steps = D.sample(model, image_size=D.image_size, batch_size=2, channels=D.input_channels)
    assert steps.shape == (D.T, 2, 3, 32, 32) and torch.isfinite(steps[-1]).all()
    print(f'notebook loop ok: loss {loss.item():.4f}, sample() {tuple(steps.shape)} on {device}')


# ---------------------------------------------------------------------------------------------------------------
# the check

class Check:
    def __init__(self, dry, log_path):
        self.dry, self.rows, self.log = dry, [], open(log_path, 'w')
        self.t0 = time.monotonic()
        self.env = dict(os.environ, PYTHONUNBUFFERED='1', CUBLAS_WORKSPACE_CONFIG=':4096:8')
        if dry:
            self.env['OMP_NUM_THREADS'] = '1'

    def elapsed(self):
        return time.monotonic() - self.t0

    def run(self, name, cmd, timeout, note=''):
        """Run one step in its own process; record pass/fail, seconds and the last line of its error output."""
        self.log.write(f'\n===== {name}: {" ".join(cmd)}\n')
        self.log.flush()
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
            ok, out, err = proc.returncode == 0, proc.stdout, proc.stderr
            status = 'pass' if ok else f'FAIL (exit {proc.returncode})'
        except subprocess.TimeoutExpired as exc:
            ok, out, err = False, _text(exc.stdout), _text(exc.stderr)
            status = f'FAIL (over its {timeout} s limit)'
        seconds = time.monotonic() - start
        self.log.write(out[-20000:] + '\n----- stderr\n' + err[-20000:] + '\n')
        self.log.flush()
        if not ok:
            last = [line for line in err.strip().splitlines() if line.strip()][-1:] or ['']
            note = (note + ' ' if note else '') + last[0][:200]
        self.record(name, status, seconds, note)
        return ok, out

    def record(self, name, status, seconds, note=''):
        self.rows.append(dict(step=name, status=status, seconds=round(seconds, 1), note=note))
        print(f'[{self.elapsed():6.1f} s] {name}: {status} ({seconds:.1f} s) {note}', flush=True)

    def skip(self, name, why):
        self.record(name, 'skipped', 0.0, why)


def _text(b):
    return b.decode(errors='replace') if isinstance(b, bytes) else (b or '')


def epoch_rate(run_dir, images):
    """images/s of the last logged epoch (the first carries the warm-up: cuDNN autotuning, allocator)."""
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return images / rows[-1]['seconds'], rows


def torchrun(nproc=1):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']


def kill_in_epoch(cmd, env, checkpoint, epoch, timeout):
    """Start cmd in its own process group, SIGKILL the whole group once checkpoint.pt holds a mid-epoch state of
    `epoch`. Returns the step it was killed at, or None when the run ended first."""
    import torch
    # output to nowhere: a pipe nobody reads would fill up with progress bars and stall the run
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                mid = torch.load(checkpoint, weights_only=True)['extra'].get('mid_epoch')
            except Exception:   # not written yet, or being replaced
                mid = None
            if mid is not None and mid['epoch'] == epoch:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return mid['step']
            time.sleep(0.01)
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def compare_weights(a, b):
    """(bitwise equal, max |difference|) of two checkpoints' weights."""
    import torch
    wa, wb = (torch.load(p, weights_only=True)['model'] for p in (a, b))
    same = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) if wa.keys() == wb.keys() else None
    return same, diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='gpu_check.md', help='markdown table of the results')
    parser.add_argument('--log', default=None, help='full output of every step (default: beside --out)')
    parser.add_argument('--dry-run', action='store_true', help='toy sizes on the CPU, gloo; what CI runs')
    parser.add_argument('--keep', default=None, help='keep the data and run folders here (default: a temp dir)')
    parser.add_argument('--step', nargs=2, metavar=('NAME', 'DEVICE'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        return notebook_loop(args.step[1])

    import torch
    dry = args.dry_run or not torch.cuda.is_available()
    device = 'cpu' if dry else 'cuda'
    work = args.keep or tempfile.mkdtemp(prefix='gpu_check_')
    data, runs = os.path.join(work, 'data'), os.path.join(work, 'runs')
    os.makedirs(data, exist_ok=True)
    os.makedirs(runs, exist_ok=True)
    log_path = args.log or os.path.splitext(args.out)[0] + '.log'
    check = Check(dry, log_path)
    gpu = 'dry run on the CPU' if dry else torch.cuda.get_device_name(0)
    print(f'gpu_check: {gpu}; torch {torch.__version__}; work folder {work}', flush=True)

    t = time.monotonic()
    make_data(data, dry)
    check.record('datasets in the standard layouts (random pixels)', 'pass', time.monotonic() - t)
    common = ['--data-dir', data, '--no-download', '--device', device]

    # 1. CUDA-only tests
    if dry:
        check.skip('CUDA-only tests (pytest -m cuda)', 'no CUDA device')
    else:
        check.run('CUDA-only tests (pytest -m cuda)',
                  [sys.executable, '-m', 'pytest', '-q', '-m', 'cuda', '-p', 'no:cacheprovider', 'tests'], 150)

    # 2. the notebook's DDPM loop
    check.run("notebook DDPM loop: t_sample, p_losses(model, x on the device, t), sample()",
              [sys.executable, os.path.abspath(__file__), '--step', 'notebook', device], 180 if dry else 60)

    rates = check_drivers(check, common, runs, dry)            # 3. each driver with a GPU user's defaults
    check_compile(check, common, runs, dry)                    # 4. --compile
    check_resume(check, common, runs, dry)                     # 5. torchrun, SIGKILL, --resume
    if dry:                                                    # 6. bench.py
        check.skip('bench.py --device cuda', 'no CUDA device')
    else:
        left = max(30, int(BUDGET_SECONDS - check.elapsed()))
        ok, out = check.run('bench.py --device cuda --repeats 3', [sys.executable, 'bench.py', '--device', 'cuda',
                                                                    '--repeats', '3', '--workers', '4'], left)
        if ok:
            rates['bench'] = out.strip().splitlines()[-40:]

    write_report(args.out, check, gpu, torch.__version__, rates, dry)
    failed = [r for r in check.rows if r['status'].startswith('FAIL')]
    print(f'gpu_check: {len(check.rows) - len(failed)} of {len(check.rows)} steps passed or skipped, '
          f'{check.elapsed():.0f} s; table: {args.out}', flush=True)
    return 1 if failed else 0


def vae_args(common, dry):
    k = 1 if dry else 0
    return common + ['--epochs', '2', '--limit-test', str(SIZES['svhn_test'][k]), '--ll-k', '10',
                     '--profile-per-class', '10']


def check_drivers(check, common, runs, dry):
    """Each driver with a GPU user's defaults (toy sizes in a dry run); returns their measured rates."""
    k = 1 if dry else 0
    rates = {}
    n_svhn, n_cifar = SIZES['svhn_train'][k], SIZES['cifar_train'][k]
    ok, _ = check.run('train_vae.py, GPU defaults (--amp auto, channels_last, fused Adam)',
                      [sys.executable, 'train_vae.py', *vae_args(common, dry), '--out-dir', os.path.join(runs, 'vae')],
                      240)
    if ok:
        rates['vae'] = epoch_rate(os.path.join(runs, 'vae'), n_svhn)[0]
    ddpm_args = common + ['--epochs', '2', '--sample-every', '2']
    if dry:
        ddpm_args += ['--timesteps', '20', '--num-samples', '4', '--quality-samples', '4', '--limit-test', '32']
    ok, _ = check.run('train_ddpm.py, GPU defaults (T=1000, 64 samples, final stage)' if not dry else
                      'train_ddpm.py (toy: T=20)',
                      [sys.executable, 'train_ddpm.py', *ddpm_args, '--out-dir', os.path.join(runs, 'ddpm')], 300)
    if ok:
        rates['ddpm'], rows = epoch_rate(os.path.join(runs, 'ddpm'), n_svhn)
        rates['ddpm_sample_seconds'] = rows[-1].get('sample_seconds')
        rates['ddpm_sample_what'] = '4 images, T=20' if dry else '64 images, T=1000'
    ss_args = common + ['--epochs', '2']
    if dry:
        ss_args += ['--batch-size', '32', '--dim', '64', '--pred-dim', '16', '--knn-k', '10']
    ok, _ = check.run('train_simsiam.py, GPU defaults (tuned recipe, batch 512, on-device augmentation)',
                      [sys.executable, 'train_simsiam.py', *ss_args, '--out-dir', os.path.join(runs, 'simsiam')], 240)
    if ok:
        rates['simsiam'] = epoch_rate(os.path.join(runs, 'simsiam'), n_cifar - n_cifar % (32 if dry else 512))[0]
    return rates


def check_compile(check, common, runs, dry):
    if dry:
        check.skip('train_vae.py --compile', 'dry run: compilation takes minutes on a CPU (tests/test_speed_paths.py '
                   'compiles each driver there)')
    else:
        check.run('train_vae.py --compile', [sys.executable, 'train_vae.py', *vae_args(common, dry), '--epochs', '1',
                                             '--compile', '--out-dir', os.path.join(runs, 'vae-compile')], 240)


def check_resume(check, common, runs, dry):
    """torchrun, a SIGKILL in epoch 2 and --resume: the resumed weights are the straight run's (to a drift bound
    where the GPU's kernels are not deterministic)."""
    backend = 'gloo' if dry else 'nccl'
    env_det = dict(check.env, STUDYLIB_DETERMINISTIC='1')
    n_resume = 1024 if not dry else 256
    resume_args = [*common, '--epochs', '2', '--limit-train', str(n_resume), '--limit-test', '64', '--ll-k', '2',
                   '--profile-per-class', '2', '--batch-size', '16', '--checkpoint-every', '2', '--sample-every', '5']
    straight, killed = os.path.join(runs, 'resume-straight'), os.path.join(runs, 'resume-killed')
    check.env = env_det
    ok_straight, _ = check.run(f'torchrun --nproc_per_node=1 ({backend}) VAE, straight',
                               [*torchrun(), 'train_vae.py', *resume_args, '--out-dir', straight], 240)
    t = time.monotonic()
    step = kill_in_epoch([*torchrun(), 'train_vae.py', *resume_args, '--out-dir', killed], env_det,
                         os.path.join(killed, 'checkpoint.pt'), 2, 240)
    if step is None:
        check.record(f'torchrun ({backend}) VAE, SIGKILL in epoch 2', 'FAIL (ended before it could be killed)',
                     time.monotonic() - t)
    else:
        check.record(f'torchrun ({backend}) VAE, SIGKILL in epoch 2', 'pass', time.monotonic() - t,
                     f'killed after step {step} of {n_resume // 16}')
        ok_resume, _ = check.run(f'torchrun ({backend}) VAE, --resume',
                                 [*torchrun(), 'train_vae.py', *resume_args, '--out-dir', killed, '--resume'], 240)
        if ok_straight and ok_resume:
            same, diff = compare_weights(os.path.join(straight, 'checkpoint.pt'), os.path.join(killed, 'checkpoint.pt'))
            bound = 2 * LR_VAE * (n_resume // 16 - step)
            status = 'pass' if same or (diff is not None and diff <= bound) else 'FAIL'
            check.record('resumed weights vs straight run', status, 0.0,
                         'bitwise equal' if same else f'max |diff| {diff:.3g} (bound 2*lr*steps = {bound:.3g})')
    check.env = {key: v for key, v in env_det.items() if key != 'STUDYLIB_DETERMINISTIC'}


def write_report(path, check, gpu, torch_version, rates, dry):
    lines = [f'# GPU check: {gpu}', '',
             f'`python scripts/gpu_check.py{" --dry-run" if dry else ""}`, torch {torch_version}, Python '
             f'{platform.python_version()}, {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; '
             f'{check.elapsed():.0f} s in all. Datasets: random pixels in the standard layouts.', '',
             '| step | result | seconds | note |', '|---|---|---|---|']
    lines += [f'| {r["step"]} | {r["status"]} | {r["seconds"]} | {r["note"]} |' for r in check.rows]
    if any(k in rates for k in ('vae', 'ddpm', 'simsiam')):
        lines += ['', 'Training throughput of the drivers, second epoch (images/s, from metrics.jsonl):', '']
        lines += [f'- {name}: {rates[name]:.0f} images/s' for name in ('vae', 'ddpm', 'simsiam') if name in rates]
        if rates.get('ddpm_sample_seconds'):
            lines.append(f'- DDPM: sampling {rates["ddpm_sample_what"]} ancestral steps, took '
                         f'{rates["ddpm_sample_seconds"]:.1f} s')
    if 'bench' in rates:
        lines += ['', 'bench.py output:', '', '```', *rates['bench'], '```']
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.splitext(path)[0] + '.json', 'w') as f:
        json.dump(dict(device=gpu, rows=check.rows, rates={k: v for k, v in rates.items() if k != 'bench'}), f,
                  indent=2)


if __name__ == '__main__':
    sys.exit(main())
