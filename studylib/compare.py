"""2.3a: compare DDPM runs that differ in T (training time per epoch, sampling time, sample quality).

The command line is compare_ddpm.py at the repository root:

    python compare_ddpm.py runs/ddpm-T500 runs/ddpm runs/ddpm-T1500 --out-dir runs/ddpm-compare

compare() reads each run folder's summary.json and writes, into --out-dir, the figure 2.3a_tradeoff.png, the table
2.3a_table.md and a summary.json with id 2.3a whose metrics hold one entry per T.

Every problem with the inputs or the output folder is one line (exit status 2) before anything is written: a
summary.json that is not one (naming the file and the key), an --out-dir that is one of the input runs, holds a
finished run or a training run, cannot be written, or is in use by another process (it is locked while writing).
"""
import json
import math
import os

from . import UserError
from .plots import pyplot
from .run import RunDir, claim_folder, git_commit, read_summary


def _kind(value):
    return {dict: 'an object', list: 'a list', str: 'a string', bool: 'a boolean', type(None): 'null',
            int: 'an integer', float: 'a number'}.get(type(value), type(value).__name__)


# The metrics of a train_ddpm.py summary that the comparison reads, with the kind of value each must be.
NEEDED_METRICS = {
    'timesteps': 'count', 'epochs': 'count', 'sample_batch': 'count', 't_star': 'integer',
    'seconds_per_epoch_mean': 'number', 'sample_seconds': 'number', 'digit_fd': 'number',
    'digit_confidence': 'number', 'reference_digit_fd': 'number', 'reference_digit_confidence': 'number',
    'device': 'text',
}
_KINDS = {
    'count': ('a positive integer', lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    'integer': ('an integer', lambda v: isinstance(v, int) and not isinstance(v, bool)),
    'number': ('a finite number', lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v)),
    'text': ('a string', lambda v: isinstance(v, str)),
}


def read_ddpm_run(path):
    """The metrics of a finished train_ddpm.py run folder, with every value the comparison reads checked."""
    summary = read_summary(path, hint='pass finished train_ddpm.py run folders, one per T')
    summary_path = os.path.join(path, 'summary.json')
    if summary['model'] != 'ddpm':
        raise UserError(f'{path} is a {summary["model"]} run, not a DDPM run: pass finished train_ddpm.py run '
                        f'folders, one per T')
    metrics = summary['metrics']
    for key, kind in NEEDED_METRICS.items():
        what, ok = _KINDS[kind]
        if key not in metrics:
            raise UserError(f'{summary_path}: "metrics" has no "{key}", which the comparison needs; rerun '
                            f'train_ddpm.py into that folder with this code, or leave the run out')
        if not ok(metrics[key]):
            raise UserError(f'{summary_path}: "metrics"."{key}" is {_kind(metrics[key])} '
                            f'({json.dumps(metrics[key])[:40]}), not {what}; repair it or rerun train_ddpm.py')
    return metrics


