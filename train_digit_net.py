"""Train the digit classifier behind the DDPM sample-quality measure (studylib.digit_net) and cache it.

    python train_digit_net.py --data-dir ./data           # train once (1-2 minutes on one CPU core), cache
    python train_digit_net.py --data-dir ./data --force   # retrain even when a cached net exists

The net is trained on the whole SVHN training split of --data-dir, tested on the whole test split and cached in
the cache folder ($STUDYLIB_CACHE, else $XDG_CACHE_HOME/studylib or ~/.cache/studylib), one file per training file
content; nothing is written into the data folder. With a cached net already there, it is only reported. train_ddpm.py
loads the cached net (or trains it) by itself; this command trains it ahead of time.
"""
import argparse
import os

from studylib.run import HelpFormatter, positive_int, user_errors
from studylib.digit_net import BATCH_SIZE, EPOCHS, default_path, load_digit_net, train_and_save
from studylib.run import pick_device

COMMAND = 'python train_digit_net.py'


def build_parser():
    parser = argparse.ArgumentParser(prog=COMMAND, formatter_class=HelpFormatter,
                                     description='Train the digit classifier behind digit_quality() and cache it '
                                                 'in the cache folder ($STUDYLIB_CACHE or ~/.cache/studylib).')
    parser.add_argument('--data-dir', default='./data', help='folder holding the SVHN files (read only)')
    parser.add_argument('--epochs', type=positive_int, default=EPOCHS, help='training epochs')
    parser.add_argument('--batch-size', type=positive_int, default=BATCH_SIZE, help='training batch size')
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto',
                        help='where to train; auto = cuda when available')
    parser.add_argument('--no-download', action='store_true',
                        help='never touch the network: exit at once if an SVHN file is missing')
    parser.add_argument('--force', action='store_true', help='retrain even when a cached net exists')
    return parser


def main(argv=None):
    """The cached net's info (test_accuracy, num_train, num_test, epochs, ...); a user error exits 2 with one line."""
    args = build_parser().parse_args(argv)
    with user_errors():
        device = pick_device(args.device)
        path = default_path(args.data_dir)
        if path is not None and os.path.exists(path) and not args.force:
            _, info = load_digit_net(path, device)
            print(f'{path} already holds a digit net: {info["test_accuracy"]:.2f}% test accuracy on '
                  f'{info["num_test"]} images ({info["num_train"]} training images, {info["epochs"]} epochs); '
                  f'pass --force to retrain it')
            return info
        return train_and_save(args.data_dir, device, args.epochs, args.batch_size, not args.no_download)[1]


if __name__ == '__main__':
    main()
