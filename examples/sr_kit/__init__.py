"""Building blocks of the example scripts (not part of ``sed_discriminator``): data, models, checkpoints, metrics,
plots, torchrun set-up. The scripts in ``examples/`` put this folder on ``sys.path``; copy a piece to reuse it."""
