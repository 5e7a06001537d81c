"""Figure helpers: image grids with a caption, training-time figures and metric curves, saved as PNG.

Every figure carries a title saying what it shows and when (the epoch), labelled axes with units, and a legend
where several lines share axes, so it reads without the code.
"""
import math
import textwrap

import torch


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (drivers run on headless GPU boxes and in CI).

    Imported on first use, not with this module: a driver that stops at a missing dataset file should not pay
    for matplotlib's import first."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def grid_array(images, nrow):
    """(N, 3, H, W) float in [-1, 1] -> (rows*(H+2)-2, nrow*(W+2)-2, 3) float in [0, 1], 2-pixel white gaps."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    canvas = torch.ones(c, rows * (h + 2) - 2, nrow * (w + 2) - 2)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, r * (h + 2):r * (h + 2) + h, col * (w + 2):col * (w + 2) + w] = images[i]
    return canvas.permute(1, 2, 0).numpy()  # (H', W', C)


def save_image_grid(images, path, title, nrow=8, row_labels=None, scale=0.45):
    """Save a grid of images with a title; optional row labels on the left (e.g. 'original' / 'reconstruction')."""
    plt = pyplot()
    rows = math.ceil(len(images) / nrow)
    width = max(5.0, nrow * scale + (0.08 * max(map(len, row_labels)) + 0.3 if row_labels else 0))
    # ~11 characters per inch at 10 pt; each given line is wrapped on its own so that its breaks survive
    title = '\n'.join(textwrap.fill(line, width=int(width * 11)) for line in title.split('\n'))
    fig, ax = plt.subplots(figsize=(width, rows * scale + 0.45 + 0.19 * (title.count('\n') + 1)))
    ax.imshow(grid_array(images, nrow), interpolation='nearest')
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    if row_labels:
        h = images.shape[-2] + 2
        ax.set_yticks([r * h + h / 2 - 1 for r in range(len(row_labels))])
        ax.set_yticklabels(row_labels, fontsize=8)
        ax.tick_params(axis='y', length=0)
    else:
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches='tight', pad_inches=0.1)  # the box of the title and grid, not a guess
    plt.close(fig)
    return path


def save_time_figure(epochs, seconds, path, title, note=None):
    """Wall-clock training time: cumulative seconds against epoch (left) and seconds of each epoch (right).

    `note` is a line under the title, e.g. the time it takes to sample one batch."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    cumulative = [0.0]
    for s in seconds:
        cumulative.append(cumulative[-1] + s)
    total = cumulative[-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot([epochs[0] - 1] + list(epochs), cumulative, marker='o', markersize=3)
    left.set_xlabel('epoch')
    left.set_ylabel('cumulative training time (s)')
    left.set_title(f'total {total:.0f} s over {len(epochs)} epochs', fontsize=10)
    left.grid(alpha=0.3)
    right.bar(epochs, seconds, color='tab:orange')
    right.set_xlabel('epoch')
    right.set_ylabel('seconds per epoch')
    right.set_title(f'mean {total / max(len(epochs), 1):.1f} s per epoch', fontsize=10)
    right.grid(alpha=0.3, axis='y')
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title + ('\n' + note if note else ''), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

