"""2.3a: compare DDPM runs that differ in T (training time per epoch, sampling time, sample quality).

    python -m studylib.compare runs/ddpm-T500 runs/ddpm runs/ddpm-T1500 --out-dir runs/ddpm-compare

Reads each run folder's summary.json and writes, into --out-dir, the figure 2.3a_tradeoff.png, the table
2.3a_table.md and a summary.json with id 2.3a whose metrics hold one entry per T.
"""
import argparse
import json
import os
import sys

from . import UserError
from .cli import HelpFormatter, user_errors
from .plots import pyplot
from .run import RunDir, git_commit


def read_ddpm_run(path):
    summary_path = os.path.join(path, 'summary.json')
    if not os.path.exists(summary_path):
        raise UserError(f'{path} has no summary.json: is it a finished train_ddpm.py run folder?')
    try:
        with open(summary_path) as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f'{summary_path} is unreadable ({exc})') from exc
    if summary.get('model') != 'ddpm':
        raise UserError(f'{path} is a {summary.get("model")} run, not a DDPM run')
    return summary['metrics']


def compare(run_dirs, out_dir, command):
    runs = sorted((read_ddpm_run(p) | {'run': p} for p in run_dirs), key=lambda m: m['timesteps'])
    if len({m['timesteps'] for m in runs}) != len(runs):
        raise UserError('two of the runs have the same T: give one run per T')
    plt = pyplot()

    out = RunDir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    out.write_json('config.json', {'model': 'ddpm-compare', 'runs': list(run_dirs), 'command': command,
                                   'git_commit': git_commit()})
    ts = [m['timesteps'] for m in runs]
    panels = [('seconds_per_epoch_mean', 'training time per epoch (s)'),
              ('sample_seconds', 'seconds to sample one batch'),
              ('digit_fd', 'digit Frechet distance to test images\n(lower is better)')]
    reference = runs[0]['reference_digit_fd']
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label) in zip(axes, panels):
        values = [m[key] for m in runs]
        ax.plot(ts, values, marker='o')
        top = max(values + ([reference] if key == 'digit_fd' else []))   # the calibration line must stay in view
        ax.set_xlabel('diffusion steps T')
        ax.set_ylabel(label)
        ax.set_xticks(ts)
        ax.set_ylim(0, 1.2 * top)  # from zero: a few per cent of timing noise is not a trend
        ax.grid(alpha=0.3)
    axes[2].axhline(reference, color='grey', ls='--',
                    label=f'calibration: {runs[0]["sample_batch"]} training images')
    axes[2].legend(fontsize=8, loc='center right')
    devices = sorted({m['device'] for m in runs})
    fig.suptitle(f'DDPM trade-off against T ({", ".join(devices)}; epochs: '
                 f'{", ".join(str(m["epochs"]) for m in runs)}; sampling batch: '
                 f'{", ".join(str(m["sample_batch"]) for m in runs)})', fontsize=10)
    fig.tight_layout()
    figure = out.file('2.3a_tradeoff.png')
    fig.savefig(figure, dpi=110)
    plt.close(fig)

    lines = ['| T | epochs | train s/epoch | sampling s (batch) | digit FD | digit confidence | t* | run |',
             '|---|---|---|---|---|---|---|---|']
    for m in runs:
        lines.append(f'| {m["timesteps"]} | {m["epochs"]} | {m["seconds_per_epoch_mean"]:.1f} | '
                     f'{m["sample_seconds"]:.1f} ({m["sample_batch"]}) | {m["digit_fd"]:.2f} | '
                     f'{m["digit_confidence"]:.3f} | '
                     f'{m["t_star"]} | {m["run"]} |')
    ref = runs[0]
    lines.append(f'| training images (calibration) | | | ({ref["sample_batch"]}) | {ref["reference_digit_fd"]:.2f} | '
                 f'{ref["reference_digit_confidence"]:.3f} | | |')
    with open(out.file('2.3a_table.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    metrics = {f'T{m["timesteps"]}': {k: m[k] for k in ('epochs', 'seconds_per_epoch_mean', 'sample_seconds',
                                                          'sample_batch', 'digit_fd', 'digit_confidence',
                                                          'reference_digit_fd', 'reference_digit_confidence', 't_star',
                                                          'device', 'run')} for m in runs}
    out.write_summary('ddpm-compare', {'2.3a': [figure]}, metrics)
    print('\n'.join(lines))
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('runs', nargs='+', help='train_ddpm.py run folders, one per T')
    parser.add_argument('--out-dir', default='runs/ddpm-compare', help='where the 2.3a figure and table go')
    args = parser.parse_args(argv)
    with user_errors():
        return compare(args.runs, args.out_dir, 'python -m studylib.compare ' + ' '.join(
            argv if argv is not None else sys.argv[1:]))


if __name__ == '__main__':
    main(sys.argv[1:])
