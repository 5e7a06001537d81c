"""The house's structure, checked: bench.py times the drivers' own steps; no function is long or takes a long row
of positional arguments; a newcomer reads at most ten files to follow a driver; README and docs/ stay under 7,000
words; the library never imports a script; each driver's hyperparameters live in one block that its flags default
to."""
import ast
import os
import subprocess
import sys

import pytest
import torch

import bench
import train_ddpm
import train_simsiam
import train_vae
from tests.conftest import ROOT

MAX_LINES, MAX_POSITIONAL, MAX_FILES, MAX_DOC_WORDS = 60, 6, 10, 7000
# signatures another party fixed: the course template's Unet(dim, init_dim, out_dim, dim_mults, channels,
# with_time_emb, resnet_block_groups), which the autograder and the notebooks call positionally
FIXED_SIGNATURES = {('ddpm_solution.py', 'Unet.__init__')}
SOLUTION_MODULES = {'vae_solution.py', 'ddpm_solution.py', 'q3_solution.py'}


def _groups(optimizer):
    """What defines an optimiser's behaviour: per group, its settings and its parameters' shapes."""
    return [({k: v for k, v in g.items() if k != 'params'}, [tuple(p.shape) for p in g['params']])
            for g in optimizer.param_groups]


@pytest.mark.parametrize('driver, factory, args', [
    (train_vae, bench.vae_step, ()),
    (train_ddpm, bench.ddpm_step, ()),
    (train_simsiam, bench.simsiam_step, (torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8),)),
])
def test_bench_times_the_drivers_step(driver, factory, args, monkeypatch):
    """bench.py builds each model with the driver's build() and steps it with the driver's train_step(); its
    optimiser has the driver's groups (for SimSiam: the encoder's and the predictor's with its fixed lr)."""
    built, stepped = [], []
    real_build, real_step = driver.build, driver.train_step

    def build(*a, **k):
        built.append(real_build(*a, **k))
        return built[-1]

    def train_step(*a, **k):
        stepped.append(True)
        return real_step(*a, **k)
    monkeypatch.setattr(driver, 'build', build)
    monkeypatch.setattr(driver, 'train_step', train_step)
    out = factory(torch.device('cpu'), False, *args)
    assert len(built) == 1
    step = out[0] if isinstance(out, tuple) else out
    if driver is not train_ddpm:   # the DDPM's U-Net step costs seconds here; the other two are quick
        step()
        assert stepped == [True]
    optimizer = built[0][-1]
    torch.manual_seed(0)
    defaults = driver.DEFAULTS
    if driver is train_simsiam:
        fresh = real_build(bench.simsiam_settings(), defaults['lr'] * bench.BATCH / 256, torch.device('cpu'))[-1]
        assert [g['fix_lr'] for g in optimizer.param_groups] == [False, True]
    elif driver is train_vae:
        _, _, fresh = real_build(dict(in_channels=3, encoder_features=train_vae.FEATURES,
                                      decoder_features=train_vae.FEATURES, z_dim=defaults['z_dim'], input_size=32),
                                 defaults['lr'], torch.device('cpu'))
    else:
        fresh = bench.ddpm_parts(torch.device('cpu')).optimizer
    assert _groups(optimizer) == _groups(fresh)


def _python_files():
    """Every .py file of the product (repository root, studylib/, scripts/), tests and the virtualenv aside."""
    files = []
    for top, dirs, names in os.walk(ROOT):
        rel = os.path.relpath(top, ROOT)
        dirs[:] = [d for d in dirs if not d.startswith('.') and (rel != '.' or d in ('studylib', 'scripts'))]
        files += [os.path.relpath(os.path.join(top, n), ROOT) for n in names if n.endswith('.py')]
    return sorted(files)


