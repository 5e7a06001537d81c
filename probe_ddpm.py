"""2.3b: what a trained DDPM U-Net's features know about the digit, against the VAE's posterior mean and pixels.

    python probe_ddpm.py --ddpm runs/ddpm --vae runs/vae --out-dir runs/ddpm-probe
    python probe_ddpm.py --ddpm runs/ddpm --vae runs/vae --t 0,100,500 --limit-train 500 --device cpu

For each t, train and test images are noised to x_t and three frozen feature maps read it (the DDPM U-Net's
pooled middle block, the VAE's posterior mean, the pixels); a linear classifier fitted on each gives its test top-1
accuracy (studylib.probe, whose docstring has the details). The figure has id 2.3b.

--out-dir must be a new folder: one of the two input runs, a finished run or a training run is refused (one line,
exit status 2) before anything is read or written, and the folder is locked while the probe writes into it.
"""
import argparse

from studylib.run import HelpFormatter, positive_int, run_tool, seed_int
from studylib.probe import parse_t_list, probe

COMMAND = 'python probe_ddpm.py'


def build_parser():
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split('\n')[0], formatter_class=HelpFormatter)
    parser.add_argument('--ddpm', required=True, metavar='RUN_DIR', help='a finished train_ddpm.py run folder')
    parser.add_argument('--vae', required=True, metavar='RUN_DIR', help='a finished train_vae.py run folder')
    parser.add_argument('--data-dir', default='./data', help='folder holding the SVHN .mat files')
    parser.add_argument('--no-download', action='store_true', help='never touch the network')
    parser.add_argument('--out-dir', default='runs/ddpm-probe',
                        help='where the 2.3b figure and summary go: a new folder, not one of the runs')
    parser.add_argument('--t', type=parse_t_list, default=[0, 50, 100, 250, 500],
                        help='comma-separated diffusion steps to noise the images to')
    parser.add_argument('--limit-train', type=positive_int, default=2000, help='training images for the probe')
    parser.add_argument('--limit-test', type=positive_int, default=2000, help='test images for the probe')
    parser.add_argument('--seed', type=seed_int, default=0, help='seed of the noise added to the images')
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto')
    return parser


def main(argv=None):
    """The probe's metrics (accuracy per source and t, ...); a user error exits 2 with one line."""
    return run_tool(build_parser(), probe, argv)


if __name__ == '__main__':
    main()
