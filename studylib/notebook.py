"""What the notebooks in notebooks/ share: train through a driver's own main() once, then show the run's figures and
numbers inline. The training itself is the driver's; nothing here trains."""
import json
import os


def train_once(main, flags, out_dir):
    """Run a driver's main(flags + --out-dir out_dir) unless out_dir holds a finished run already; a run stopped
    half way (a checkpoint.pt in out_dir or, for a SimSiam experiment, in one of its configurations' folders) is
    continued with --resume. Returns the run's summary.json."""
    summary = os.path.join(out_dir, 'summary.json')
    if os.path.exists(summary):
        print(f'{out_dir} holds a finished run: showing it (delete the folder, or change OUT_DIR, to train again)')
    else:
        stopped = any('checkpoint.pt' in files for _, _, files in os.walk(out_dir))   # SimSiam: in sub-folders
        resume = ['--resume'] if stopped else []
        main([*flags, '--out-dir', out_dir, *resume])
    with open(summary) as f:
        return json.load(f)


def show_run(out_dir, summary, keep_progress=2):
    """Each figure of summary.json under its question id, inline (of a progress series, e.g. 1.3b's samples every
    few epochs, the first and the last: `keep_progress`), then the metrics as a table."""
    from IPython.display import Image, Markdown, display
    for qid, names in summary['figures'].items():
        shown = names if len(names) <= keep_progress else [names[0], names[-1]]
        skipped = f' ({len(names) - len(shown)} more in {out_dir})' if len(shown) < len(names) else ''
        display(Markdown(f'**{qid}**: {", ".join(shown)}{skipped}'))
        for name in shown:
            display(Image(filename=os.path.join(out_dir, name)))
    display(Markdown(metrics_table(summary['metrics'])))


def metrics_table(metrics):
    """summary.json's metrics as a Markdown table; a SimSiam experiment's (one dict per configuration) with one
    column per configuration."""
    def cell(value):
        return f'{value:.4g}' if isinstance(value, float) else str(value)
    if metrics and all(isinstance(v, dict) for v in metrics.values()):
        names = list(metrics)
        keys = [k for k in metrics[names[0]] if all(k in metrics[n] for n in names)]
        lines = ['| metric | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
        lines += [f'| {k} | ' + ' | '.join(cell(metrics[n][k]) for n in names) + ' |' for k in keys]
    else:
        lines = ['| metric | value |', '|---|---|'] + [f'| {k} | {cell(v)} |' for k, v in metrics.items()]
    return '\n'.join(lines)
