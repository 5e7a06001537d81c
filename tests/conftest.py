import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The suite runs on 2-core CI machines; oversubscribing threads only slows every test down.
torch.set_num_threads(min(2, torch.get_num_threads()))


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
