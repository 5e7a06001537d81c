"""2.3a: compare DDPM runs that differ in T (training time per epoch, sampling time, sample quality).

    python compare_ddpm.py runs/ddpm-T500 runs/ddpm runs/ddpm-T1500 --out-dir runs/ddpm-compare
    python compare_ddpm.py --by recipe runs/ddpm-assignment runs/ddpm-cpu --out-dir runs/ddpm-recipes

Reads each run folder's summary.json and writes, into --out-dir, the figure 2.3a_tradeoff.png, the table
2.3a_table.md and a summary.json with id 2.3a whose metrics hold one entry per T (studylib.compare.compare()).
With --by recipe: recipes_fd_vs_minutes.png, the digit FD of each run's sampled batches against the training
minutes spent (studylib.compare.compare_recipes()), so that two recipes are compared at equal wall time.

Every problem with the inputs or the output folder is one line (exit status 2) before anything is written: a
summary.json that is not one (naming the file and the key), an --out-dir that is one of the input runs, holds a
finished run or a training run, cannot be written, or is in use by another process (it is locked while writing).
"""
import argparse

from studylib.run import HelpFormatter, run_tool
from studylib.compare import compare, compare_recipes

COMMAND = 'python compare_ddpm.py'


def build_parser():
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split('\n')[0], formatter_class=HelpFormatter)
    parser.add_argument('runs', nargs='+', help='train_ddpm.py run folders, one per T (or per recipe)')
    parser.add_argument('--by', choices=['T', 'recipe'], default='T',
                        help='T: the 2.3a trade-off against T; recipe: the runs\' digit FD against training minutes '
                             '(runs of train_ddpm.py --recipe assignment and --recipe cpu, at equal wall time)')
    parser.add_argument('--out-dir', default='runs/ddpm-compare',
                        help='where the 2.3a figure and table go: a new folder, not one of the runs')
    return parser


def main(argv=None):
    """The comparison's metrics ({'T<steps>': {...}}); a user error exits 2 with one line."""
    work = {'T': compare, 'recipe': compare_recipes}
    return run_tool(build_parser(), lambda args, command: work[args.by](args.runs, args.out_dir, command), argv)


if __name__ == '__main__':
    main()
