"""The study tools against hostile inputs: compare_ddpm.py, probe_ddpm.py and make_report.py.

Every user error or environment failure must be ONE line on stderr ('error: ...', naming the file or flag and the
fix), exit status 2, no traceback, and leave every existing file as it was: the input run folders byte for byte,
a finished output folder, the previous report. Every malformed input is made here: fake run folders with a
summary.json and small matplotlib PNGs, and for the probe tiny real checkpoints (a U-Net of dim 8, a VAE of 4
features) so that it gets past loading the models.
"""
import builtins
import errno
import fcntl
import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import compare_ddpm
import ddpm_solution
import make_report
import probe_ddpm
import vae_solution
from studylib.run import save_checkpoint
from tests.conftest import ROOT, snapshot

# What compare reads of a train_ddpm.py summary (and a few more of its metrics, as a real one holds).
DDPM_METRICS = {
    'epochs': 2, 'timesteps': 1000, 'num_train': 64, 'seconds_per_epoch_mean': 12.5, 'sample_seconds': 3.25,
    'sample_batch': 16, 't_star': 250, 'digit_fd': 4.5, 'digit_confidence': 0.61, 'reference_digit_fd': 0.9,
    'reference_digit_confidence': 0.93, 'vae_digit_fd': 6.0, 'device': 'cpu (test)',
}
DDPM_FIGURES = {'2.2a': ['2.2a_training_time.png'], '2.2b': ['2.2b_samples_epoch002.png'],
                '2.2c': ['2.2c_tprime_sweep.png', '2.2c_tprime_psnr.png'], '2.2d': ['2.2d_final_samples.png']}


# ------------------------------------------------------------------------------------------------------- helpers

def png(path, shade=0.3):
    """A small real PNG, written by matplotlib."""
    import matplotlib.image
    rgb = np.zeros((24, 40, 3))
    rgb[..., 0], rgb[:, ::4, 1], rgb[..., 2] = shade, 1.0, np.linspace(0, 1, 40)
    matplotlib.image.imsave(path, rgb)


def write_run(folder, summary, figures=(), extra=None):
    """A run folder: summary.json (an object is dumped; str/bytes are written as they are), config.json, figures."""
    os.makedirs(folder, exist_ok=True)
    for name in figures:
        png(os.path.join(folder, name))
    if isinstance(summary, bytes):
        data = summary
    elif isinstance(summary, str):
        data = summary.encode()
    else:
        data = json.dumps(summary).encode()
    with open(os.path.join(folder, 'summary.json'), 'wb') as f:
        f.write(data)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({'model': 'fake', 'command': 'made by the test'}, f)
    for name, content in (extra or {}).items():
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(content)
    return str(folder)


def ddpm_summary(**metrics):
    return {'model': 'ddpm', 'figures': DDPM_FIGURES, 'metrics': {**DDPM_METRICS, **metrics},
            'run': {'command': 'python train_ddpm.py', 'device_name': 'cpu (test)', 'git_commit': 'abc123'}}


def fake_ddpm_run(folder, timesteps=1000, **metrics):
    """A finished train_ddpm.py run folder as compare and make_report read it (no checkpoint)."""
    return write_run(folder, ddpm_summary(timesteps=timesteps, **metrics),
                     [n for names in DDPM_FIGURES.values() for n in names])


