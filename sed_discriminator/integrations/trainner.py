"""SeD in traiNNer-redux, chosen in its YAML config.

traiNNer-redux runs from its clone and has no ``model_type``: ``traiNNer.models.build_model``
picks the model class (SRModel, RealESRGANModel, ...). This adapter registers the
architecture ``ConditionedSeD`` (traiNNer-redux lower-cases registry names, so ``type:
conditionedsed`` or ``type: ConditionedSeD``) and wraps ``build_model`` so that the training
step of the model it builds, ``optimize_parameters(current_iter, current_accum_iter,
apply_gradient)``, runs inside ``net_d.condition(hr)`` on the bare discriminator. ``hr`` is
the batch the step's discriminator judges as real: ``model._real_hr`` (ECO) where set, else
``model.gt``.

Launch (the clone's own ``train.py`` runs, with its flags; experiments go to the clone as usual)::

    python -m sed_discriminator.integrations.trainner /path/to/traiNNer-redux -opt options/train/x.yml
    torchrun --nproc_per_node=N -m sed_discriminator.integrations.trainner /path/to/traiNNer-redux \\
        -opt options/train/x.yml --launcher pytorch

traiNNer-redux is not on the package index: nothing here imports it before :func:`main` (or
:func:`register`) puts the clone on ``sys.path``. See docs/integrations.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ._common import (
    ConditionedSeD,
    add_clone_to_path,
    add_to_registry,
    check_no_data_parallel,
    hook_build_model,
    run_train_script,
    wrap_step,
)

__all__ = ["ConditionedSeD", "hook_model", "install", "main", "register", "use_clone"]

LAUNCH_HINT = (
    "torchrun --nproc_per_node=N -m sed_discriminator.integrations.trainner <clone> -opt <options.yml> "
    "--launcher pytorch"
)
_USAGE = (
    "usage: python -m sed_discriminator.integrations.trainner <path of your traiNNer-redux clone> "
    "-opt <options.yml> [train.py flags]"
)


def use_clone(path: str | os.PathLike) -> Path:
    """Put a traiNNer-redux clone first on ``sys.path`` and return its absolute path.

    Raises:
        FileNotFoundError: ``path`` is not a traiNNer-redux clone (no ``train.py`` and ``traiNNer/``).
    """
    return add_clone_to_path(path, package="traiNNer", trainer="traiNNer-redux", repository="github.com/the-database/traiNNer-redux")


def register() -> None:
    """Add ``ConditionedSeD`` to traiNNer-redux's architecture registry; safe to call again.

    Needs ``traiNNer`` importable (see :func:`use_clone`).
    """
    from traiNNer.utils.registry import ARCH_REGISTRY

    add_to_registry(ARCH_REGISTRY, ConditionedSeD.__name__.lower(), ConditionedSeD)


def _real_hr(model: Any) -> Any:
    real = getattr(model, "_real_hr", None)
    return real if real is not None else getattr(model, "gt", None)


def hook_model(model: Any) -> Any:
    """Make ``model.optimize_parameters`` give its ConditionedSeD the step's HR batch; returns ``model``.

    Works on any model object with ``net_d``, ``gt`` (and optionally ``_real_hr``) and an
    ``optimize_parameters`` method; hooking twice does nothing. Models without a
    ConditionedSeD train as before.

    Raises:
        RuntimeError: the model's ConditionedSeD is wrapped in DataParallel.
    """
    check_no_data_parallel(getattr(model, "net_d", None), launch_hint=LAUNCH_HINT)
    step = model.optimize_parameters
    if getattr(step, "__sed_conditioned__", False):
        return model
    model.optimize_parameters = wrap_step(
        step, lambda: getattr(model, "net_d", None), lambda: _real_hr(model), launch_hint=LAUNCH_HINT
    )
    return model


def install() -> None:
    """Register the architecture and hook every model ``traiNNer.models.build_model`` builds from now on.

    Call it before traiNNer-redux's ``train.py`` is imported (it binds ``build_model`` at import).
    """
    import traiNNer.models as models

    register()
    hook_build_model(models, hook_model)


def main(argv: list[str] | None = None) -> None:
    """Run a traiNNer-redux clone's ``train.py`` with SeD registered and its training step hooked.

    The working directory becomes the clone, as for the clone's own ``python train.py`` (its
    relative paths, e.g. datasets in the config, are read from there); a relative ``-opt``
    path is taken from the directory the launcher was started in.

    Args:
        argv: ``[clone, *train.py arguments]``; ``None`` reads ``sys.argv[1:]``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        raise SystemExit(f"{_USAGE}\n(the first argument must be the clone's path)")
    run_train_script(use_clone(args[0]), args[1:], install)


if __name__ == "__main__":
    main()
