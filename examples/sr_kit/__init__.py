"""Building blocks of the example training scripts (not part of the ``sed_discriminator`` package).

- :mod:`sr_kit.data`: HR folders (LR made on the fly) or paired HR/LR folders, random crops,
  flips and rotations, a resumable sample stream, the bundled scikit-image photos.
- :mod:`sr_kit.models`: ESRGAN's RRDBNet through spandrel, the discriminators the script can
  train (SeD, the plain P / U baselines, ESRGAN's VGG-style one), the VGG19 perceptual loss and
  pretrained-weight loading with an explicit random-weight fallback.
- :mod:`sr_kit.checkpoint`: one-file checkpoints written atomically and verified on load,
  keep-last-K, RNG states, a lock per run folder.
- :mod:`sr_kit.metrics`: PSNR / SSIM on the Y channel (as the paper measures) and optional LPIPS.
- :mod:`sr_kit.plots`: the LR | SR | HR sample grid and the loss curves.
- :mod:`sr_kit.dist`: torchrun / DistributedDataParallel set-up.

The scripts in ``examples/`` put this folder on ``sys.path`` themselves; to use a piece in your
own code, copy it or add ``examples/`` to ``PYTHONPATH``.
"""