def _functions(tree):
    """(qualified name, node) of every function, methods as Class.method."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child
                yield from walk(child, f'{prefix}{child.name}.')
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f'{prefix}{child.name}.')
            else:
                yield from walk(child, prefix)
    return walk(tree, '')


def test_the_walk_sees_every_product_file():
    files = _python_files()
    assert {'train_vae.py', 'ddpm_solution.py', 'studylib/trainer.py', 'scripts/gpu_check.py'} <= set(files)
    assert not [f for f in files if f.startswith(('tests', '.venv'))]


def test_no_function_is_long_or_takes_many_positional_arguments():
    """Each function reads on one screen (at most 60 lines) and takes at most 6 positional parameters (self and
    keyword-only ones aside), so that a call site says what each argument is."""
    long, wide = [], []
    for name in _python_files():
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        for qualname, node in _functions(tree):
            lines = node.end_lineno - node.lineno + 1
            positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ('self', 'cls')]
            if lines > MAX_LINES:
                long.append((name, qualname, lines))
            if len(positional) > MAX_POSITIONAL and (name, qualname) not in FIXED_SIGNATURES:
                wide.append((name, qualname, len(positional)))
    assert not long, long
    assert not wide, wide


def test_the_checks_catch_what_they_are_for():
    """The walkers above, on a made-up module: a long function and a wide method are found."""
    source = 'class A:\n    def f(self, a, b, c, d, e, f, g):\n        pass\n\ndef g():\n' + '    x = 1\n' * 70
    found = dict(_functions(ast.parse(source)))
    assert set(found) == {'A.f', 'g'}
    assert found['g'].end_lineno - found['g'].lineno + 1 > MAX_LINES
    assert len(found['A.f'].args.args) - 1 > MAX_POSITIONAL


def _local_file(module):
    parts = module.split('.')
    for candidate in (os.path.join(*parts) + '.py', os.path.join(*parts, '__init__.py')):
        if os.path.exists(os.path.join(ROOT, candidate)):
            return os.path.normpath(candidate)
    return None


def _imports(path):
    """The repository files that `path` imports anywhere in it (lazy imports inside functions included)."""
    package = os.path.dirname(path).replace(os.sep, '.')
    modules = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                up = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(up + ([node.module] if node.module else []))
            modules |= {base} | {f'{base}.{a.name}' for a in node.names}
    files = set()
    for module in modules:
        parts = module.split('.')
        files |= {f for i in range(1, len(parts) + 1) if (f := _local_file('.'.join(parts[:i])))}
    return files


def _closure(path):
    seen, todo = set(), [path]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += sorted(_imports(f) - seen)
    return seen


@pytest.mark.parametrize('driver', ['train_vae.py', 'train_ddpm.py', 'train_simsiam.py'])
def test_a_driver_reads_in_at_most_ten_files(driver):
    """Everything a newcomer must open to follow a driver: itself, its solution modules, the library modules it
    reaches (each studylib module it names and what they name in turn)."""
    files = _closure(driver)
    assert driver in files and 'studylib/trainer.py' in files and 'studylib/run.py' in files
    assert len(files) <= MAX_FILES, sorted(files)


def test_the_docs_stay_short():
    """README and docs/ together, counted as `wc -w` counts (whitespace-separated words)."""
    pages = [os.path.join(ROOT, 'README.md')] + [os.path.join(ROOT, 'docs', f)
                                                  for f in sorted(os.listdir(os.path.join(ROOT, 'docs')))
                                                  if f.endswith('.md')]
    assert len(pages) >= 5
    words = sum(len(open(p, encoding='utf-8').read().split()) for p in pages)
    assert 3000 < words <= MAX_DOC_WORDS, words


def test_the_library_never_imports_a_script():
    """studylib is imported by the scripts, never the other way round (the solution modules are libraries)."""
    for name in _python_files():
        if name.startswith('studylib'):
            outside = {f for f in _imports(name) if not f.startswith('studylib')} - SOLUTION_MODULES
            assert not outside, (name, outside)


@pytest.mark.parametrize('driver', [train_vae, train_ddpm, train_simsiam])
def test_each_driver_has_one_hyperparameter_block_that_its_flags_default_to(driver):
    """DEFAULTS is the block; the default recipe changes what it names; a flag given explicitly wins."""
    recipes = getattr(driver, 'RECIPES', {})
    default_recipe = recipes.get(driver.parse_args([]).recipe, {}) if recipes else {}
    args = vars(driver.parse_args(['--data-dir', 'x']))
    for key, value in driver.DEFAULTS.items():
        assert args[key] == default_recipe.get(key, value), (driver.__name__, key)
    assert vars(driver.parse_args(['--lr', '0.5']))['lr'] == 0.5


@pytest.mark.parametrize('driver', [train_ddpm, train_simsiam])
def test_every_recipe_sets_the_values_it_names_and_explicit_flags_win(driver):
    for name, recipe in driver.RECIPES.items():
        args = vars(driver.parse_args(['--recipe', name]))
        assert {k: args[k] for k in recipe} == recipe, name
        for key, value in driver.DEFAULTS.items():
            assert args[key] == recipe.get(key, value), (name, key)
        assert driver.parse_args(['--recipe', name, '--batch-size', '48']).batch_size == 48


def test_help_shows_the_chosen_recipes_defaults():
    text = subprocess.run([sys.executable, os.path.join(ROOT, 'train_ddpm.py'), '--recipe', 'cpu', '--help'],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS='200')).stdout
    assert 'training batch size (default: 16)' in text and '(default: 0.0002)' in text


def test_simsiam_lr_is_per_256_images():
    """--lr means the official code's base rate: the SGD lr is lr * batch / 256."""
    args = train_simsiam.parse_args(['--batch-size', '512'])
    assert args.lr == 0.03
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, 'train_simsiam.py'), '--help'],
                               capture_output=True, text=True, timeout=120).stdout
    assert 'per 256 images' in ' '.join(help_text.split())
