"""SeD inside BasicSR-family trainers: BasicSR / Real-ESRGAN, traiNNer-redux and neosr.

Each trainer calls ``net_d(x)`` with one tensor from inside its own model class. The adapters
here register :class:`TrainerConditionedSeD` (a :class:`~sed_discriminator.ConditionedSeD`) in
the trainer's architecture registry as ``ConditionedSeD`` and give its HR condition from the
trainer's own training step, so that SeD is chosen in the trainer's config file:

- :mod:`sed_discriminator.integrations.basicsr`: ``register()`` and the launcher
  ``python -m sed_discriminator.integrations.basicsr -opt options.yml`` (needs the ``basicsr``
  extra, or ``pip install basicsr-fixed``).
- :mod:`sed_discriminator.integrations.trainner`: launcher for a traiNNer-redux clone.
- :mod:`sed_discriminator.integrations.neosr`: launcher for a neosr clone.

Importing this package imports no trainer; see docs/integrations.md.
"""

from ._common import TrainerConditionedSeD

__all__ = ["TrainerConditionedSeD"]
