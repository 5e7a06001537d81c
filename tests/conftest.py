import contextlib
import os
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Trained digit nets (studylib.digit_net) are cached beside the test data, or for this session only without it, never
# in the user's own cache folder.
if not os.environ.get('STUDYLIB_CACHE'):
    os.environ['STUDYLIB_CACHE'] = (os.path.join(os.environ['DATA_DIR'], '.studylib-cache')
                                    if os.environ.get('DATA_DIR') else tempfile.mkdtemp(prefix='studylib-cache-'))

# The suite runs on 2-core CI machines; oversubscribing threads only slows every test down.
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with the reason, on a machine without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device (scripts/gpu_check.py runs these on a GPU box)')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def tf32_off():
    """float32 convolutions and matmuls in full float32 on the GPU: cuDNN may otherwise run them in TF32 (10-bit
    mantissa, ~5e-4 relative), which a CPU-vs-GPU comparison at 1e-4 cannot absorb once a sampler amplifies it.
    The previous settings are restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def no_tf32():
    with tf32_off():
        yield


@pytest.fixture(scope='session')
def data_dir():
    """The folder with the real dataset files (set by .ci/run); tests that need it skip, visibly, without it."""
    path = os.environ.get('DATA_DIR')
    if not path:
        pytest.skip('DATA_DIR is not set: real-data tests need the standard dataset files '
                    '(.ci/run writes them with ../shared/data/prepare.py)')
    if not os.path.isdir(path):
        pytest.skip(f'DATA_DIR={path} is not a folder')
    return path


@pytest.fixture
def isolated_torch_state():
    """One torch thread and the global RNG restored afterwards: the maths tests neither leak seeds into each other
    nor oversubscribe a shared CPU (two threads per process made tiny convolutions ~50x slower there)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(n_threads)


def run_script(script, args, **popen):
    """A driver in a subprocess with one torch thread (so that runs compared bit for bit use the same kernels)."""
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def stop_mid_epoch(proc, checkpoint, epoch, signum, timeout=300):
    """Send `signum` to the driver once its checkpoint is a mid-epoch one of `epoch`; returns (returncode, stderr)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f'the run ended before it could be stopped: {proc.stderr.read()[-2000:]}')
        try:
            mid = torch.load(checkpoint, weights_only=True)['extra'].get('mid_epoch')
        except (FileNotFoundError, RuntimeError, EOFError):
            mid = None
        if mid is not None and mid['epoch'] == epoch:
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=120)
            return proc.returncode, err
        time.sleep(0.05)
    proc.kill()
    raise AssertionError('no mid-epoch checkpoint appeared in time')


def assert_same_weights(a, b):
    """Two checkpoints hold bit-identical model (and EMA, when present) weights."""
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert ca['epoch'] == cb['epoch'] and ca['extra'].get('mid_epoch') is None is cb['extra'].get('mid_epoch')
    for key in ca['model']:
        assert torch.equal(ca['model'][key], cb['model'][key]), key
    if ca['extra'].get('ema') is not None:
        for key in ca['extra']['ema']:
            assert torch.equal(ca['extra']['ema'][key], cb['extra']['ema'][key]), key


def stop_resume_compare(script, args, tmp_path, epoch, signum):
    """Run the driver straight to the end (folder a) and again stopped by `signum` inside `epoch`, then resumed
    with --resume (folder b); the two must end with identical weights. Returns the stopped run's (code, stderr)."""
    straight = run_script(script, args + ['--out-dir', str(tmp_path / 'a')])
    stopped = run_script(script, args + ['--out-dir', str(tmp_path / 'b')])
    code, err = stop_mid_epoch(stopped, tmp_path / 'b' / 'checkpoint.pt', epoch, signum)
    mid = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)['extra']['mid_epoch']
    assert mid['epoch'] == epoch and mid['step'] > 0
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    resumed = run_script(script, args + ['--out-dir', str(tmp_path / 'b'), '--resume'])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_weights(tmp_path / 'a' / 'checkpoint.pt', tmp_path / 'b' / 'checkpoint.pt')
    return code, err


@pytest.fixture
def tiny_svhn(tmp_path, monkeypatch):
    """A small SVHN folder in the standard layout (48 training, 32 test images of random pixels, labels cycling
    through the ten digits) and an empty digit-net cache folder of this test's own."""
    import numpy as np
    from scipy.io import savemat
    monkeypatch.setenv('STUDYLIB_CACHE', str(tmp_path / 'cache'))
    data = tmp_path / 'data'
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (('train_32x32.mat', 48), ('test_32x32.mat', 32)):
        savemat(data / name, {'X': rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                              'y': (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)})
    return str(data)


def read_only_cache(monkeypatch):
    """Saving into the digit-net cache folder fails as on a read-only file system (EROFS; CI runs as root, where
    file modes stop nothing); every other torch.save works."""
    import errno
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).startswith(os.environ['STUDYLIB_CACHE']):
            raise OSError(errno.EROFS, 'Read-only file system', str(f))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', save)


def snapshot(*paths):
    """{file path: bytes} of every file under the paths (a missing path: nothing), for byte-identity checks."""
    files = {}
    for top in paths:
        if os.path.isfile(top):
            files[top] = open(top, 'rb').read()
        for root, _, names in os.walk(top):
            for name in names:
                path = os.path.join(root, name)
                files[path] = open(path, 'rb').read()
    return files
