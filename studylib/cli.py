"""The command-line flags every driver shares (SPEC.md, "Drivers") and the one way drivers report user errors."""
import argparse
import contextlib
import shlex
import sys

from . import UserError


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be 0 or a positive integer, got {text}')
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' for flags that have a value by default; not for switches or unset options."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def make_parser(description, *, out_dir, epochs, batch_size, lr, seed=0):
    """A parser holding the common flags, with the driver's defaults (the assignment's settings)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    common = parser.add_argument_group('common to every driver')
    common.add_argument('--data-dir', default='./data',
                        help='folder holding the standard dataset files, or where torchvision downloads them')
    common.add_argument('--no-download', action='store_true',
                        help='never touch the network: exit at once if a dataset file is missing')
    common.add_argument('--out-dir', default=out_dir, help='the run folder (config, metrics, figures, checkpoint)')
    common.add_argument('--epochs', type=positive_int, default=epochs, help='training epochs')
    common.add_argument('--batch-size', type=positive_int, default=batch_size, help='training batch size')
    common.add_argument('--lr', type=positive_float, default=lr, help='learning rate')
    common.add_argument('--seed', type=int, default=seed, help='seed of every random number generator')
    common.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto',
                        help='where to train; auto = cuda when available')
    common.add_argument('--limit-train', type=positive_int, default=None, metavar='N',
                        help='use only the first N training images (smoke tests, CPU runs); all when unset')
    common.add_argument('--limit-test', type=positive_int, default=None, metavar='N',
                        help='use only the first N test images; all when unset')
    common.add_argument('--resume', action='store_true',
                        help="continue from the run folder's checkpoint (after its last finished epoch)")
    common.add_argument('--checkpoint-every', type=non_negative_int, default=500, metavar='STEPS',
                        help='also checkpoint every STEPS optimizer steps inside an epoch (0: only at epoch ends); '
                             'Ctrl-C / SIGTERM checkpoint at the current step too; --resume continues exactly there')
    common.add_argument('--allow-nan', action='store_true',
                        help='train on through non-finite losses (by default the run stops, naming the step, and '
                             'keeps the last good checkpoint)')
    common.add_argument('--amp', choices=['auto', 'on', 'off'], default='auto',
                        help='bf16 autocast of the training step; auto = on for a CUDA GPU with bf16, off on the CPU')
    common.add_argument('--compile', action='store_true',
                        help='torch.compile the training step (a minute of compilation first; pays off on long runs)')
    return parser


@contextlib.contextmanager
def user_errors():
    """Turn a UserError into one line on stderr and exit status 2; let real bugs keep their traceback."""
    try:
        yield
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        sys.exit(getattr(exc, 'exit_code', 2))


def run_main(script, parse_args, train, argv=None):
    """A driver's main(): parse (argparse errors exit 2 by themselves), then train with user errors as one line.

    `train(args, command, ranks)` gets the command line as the user typed it, for config.json, and the process's
    place under torchrun (studylib.dist.Ranks; one process without torchrun)."""
    from .dist import setup, teardown
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    with user_errors():
        ranks = setup(args.device)   # one process, or this process's rank under torchrun
        try:
            return train(args, shlex.join(['python', script, *argv]), ranks)
        finally:
            teardown(ranks)
