"""train_simsiam.py end to end on real CIFAR-10 files from DATA_DIR (tiny sizes), and its pure pieces."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import train_simsiam
from tests.conftest import ROOT, snapshot

TINY = ['--limit-train', '64', '--limit-test', '32', '--batch-size', '32', '--knn-k', '10',
        '--dim', '64', '--pred-dim', '16', '--no-download', '--device', 'cpu']


def run_driver(data_dir, out, *extra):
    return train_simsiam.main(['--data-dir', data_dir, '--out-dir', str(out), *TINY, *extra])


@pytest.fixture(scope='module')
def experiment_3_4(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('simsiam') / 'exp'
    return out, run_driver(data_dir, out, '--experiment', '3.4', '--epochs', '2')


def test_experiment_writes_figures_metrics_and_one_folder_per_configuration(experiment_3_4):
    out, results = experiment_3_4
    summary = json.load(open(out / 'summary.json'))
    assert summary['figures'] == {'3.4': ['3.4_loss_knn.png', '3.4_collapse.png', '3.4_spectrum.png']}
    for rel in summary['figures']['3.4']:
        with Image.open(out / rel) as im:
            im.verify()
    assert sorted(summary['metrics']) == ['baseline', 'no-stop-grad']
    assert summary['metrics']['no-stop-grad']['stop_grad'] is False
    for name in ('baseline', 'no-stop-grad'):
        m = json.load(open(out / name / 'summary.json'))['metrics']
        commit = json.load(open(out / name / 'config.json'))['git_commit']
        assert summary['metrics'][name] == results[name] == dict(m, git_commit=commit)   # each one's own code
        assert 0 <= m['final_knn_top1'] <= 100 and 0 <= m['linear_probe_top1'] <= 100
        assert -1 <= m['final_train_loss'] <= 1 and m['epochs'] == 2
        rows = [json.loads(line) for line in open(out / name / 'metrics.jsonl')]
        assert [r['epoch'] for r in rows] == [0, 1, 2]                    # epoch 0: the untrained model
        assert rows[0]['lr'] is None and rows[0]['seconds'] == 0
        assert m['init_knn_top1'] == rows[0]['knn_top1'] and m['init_z_std'] == rows[0]['z_std']
        assert m['train_seconds_total'] == pytest.approx(rows[1]['seconds'] + rows[2]['seconds'])
        for row in rows:
            assert set(row) >= {'train_loss', 'knn_top1', 'z_std', 'lr', 'seconds'}
            assert 0 <= row['z_std'] <= 1 / math.sqrt(64) + 1e-6          # std of unit vectors' coordinates
            assert -1 <= row['train_loss'] <= 1 and 0 <= row['knn_top1'] <= 100
        assert rows[1]['lr'] == pytest.approx(0.03 * 32 / 256)            # epoch 1: no decay yet
        assert (out / name / 'checkpoint.pt').exists()
        assert 0 < m['final_erank'] <= 32 and m['final_erank'] == rows[-1]['erank']   # at most N = 32 test images


def test_the_spectrum_is_the_spread_of_the_normalised_test_embeddings(data_dir, experiment_3_4):
    """spectrum.json's squared singular values add up to the total variance of z/||z|| over the test images,
    recomputed from the checkpoint (every value is kept: 32 images give 32)."""
    from studylib.data import load_split
    out, _ = experiment_3_4
    ckpt = torch.load(out / 'baseline' / 'checkpoint.pt', weights_only=True)
    model = train_simsiam.build_model(ckpt['model_config'])
    model.load_state_dict(ckpt['model'])
    images, _ = load_split('cifar10', data_dir, 'test', False, 32)
    model.eval()
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.encoder(train_simsiam.normalise(images)), dim=1).double()
    values = json.load(open(out / 'baseline' / 'spectrum.json'))['singular_values']
    assert len(values) == 32 and values == sorted(values, reverse=True)
    assert sum(v * v for v in values) == pytest.approx(float(z.var(0, correction=0).sum()), rel=1e-6)


def test_resume_skips_finished_configurations(data_dir, experiment_3_4, capsys):
    out, results = experiment_3_4
    again = run_driver(data_dir, out, '--experiment', '3.4', '--epochs', '2', '--resume')
    assert again == results
    assert 'already finished' in capsys.readouterr().out


def test_finished_configurations_survive_a_fresh_checkout(data_dir, experiment_3_4, tmp_path, capsys):
    """What git keeps of a run (no checkpoints, no lock): --resume takes the finished configurations from their
    summaries and trains nothing; the figures are redrawn from the logs."""
    out, results = experiment_3_4
    clone = tmp_path / 'clone'
    shutil.copytree(out, clone, ignore=shutil.ignore_patterns('*.pt', '.lock'))
    again = run_driver(data_dir, clone, '--experiment', '3.4', '--epochs', '2', '--resume')
    assert again == results
    assert capsys.readouterr().out.count('already finished') == 2
    assert not list(clone.rglob('*.pt'))                                  # nothing was trained, nothing saved
    assert json.load(open(clone / 'summary.json'))['figures'] == {'3.4': ['3.4_loss_knn.png', '3.4_collapse.png',
                                                                           '3.4_spectrum.png']}


def test_a_refused_command_leaves_the_experiment_byte_identical(data_dir, experiment_3_4, capsys):
    """A fresh start into a finished experiment, and a --resume that changes what trains (--lr), are refused with
    one line and exit 2; the folder is left byte for byte as it was, with no .lock behind."""
    out = experiment_3_4[0]
    before = snapshot(str(out))
    assert not (out / '.lock').exists()
    for extra in ([], ['--resume', '--lr', '0.5']):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run_driver(data_dir, out, '--experiment', '3.4', '--epochs', '2', *extra)
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
        assert exc.value.code == 2 and len(errors) == 1, extra
        assert snapshot(str(out)) == before, extra


def test_resume_equals_uninterrupted_run(data_dir, tmp_path):
    """1 epoch, stop, --resume to 2 == 2 epochs straight: data order, augmentation RNG and optimizer restored."""
    run_driver(data_dir, tmp_path / 'a', '--epochs', '2')
    run_driver(data_dir, tmp_path / 'b', '--epochs', '1')
    run_driver(data_dir, tmp_path / 'b', '--epochs', '2', '--resume')
    a = torch.load(tmp_path / 'a' / 'checkpoint.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)['model']
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_get_lr_is_the_cosine_schedule():
    assert train_simsiam.get_lr(0, 0.06, 100) == pytest.approx(0.06)
    assert train_simsiam.get_lr(50, 0.06, 100) == pytest.approx(0.03)
    assert train_simsiam.get_lr(99, 0.06, 100) == pytest.approx(0.06 * 0.5 * (1 + math.cos(math.pi * 0.99)))


def test_recipes_pick_their_encoder_batch_and_lr():
    tuned = train_simsiam.parse_args([])
    assert (tuned.recipe, tuned.batch_size, tuned.epochs) == ('tuned', 512, 100)
    assert tuned.lr == pytest.approx(0.03)   # per 256 images: the SGD lr is 0.03 * 512 / 256 = 0.06
    assignment = train_simsiam.parse_args(['--recipe', 'assignment'])
    assert assignment.batch_size == 1024 and assignment.lr * assignment.batch_size / 256 == pytest.approx(0.12)
    small = train_simsiam.build_model(train_simsiam.variant_settings(tuned, 'baseline') | {'dim': 32})
    imagenet = train_simsiam.build_model(train_simsiam.variant_settings(assignment, 'baseline') | {'dim': 32})
    assert small.encoder.conv1.kernel_size == (3, 3) and isinstance(small.encoder.maxpool, torch.nn.Identity)
    assert imagenet.encoder.conv1.kernel_size == (7, 7) and isinstance(imagenet.encoder.maxpool, torch.nn.MaxPool2d)


def test_variants_change_one_thing_each():
    args = train_simsiam.parse_args([])
    base = train_simsiam.variant_settings(args, 'baseline')
    for name, change in train_simsiam.VARIANTS.items():
        settings = train_simsiam.variant_settings(args, name)
        changed = {k for k in set(settings) | set(base) if settings.get(k) != base.get(k)}
        assert changed == set(change), name   # what the variant declares, nothing else


def test_missing_cifar_offline(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'train_simsiam.py'), '--no-download', '--data-dir',
                             str(tmp_path), '--out-dir', str(tmp_path / 'run')],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'data_batch_1 is missing' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / 'run').exists()


def test_experiment_all_writes_every_question(data_dir, tmp_path):
    results = run_driver(data_dir, tmp_path / 'all', '--experiment', 'all', '--epochs', '1', '--limit-train', '32')
    assert sorted(results) == sorted(train_simsiam.VARIANTS)
    assert results['dim4096']['dim'] == 4096 and results['identity-pred']['predictor'] == 'identity'
    assert results['fixed-random-pred']['predictor'] == 'fixed-random'
    summary = json.load(open(tmp_path / 'all' / 'summary.json'))
    assert sorted(summary['figures']) == ['3.4', '3.5a', '3.5b', '3.5c', '3.6', '3.7', '3.8', '3.9']
    for paths in summary['figures'].values():
        for rel in paths:
            assert (tmp_path / 'all' / rel).exists()
