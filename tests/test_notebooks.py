"""notebooks/: each runs end to end at SIZE = 'tiny' in a Jupyter kernel of this virtualenv (any cell error fails
the test) and shows its run's figures inline; the committed files carry no outputs."""
import glob
import json
import os

import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))


def test_every_problem_has_a_notebook():
    assert [os.path.basename(p) for p in NOTEBOOKS] == ['ddpm.ipynb', 'simsiam.ipynb', 'vae.ipynb']


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_committed_notebooks_are_stripped_of_outputs(path):
    with open(path) as f:
        notebook = json.load(f)
    for cell in notebook['cells']:
        if cell['cell_type'] == 'code':
            assert cell['outputs'] == [] and cell['execution_count'] is None, path


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_at_tiny_size_and_shows_its_figures(path, data_dir, tmp_path):
    nbformat = pytest.importorskip('nbformat', reason='nbformat (requirements-test.txt) is not installed')
    nbclient = pytest.importorskip('nbclient', reason='nbclient (requirements-test.txt) is not installed')
    notebook = nbformat.read(path, as_version=4)
    [params] = [c for c in notebook.cells if 'parameters' in c.metadata.get('tags', [])]
    assert "SIZE = 'small'" in params.source   # the default a student gets on a CPU
    out_dir = tmp_path / 'run'
    # what a user edits in the parameters cell: the size, the data folder and the run folder
    params.source += f"\nSIZE = 'tiny'\nDATA_DIR = {data_dir!r}\nOUT_DIR = {str(out_dir)!r}\n"
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                     resources={'metadata': {'path': os.path.dirname(path)}})
    client.execute()   # raises CellExecutionError, naming the cell, on any error
    summary = json.load(open(out_dir / 'summary.json'))
    shown = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs
             if o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})]
    expected = sum(min(len(names), 2) for names in summary['figures'].values())
    assert expected > 0 and len(shown) == expected


def test_train_once_resumes_a_stopped_experiment_and_skips_a_finished_run(tmp_path):
    """The notebooks' helper: a checkpoint anywhere in the run folder (a SimSiam configuration's sub-folder too)
    means --resume; a summary.json means nothing is trained."""
    from studylib.notebook import train_once
    calls = []

    def main(argv):
        calls.append(argv)
        (tmp_path / 'run' / 'summary.json').write_text('{"model": "x", "figures": {}, "metrics": {}}')
    (tmp_path / 'run' / 'baseline').mkdir(parents=True)
    (tmp_path / 'run' / 'baseline' / 'checkpoint.pt').write_bytes(b'')
    assert train_once(main, ['--epochs', '1'], str(tmp_path / 'run'))['model'] == 'x'
    assert calls == [['--epochs', '1', '--out-dir', str(tmp_path / 'run'), '--resume']]
    train_once(main, ['--epochs', '1'], str(tmp_path / 'run'))
    assert len(calls) == 1                                                 # finished: shown, not retrained