def one_line_error(capsys, tool, argv):
    """Run tool.main(argv) in-process: it must exit 2 with exactly one stderr line 'error: ...'; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        tool.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


def help_of(*command):
    """`python COMMAND --help` run from the repository root: (exit status, usage line, the help after the usage)."""
    result = subprocess.run([sys.executable, *command, '--help'], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, COLUMNS='120'))
    usage, _, rest = result.stdout.partition('\n\n')
    return result.returncode, usage, rest


def deny_writes(monkeypatch, folder, code):
    """Opening any file below `folder` for writing fails with errno `code` (EACCES, EROFS): the tests run as root,
    where chmod protects nothing."""
    real_open, folder = builtins.open, os.path.realpath(folder)

    def guarded(file, mode='r', *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set('wax+') \
                and os.path.realpath(file).startswith(folder + os.sep):
            raise OSError(code, os.strerror(code), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, 'open', guarded)


class _FullDiskFile:
    """A file on a disk with `budget` bytes left: the write that passes it writes what fits, then fails."""

    def __init__(self, f, budget):
        self._f, self._budget = f, budget

    def write(self, data):
        room = self._budget[0]
        if len(data) > room:
            self._f.write(bytes(data[:room]))
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)
        self._budget[0] -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk(monkeypatch, folder, budget):
    """Files opened for writing below `folder` share `budget` bytes of free space."""
    real_open, folder, left = builtins.open, os.path.realpath(folder), [budget]

    def limited(file, mode='r', *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and set(mode) & set('wax+') \
                and os.path.realpath(file).startswith(folder + os.sep):
            return _FullDiskFile(f, left)
        return f

    monkeypatch.setattr(builtins, 'open', limited)


@pytest.fixture
def ddpm_pair(tmp_path):
    return fake_ddpm_run(tmp_path / 'T500', 500), fake_ddpm_run(tmp_path / 'T1000', 1000)


# ----------------------------------------------------------------------------------------------- compare_ddpm.py

@pytest.mark.parametrize('script, module', [('compare_ddpm.py', 'studylib.compare'),
                                            ('probe_ddpm.py', 'studylib.probe')])
def test_each_tool_has_one_command_line(script, module):
    """`python SCRIPT --help` exits 0 and documents --out-dir; the library module behind it has no command line
    of its own (the old `python -m MODULE` spelling was removed: one entry point per command)."""
    rc, usage, text = help_of(script)
    assert rc == 0 and usage.startswith(f'usage: python {script} ')
    assert {'--out-dir', '--help'} <= set(re.findall(r'(?<![\w-])--[a-z][a-z-]*', text))
    assert not hasattr(importlib.import_module(module), 'main')


@pytest.mark.parametrize('spelling', ['same', 'trailing-slash', 'dot-dot', 'symlink'])
def test_compare_refuses_an_out_dir_that_is_one_of_its_runs(ddpm_pair, tmp_path, capsys, spelling):
    a, b = ddpm_pair
    out = {'same': b, 'trailing-slash': b + os.sep, 'dot-dot': os.path.join(a, '..', 'T1000'),
           'symlink': str(tmp_path / 'link')}[spelling]
    if spelling == 'symlink':
        os.symlink(b, out)
    before = snapshot(a, b)
    line = one_line_error(capsys, compare_ddpm, [a, b, '--out-dir', out])
    assert f'--out-dir {out}' in line and 'input run folder' in line
    assert snapshot(a, b) == before


@pytest.mark.parametrize('kind', ['finished', 'training'])
def test_compare_refuses_an_out_dir_holding_a_run(ddpm_pair, tmp_path, capsys, kind):
    a, b = ddpm_pair
    if kind == 'finished':   # an earlier comparison
        out = write_run(tmp_path / 'cmp', {'model': 'ddpm-compare', 'figures': {'2.3a': ['2.3a_tradeoff.png']},
                                           'metrics': {'T500': {'digit_fd': 1.0}}}, ['2.3a_tradeoff.png'])
    else:                    # a training run that has not finished: a checkpoint, no summary
        out = str(tmp_path / 'training')
        os.makedirs(out)
        for name, content in (('checkpoint.pt', b'weights'), ('config.json', b'{"model": "ddpm"}')):
            with open(os.path.join(out, name), 'wb') as f:
                f.write(content)
    before = snapshot(a, b, out)
    line = one_line_error(capsys, compare_ddpm, [a, b, '--out-dir', out])
    assert f'{out} holds a' in line and '--out-dir' in line
    assert snapshot(a, b, out) == before


@pytest.mark.parametrize('case', ['empty', 'a-file', 'below-a-file', 'EACCES', 'EROFS'])
def test_compare_refuses_an_unusable_out_dir(ddpm_pair, tmp_path, capsys, monkeypatch, case):
    a, b = ddpm_pair
    blocker = tmp_path / 'notes.txt'
    blocker.write_text('keep me')
    out = {'empty': '', 'a-file': str(blocker), 'below-a-file': str(blocker / 'cmp')}.get(case, str(tmp_path / 'cmp'))
    if case in ('EACCES', 'EROFS'):
        deny_writes(monkeypatch, out, getattr(errno, case))
    before = snapshot(a, b, str(blocker))
    line = one_line_error(capsys, compare_ddpm, [a, b, '--out-dir', out])
    assert (f'--out-dir {out}' if out else '--out-dir is empty') in line
    assert snapshot(a, b, str(blocker)) == before
    assert not os.path.exists(os.path.join(out or 'nowhere', 'summary.json'))


def test_compare_refuses_an_out_dir_in_use(ddpm_pair, tmp_path, capsys):
    a, b = ddpm_pair
    out = tmp_path / 'cmp'
    out.mkdir()
    with open(out / '.lock', 'a+') as held:   # another process comparing into it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write('process 12345 on elsewhere\n')
        held.flush()
        line = one_line_error(capsys, compare_ddpm, [a, b, '--out-dir', str(out)])
    assert 'in use by process 12345' in line and '--out-dir' in line
    assert sorted(os.listdir(out)) == ['.lock']


def test_compare_writes_once_then_never_over_its_result(ddpm_pair, tmp_path, capsys):
    """A good comparison writes the 2.3a figure, table and summary and releases its lock; the same command again
    is refused and leaves that result as it was."""
    a, b = ddpm_pair
    out = str(tmp_path / 'cmp')
    inputs = snapshot(a, b)
    metrics = compare_ddpm.main([b, a, '--out-dir', out])
    assert list(metrics) == ['T500', 'T1000'] and metrics['T1000']['digit_fd'] == DDPM_METRICS['digit_fd']
    summary = json.load(open(os.path.join(out, 'summary.json')))
    assert summary['model'] == 'ddpm-compare' and summary['figures'] == {'2.3a': ['2.3a_tradeoff.png']}
    assert json.load(open(os.path.join(out, 'config.json')))['command'].startswith('python compare_ddpm.py ')
    with open(os.path.join(out, '.lock'), 'a+') as lock:   # released: another process could take it now
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    result = snapshot(out)
    line = one_line_error(capsys, compare_ddpm, [b, a, '--out-dir', out])
    assert 'holds a finished ddpm-compare run' in line
    assert snapshot(out) == result and snapshot(a, b) == inputs


MALFORMED_DDPM = {   # summary.json content -> what the one line must name
    'a-list': ('[]', 'not a run summary'),
    'a-string': ('"ddpm"', 'not a run summary'),
    'not-utf8': (b'\xff\xfe{"model": "ddpm"}', 'not JSON'),
    'no-metrics': ({'model': 'ddpm', 'figures': {}}, '"metrics"'),
    'metrics-a-list': ({'model': 'ddpm', 'figures': {}, 'metrics': []}, '"metrics"'),
    'model-a-list': ({'model': ['ddpm'], 'figures': {}, 'metrics': DDPM_METRICS}, '"model"'),
    'figures-a-list': ({'model': 'ddpm', 'figures': [], 'metrics': DDPM_METRICS}, '"figures"'),
    'no-timesteps': (lambda: _without('timesteps'), '"timesteps"'),
    'no-digit-fd': (lambda: _without('digit_fd'), '"digit_fd"'),
    'no-sample-seconds': (lambda: _without('sample_seconds'), '"sample_seconds"'),
    'timesteps-a-string': (lambda: ddpm_summary(timesteps='1500'), '"timesteps"'),
    'timesteps-a-boolean': (lambda: ddpm_summary(timesteps=True), '"timesteps"'),
    'digit-fd-null': (lambda: ddpm_summary(timesteps=1500, digit_fd=None), '"digit_fd"'),
    'digit-fd-nan': ('{"model": "ddpm", "figures": {}, "metrics": %s}'
                     % json.dumps({**DDPM_METRICS, 'timesteps': 100, 'digit_fd': 'NAN'}).replace('"NAN"', 'NaN'),
                     '"digit_fd"'),
    'sample-seconds-a-list': (lambda: ddpm_summary(timesteps=1500, sample_seconds=[3.0]), '"sample_seconds"'),
}


def _without(key):
    summary = ddpm_summary(timesteps=1500)
    del summary['metrics'][key]
    return summary


@pytest.mark.parametrize('case', sorted(MALFORMED_DDPM))
def test_compare_names_the_file_and_key_of_a_malformed_summary(ddpm_pair, tmp_path, capsys, case):
    a, _ = ddpm_pair
    content, named = MALFORMED_DDPM[case]
    bad = write_run(tmp_path / 'bad', content() if callable(content) else content)
    out = tmp_path / 'cmp'
    before = snapshot(a, bad)
    line = one_line_error(capsys, compare_ddpm, [a, bad, '--out-dir', str(out)])
    assert os.path.join(bad, 'summary.json') in line and named in line
    assert snapshot(a, bad) == before and not out.exists()


# ------------------------------------------------------------------------------------------------- probe_ddpm.py

@pytest.fixture(scope='module')
def trained_pair(tmp_path_factory):
    """Finished DDPM (T=10) and VAE run folders with tiny real checkpoints and a summary.json each."""
    root = tmp_path_factory.mktemp('trained')
    torch.manual_seed(0)
    ddpm_config = dict(dim=8, channels=3, dim_mults=[1, 2], timesteps=10, beta_start=1e-4, beta_end=0.02)
    unet = ddpm_solution.Unet(dim=8, channels=3, dim_mults=[1, 2])
    vae_config = dict(in_channels=3, encoder_features=4, decoder_features=4, z_dim=4)
    vae = vae_solution.VAE(**vae_config, device=torch.device('cpu'))
    folders = {}
    for name, model, config in (('ddpm', unet, ddpm_config), ('vae', vae, vae_config)):
        folder = fake_ddpm_run(root / name, 10) if name == 'ddpm' else \
            write_run(root / name, {'model': 'vae', 'figures': {}, 'metrics': {'epochs': 1}})
        save_checkpoint(os.path.join(folder, 'checkpoint.pt'), model_name=name, model_config=config, model=model,
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=1)
        folders[name] = folder
    return folders['ddpm'], folders['vae']


def probe_args(ddpm, vae, out, tmp_path):
    """Flags that load the two tiny models; --data-dir is an empty folder (the out-dir problems come first)."""
    empty = tmp_path / 'no-data'
    empty.mkdir(exist_ok=True)
    return ['--ddpm', ddpm, '--vae', vae, '--out-dir', out, '--data-dir', str(empty), '--no-download',
            '--device', 'cpu', '--t', '0,5', '--limit-train', '20', '--limit-test', '10']


@pytest.mark.parametrize('which', ['--ddpm', '--vae', 'symlink'])
def test_probe_refuses_an_out_dir_that_is_one_of_its_runs(trained_pair, tmp_path, capsys, which):
    ddpm, vae = trained_pair
    out = {'--ddpm': ddpm, '--vae': vae + os.sep, 'symlink': str(tmp_path / 'link')}[which]
    if which == 'symlink':
        os.symlink(ddpm, out)
    before = snapshot(ddpm, vae)
    line = one_line_error(capsys, probe_ddpm, probe_args(ddpm, vae, out, tmp_path))
    assert f'--out-dir {out}' in line and 'input run folder' in line
    assert snapshot(ddpm, vae) == before


@pytest.mark.parametrize('case', ['finished', 'empty', 'a-file', 'EACCES', 'EROFS', 'in-use'])
def test_probe_refuses_an_out_dir_that_cannot_take_its_result(trained_pair, tmp_path, capsys, monkeypatch, case):
    ddpm, vae = trained_pair
    out = str(tmp_path / 'probe')
    held = None
    if case == 'finished':
        write_run(out, {'model': 'ddpm-probe', 'figures': {'2.3b': ['2.3b_feature_probe.png']},
                        'metrics': {'t': [0]}}, ['2.3b_feature_probe.png'])
    elif case == 'empty':
        out = ''
    elif case == 'a-file':
        with open(out, 'w') as f:
            f.write('keep me')
    elif case == 'in-use':
        os.makedirs(out)
        held = open(os.path.join(out, '.lock'), 'a+')
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        deny_writes(monkeypatch, out, getattr(errno, case))
    before = snapshot(ddpm, vae, out) if out else snapshot(ddpm, vae)
    try:
        line = one_line_error(capsys, probe_ddpm, probe_args(ddpm, vae, out, tmp_path))
    finally:
        if held is not None:
            held.close()
    assert '--out-dir' in line and (out in line if out else 'is empty' in line)
    assert (snapshot(ddpm, vae, out) if out else snapshot(ddpm, vae)) == before


# ------------------------------------------------------------------------------------------------ make_report.py

def vae_run(folder, **changes):
    summary = {'model': 'vae', 'figures': {'1.3a': ['1.3a_training_time.png']}, 'metrics': {'epochs': 3},
               'run': {'command': 'python train_vae.py', 'git_commit': 'abc123'}}
    return write_run(folder, {**summary, **changes}, ['1.3a_training_time.png'])


def no_build(*args, **kwargs):
    raise AssertionError('make_report built the PDF before refusing its inputs')


MALFORMED_FOR_REPORT = {   # summary changes -> what the one line must name
    'metrics-a-list': ({'metrics': [1, 2]}, '"metrics"'),
    'figures-a-list': ({'figures': ['1.3a_training_time.png']}, '"figures"'),
    'figure-names-a-string': ({'figures': {'1.3a': '1.3a_training_time.png'}}, '"figures"."1.3a"'),
    'figure-name-a-number': ({'figures': {'1.3a': [7]}}, '"figures"."1.3a"'),
    'model-a-list': ({'model': ['vae']}, '"model"'),
    'model-a-number': ({'model': 5}, '"model"'),
    'run-a-string': ({'run': 'python train_vae.py'}, '"run"'),
}


@pytest.mark.parametrize('case', sorted(MALFORMED_FOR_REPORT))
def test_report_names_the_file_and_key_of_a_malformed_summary(tmp_path, capsys, monkeypatch, case):
    changes, named = MALFORMED_FOR_REPORT[case]
    run = vae_run(tmp_path / 'vae', **changes)
    monkeypatch.setattr(make_report, 'build', no_build)
    before = snapshot(run)
    line = one_line_error(capsys, make_report, [run, '--out', str(tmp_path / 'report.pdf')])
    assert os.path.join(run, 'summary.json') in line and named in line
    assert snapshot(run) == before and not (tmp_path / 'report.pdf').exists()


@pytest.mark.parametrize('case', ['empty', 'a-folder', 'below-a-file', 'EACCES', 'EROFS', 'a-summary'])
def test_report_refuses_an_unusable_out_before_building(tmp_path, capsys, monkeypatch, case):
    run = vae_run(tmp_path / 'vae')
    blocker = tmp_path / 'notes.txt'
    blocker.write_text('keep me')
    out = {'empty': '', 'a-folder': str(tmp_path), 'below-a-file': str(blocker / 'report.pdf'),
           'a-summary': os.path.join(run, 'summary.json')}.get(case, str(tmp_path / 'reports' / 'report.pdf'))
    if case in ('EACCES', 'EROFS'):
        os.makedirs(os.path.dirname(out))
        deny_writes(monkeypatch, os.path.dirname(out), getattr(errno, case))
    monkeypatch.setattr(make_report, 'build', no_build)   # the slow part: never reached
    before = snapshot(run, str(blocker))
    line = one_line_error(capsys, make_report, [run, '--out', out])
    assert (f'--out {out}' if out else '--out is empty') in line
    assert snapshot(run, str(blocker)) == before


@pytest.mark.parametrize('case', ['truncated', 'not-a-png', 'empty', 'missing'])
def test_report_names_a_broken_figure_and_keeps_the_previous_report(tmp_path, capsys, case):
    run = fake_ddpm_run(tmp_path / 'ddpm')
    figure = os.path.join(run, '2.2c_tprime_psnr.png')
    data = open(figure, 'rb').read()
    if case == 'missing':
        os.remove(figure)
    else:
        with open(figure, 'wb') as f:
            f.write({'truncated': data[:len(data) // 2], 'not-a-png': b'<html>not an image</html>\n',
                     'empty': b''}[case])
    out = tmp_path / 'report.pdf'
    out.write_bytes(b'%PDF-1.4 the previous report\n%%EOF\n')
    before = snapshot(run, str(tmp_path))
    line = one_line_error(capsys, make_report, [run, '--out', str(out)])
    assert figure in line and ('missing' in line if case == 'missing' else 'not a PNG' in line)
    assert snapshot(run, str(tmp_path)) == before


def test_report_on_a_full_disk_keeps_the_previous_report(tmp_path, capsys, monkeypatch):
    """The disk fills while the PDF is written: the report built before stays byte for byte, no temp file
    remains, and the line names --out."""
    runs = [fake_ddpm_run(tmp_path / 'ddpm'), vae_run(tmp_path / 'vae')]
    folder = tmp_path / 'reports'
    out = folder / 'report.pdf'
    assert make_report.main(runs + ['--out', str(out)]) >= 5
    capsys.readouterr()
    before = snapshot(str(folder), *runs)
    fill_disk(monkeypatch, folder, budget=4096)
    line = one_line_error(capsys, make_report, runs + ['--out', str(out)])
    assert str(out) in line and '--out' in line and os.strerror(errno.ENOSPC) in line
    assert snapshot(str(folder), *runs) == before


def test_report_refuses_answers_that_are_not_text(tmp_path, capsys):
    run = vae_run(tmp_path / 'vae')
    answers = tmp_path / 'answers.md'
    answers.write_bytes(b'## 1.3a \xff\xfe binary\n')
    line = one_line_error(capsys, make_report, [run, '--answers', str(answers), '--out', str(tmp_path / 'r.pdf')])
    assert str(answers) in line and '--answers' in line
    assert not (tmp_path / 'r.pdf').exists()
