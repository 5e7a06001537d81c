"""The command-line flags every driver shares (docs/api.md) and the one way drivers report user errors."""
import argparse
import contextlib
import errno
import math
import shlex
import signal
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
    if not (value > 0 and math.isfinite(value)):  # refuses nan and inf too
        raise argparse.ArgumentTypeError(f'must be a positive finite number, got {text}')
    return value


def seed_int(text):
    """numpy seeds 0 <= seed < 2**32: refused here rather than by a numpy traceback."""
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f'must be an integer from 0 to 2**32 - 1, got {text}')
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
    common.add_argument('--seed', type=seed_int, default=seed, help='seed of every random number generator')
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


class Stopped(UserError):
    """A signal outside the training loop (in end-of-epoch sampling, the final stage): exit 130 with one line."""
    exit_code = 130


# environment failures while writing: one line, like a user error (the message names the file)
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                       errno.EISDIR}


@contextlib.contextmanager
def user_errors():
    """Turn a UserError (and a full disk, a read-only or forbidden path) into one line on stderr and exit status 2;
    Ctrl-C and SIGTERM/SIGHUP outside the training loop into one line and status 130; real bugs keep their
    traceback."""
    try:
        yield
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        sys.exit(getattr(exc, 'exit_code', 2))
    except KeyboardInterrupt:
        print('error: interrupted; the last checkpoint (if any) is kept: rerun the same command with --resume to '
              'continue from it', file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f' {exc.filename}' if exc.filename else ''
        print(f'error: could not write{where}: {exc.strerror}; free space, fix the permissions or choose another '
              f'--out-dir, then rerun (with --resume when a checkpoint was saved)', file=sys.stderr)
        sys.exit(2)


def _stop(signum, frame):
    raise KeyboardInterrupt   # the training loop installs its own handlers, which checkpoint first


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGHUP end the process the way Ctrl-C does (one line, exit 130) wherever it is outside the
    training loop, instead of dying silently with 143 or leaving no line; the loop checkpoints on them."""
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, _stop)
    except ValueError:   # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_main(script, parse_args, train, argv=None):
    """A driver's main(): parse (argparse errors exit 2 by themselves), then train with user errors as one line.

    `train(args, command, ranks)` gets the command line as the user typed it, for config.json, and the process's
    place under torchrun (studylib.dist.Ranks; one process without torchrun)."""
    from .dist import setup, teardown
    from .run import release_locks
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    with user_errors(), stop_on_signals():
        ranks = setup(args.device)   # one process, or this process's rank under torchrun
        try:
            return train(args, shlex.join(['python', script, *argv]), ranks)
        finally:
            teardown(ranks)
            release_locks()


def run_tool(build_parser, work, argv=None, invoked_as=''):
    """A tool's main() (compare_ddpm.py, probe_ddpm.py): parse with build_parser(invoked_as), then
    work(args, command) with user errors as one line, and the folder locks released however it ends. `invoked_as`
    is the head of the command line as typed: the usage line and config.json's "command" start with it."""
    from .run import release_locks
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(invoked_as).parse_args(argv)
    with user_errors():
        try:
            return work(args, shlex.join([*shlex.split(invoked_as), *argv]))
        finally:
            release_locks()