def compare(run_dirs, out_dir, command):
    """2.3a from finished train_ddpm.py runs that differ in T: the figure, the table and a summary in out_dir."""
    claim_folder(out_dir, fresh=True, inputs=[(None, p) for p in run_dirs], resumable=False)
    runs = sorted((read_ddpm_run(p) | {'run': p} for p in run_dirs), key=lambda m: m['timesteps'])
    if len({m['timesteps'] for m in runs}) != len(runs):
        raise UserError('two of the runs have the same T: give one run per T')
    out = RunDir(out_dir)
    out.write_json('config.json', {'model': 'ddpm-compare', 'runs': list(run_dirs), 'command': command,
                                   'git_commit': git_commit()})
    for m in runs:   # the exact T-step chain, when the run scored it (train_ddpm.py's samplers comparison)
        chain = m.get('samplers', {}).get(f'ddpm_{m["timesteps"]}')
        if isinstance(chain, dict) and {'seconds', 'digit_fd'} <= chain.keys():
            m['chain_seconds'], m['chain_digit_fd'] = chain['seconds'], chain['digit_fd']
    samplers = ', '.join(sorted({m.get('sampler', 'sampler not recorded') for m in runs}))
    figure = out.file('2.3a_tradeoff.png')
    save_tradeoff_figure(runs, samplers, figure)
    lines = tradeoff_table(runs, samplers)
    with open(out.file('2.3a_table.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    keys = ('epochs', 'seconds_per_epoch_mean', 'sample_seconds', 'sample_batch', 'digit_fd', 'digit_fd_redraw',
            'digit_confidence', 'reference_digit_fd', 'reference_digit_confidence', 't_star', 'sampler', 'device',
            'run', 'chain_seconds', 'chain_digit_fd', 'num_train')
    metrics = {f'T{m["timesteps"]}': {k: m[k] for k in keys if k in m} for m in runs}
    out.write_summary('ddpm-compare', {'2.3a': [figure]}, metrics)
    print('\n'.join(lines))
    return metrics


def save_tradeoff_figure(runs, samplers, path):
    """2.3a: training time per epoch, sampling time and digit FD against T (one run per T, sorted by T)."""
    plt = pyplot()
    ts = [m['timesteps'] for m in runs]
    panels = [('seconds_per_epoch_mean', 'training time per epoch (s)'),
              ('sample_seconds', f'seconds to sample {runs[0]["sample_batch"]} images'),
              ('digit_fd', 'digit Frechet distance to test images\n(lower is better)')]
    reference = runs[0]['reference_digit_fd']
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    has_chain = all('chain_seconds' in m for m in runs)
    for ax, (key, label) in zip(axes, panels):
        values = [m[key] for m in runs]
        ax.plot(ts, values, marker='o', label=samplers if key != 'seconds_per_epoch_mean' else None)
        if key == 'sample_seconds' and has_chain:   # the exact chain's cost grows with T; DDIM's does not
            values += [m['chain_seconds'] for m in runs]
            ax.plot(ts, [m['chain_seconds'] for m in runs], marker='s', color='tab:red',
                    label='DDPM, all T steps')
            ax.legend(fontsize=8, loc='upper left')
        top = max(values + ([reference] if key == 'digit_fd' else []))   # the calibration line must stay in view
        ax.set_xlabel('diffusion steps T')
        ax.set_ylabel(label)
        ax.set_xticks(ts)
        ax.set_ylim(0, (1.5 if key == 'digit_fd' else 1.2) * top)  # from zero: timing noise is not a trend
        ax.grid(alpha=0.3)
    if all('digit_fd_redraw' in m for m in runs):   # a second draw of each: the spread to judge differences by
        axes[2].plot(ts, [m['digit_fd_redraw'] for m in runs], marker='x', ls=':', color='tab:blue',
                     label='same, second draw (next seed)')
    axes[2].axhline(reference, color='grey', ls='--',
                    label=f'calibration: {runs[0]["sample_batch"]} training images')
    axes[2].legend(fontsize=8, loc='upper left')
    devices = sorted({m['device'] for m in runs})
    fig.suptitle(f'DDPM trade-off against T ({", ".join(devices)}; epochs: '
                 f'{", ".join(str(m["epochs"]) for m in runs)}; samples scored: {samplers}, '
                 f'{", ".join(str(m["sample_batch"]) for m in runs)} images)', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tradeoff_table(runs, samplers):
    """The 2.3a table's markdown lines: one row per T and the calibration row."""
    redraw = lambda m, prefix='': (f'{m[prefix + "digit_fd_redraw"]:.2f}' if prefix + 'digit_fd_redraw' in m
                                   else 'n/a')
    cell = lambda m, key, spec: format(m[key], spec) if key in m else 'n/a'   # a value the run may lack
    lines = [f'Sampler: {samplers}. The second draw is the same number of images from the next seed (for the '
             f'calibration row, the next training images). The last two columns: the exact DDPM chain over all T '
             f'steps, same weights and seed.',
             '',
             '| T | epochs | train s/epoch | sampling s (batch) | digit FD | digit FD, second draw | digit confidence '
             '| t* | run | T-step chain s | T-step chain digit FD |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for m in runs:
        lines.append(f'| {m["timesteps"]} | {m["epochs"]} | {m["seconds_per_epoch_mean"]:.1f} | '
                     f'{m["sample_seconds"]:.1f} ({m["sample_batch"]}) | {m["digit_fd"]:.2f} | {redraw(m)} | '
                     f'{m["digit_confidence"]:.3f} | {m["t_star"]} | {m["run"]} | {cell(m, "chain_seconds", ".1f")} '
                     f'| {cell(m, "chain_digit_fd", ".2f")} |')
    ref = runs[0]
    lines.append(f'| training images (calibration) | | | ({ref["sample_batch"]}) | {ref["reference_digit_fd"]:.2f} | '
                 f'{redraw(ref, "reference_")} | {ref["reference_digit_confidence"]:.3f} | | | | |')
    return lines


def read_recipe_run(path):
    """(label, [(training minutes, digit FD)], summary metrics) of a finished train_ddpm.py run whose log scored
    its sampled batches (digit_fd in metrics.jsonl)."""
    metrics = read_ddpm_run(path)
    folder = RunDir(path)
    try:
        with open(folder.file('config.json'), encoding='utf-8') as f:
            args = json.load(f)['args']
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f'{folder.file("config.json")} is missing or not a run configuration ({exc}); pass '
                        f'finished train_ddpm.py run folders') from exc
    minutes, curve = 0.0, []
    for row in folder.read_metrics():
        minutes += row['seconds'] / 60
        if 'digit_fd' in row:
            curve.append((minutes, row['digit_fd']))
    if not curve:
        raise UserError(f'{folder.metrics_path} holds no digit_fd row: the run was made before train_ddpm.py scored '
                        f'its sampled batches; rerun it with this code')
    label = (f'{args.get("recipe", "assignment")} recipe ({os.path.basename(os.path.normpath(path))}): batch '
             f'{args["batch_size"]}, Adam {args["lr"]:g}, EMA {args["ema_decay"]:g}')
    return label, curve, metrics


def compare_recipes(run_dirs, out_dir, command):
    """The training recipes at equal wall time: the digit FD of each sampled batch against the training minutes
    spent to reach it (sampling time not counted), one line per run, with the VAE and training-image levels."""
    claim_folder(out_dir, fresh=True, inputs=[(None, p) for p in run_dirs], resumable=False)
    names = [os.path.basename(os.path.normpath(p)) for p in run_dirs]   # the metrics' keys
    if len(set(names)) != len(names):
        raise UserError(f'two of the runs have the same folder name ({", ".join(names)}): the comparison names each '
                        f'run by its folder; rename one')
    runs = [read_recipe_run(p) + (p,) for p in run_dirs]
    samplers = sorted({m['sampler'] for _, _, m, _ in runs if 'sampler' in m})
    out = RunDir(out_dir)
    out.write_json('config.json', {'model': 'ddpm-recipes', 'runs': list(run_dirs), 'command': command,
                                   'git_commit': git_commit()})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for label, curve, _, _ in runs:
        ax.plot(*zip(*curve), marker='o', label=label)
    first = runs[0][2]
    n = first['quality_samples'] if 'quality_samples' in first else first['sample_batch']
    if 'vae_digit_fd' in first:
        ax.axhline(first['vae_digit_fd'], color='tab:red', ls='--', label=f'VAE samples ({n})')
    ax.axhline(first['reference_digit_fd'], color='grey', ls='--', label=f'training images ({n}, calibration)')
    ax.set_xlabel('training time (minutes, sampling not counted)')
    ax.set_ylabel(f'digit FD of {n} samples to test images\n(lower is better)')
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f'DDPM training recipes at equal wall time ({first["device"]})\nsamples: {"; ".join(samplers)}, '
                 f'same seed at every point', fontsize=10)
    fig.tight_layout()
    figure = out.file('recipes_fd_vs_minutes.png')
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    metrics = {name: dict(label=label, run=path, minutes=[round(m, 2) for m, _ in curve],
                          digit_fd=[fd for _, fd in curve], train_minutes=round(curve[-1][0], 2),
                          final_digit_fd=summary['digit_fd'], sampler=summary.get('sampler'),
                          **{k: summary[k] for k in ('epochs', 'num_train', 'device') if k in summary})
               for name, (label, curve, summary, path) in zip(names, runs)}
    out.write_summary('ddpm-recipes', {'2.2e': [figure]}, metrics)
    for label, curve, _, _ in runs:
        print(f'{label}: ' + ', '.join(f'{m:.0f} min: FD {fd:.0f}' for m, fd in curve))
    return metrics

