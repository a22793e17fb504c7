"""SeD in neosr, chosen in its TOML config.

neosr runs from its clone and reads ``sys.argv`` when its packages are imported (its
architectures parse the options at import), so this adapter sets the command line first,
then imports neosr, registers the architecture ``ConditionedSeD`` and wraps
``neosr.models.build_model`` so that the training step of the model it builds (any
``model_type``: ``image``, ``otf``) runs inside ``net_d.condition(gt)`` on the bare
discriminator.

Launch (the clone's own ``train.py`` runs, with its flags; experiments go to the clone as usual)::

    python -m sed_discriminator.integrations.neosr /path/to/neosr -opt options/x.toml
    torchrun --nproc_per_node=N -m sed_discriminator.integrations.neosr /path/to/neosr \\
        -opt options/x.toml --launcher pytorch

Read docs/integrations.md first: at the version read, neosr computes the generator's GAN term
under ``torch.inference_mode()`` and calls the discriminator in ``eval()`` mode, which this
adapter does not change.
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
    "torchrun --nproc_per_node=N -m sed_discriminator.integrations.neosr <clone> -opt <options.toml> --launcher pytorch"
)
_USAGE = (
    "usage: python -m sed_discriminator.integrations.neosr <path of your neosr clone> -opt <options.toml> "
    "[train.py flags]"
)


def use_clone(path: str | os.PathLike) -> Path:
    """Put a neosr clone first on ``sys.path`` and return its absolute path.

    Raises:
        FileNotFoundError: ``path`` is not a neosr clone (no ``train.py`` and ``neosr/``).
    """
    return add_clone_to_path(path, package="neosr", trainer="neosr", repository="github.com/neosr-project/neosr")


def register() -> None:
    """Add ``ConditionedSeD`` to neosr's architecture registry; safe to call again.

    Importing neosr parses ``sys.argv`` (``-opt <options.toml>`` must be on it).
    """
    from neosr.utils.registry import ARCH_REGISTRY

    add_to_registry(ARCH_REGISTRY, ConditionedSeD.__name__, ConditionedSeD)


def hook_model(model: Any) -> Any:
    """Make ``model.optimize_parameters`` give its ConditionedSeD the step's ``gt``; returns ``model``.

    The condition holds for everything the step runs: neosr's ``closure`` (called again by its
    SAM optimizer) and the optimizer steps after it. Hooking twice does nothing; models without
    a ConditionedSeD train as before.

    Raises:
        RuntimeError: the model's ConditionedSeD is wrapped in DataParallel.
    """
    check_no_data_parallel(getattr(model, "net_d", None), launch_hint=LAUNCH_HINT)
    step = model.optimize_parameters
    if getattr(step, "__sed_conditioned__", False):
        return model
    model.optimize_parameters = wrap_step(
        step, lambda: getattr(model, "net_d", None), lambda: getattr(model, "gt", None), launch_hint=LAUNCH_HINT
    )
    return model


def install() -> None:
    """Register the architecture and hook every model ``neosr.models.build_model`` builds from now on.

    Call it before neosr's ``train.py`` is imported (it binds ``build_model`` at import).
    """
    import neosr.models as models

    register()
    hook_build_model(models, hook_model)


def main(argv: list[str] | None = None) -> None:
    """Run a neosr clone's ``train.py`` with SeD registered and its training step hooked.

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
