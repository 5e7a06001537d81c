"""Support code shared by the three training drivers: data, run folders, checkpoints, command line, figures.

The solution modules (vae_solution.py, ddpm_solution.py, q3_solution.py) never import this package: they are
graded alone. Everything here is about running studies, not about the models.
"""


class UserError(Exception):
    """A problem the user can fix (missing data, bad checkpoint, bad flag combination).

    The drivers print its message as one line on stderr and exit with status 2, before anything is overwritten.
    """
