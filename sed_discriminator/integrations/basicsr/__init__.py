"""SeD in BasicSR and Real-ESRGAN, chosen in the YAML config.

:func:`register` adds to BasicSR's registries the architecture ``ConditionedSeD`` (its YAML
keys are the constructor arguments of :class:`sed_discriminator.ConditionedSeD`) and the
model types ``SeDSRGANModel``, ``SeDESRGANModel`` and ``SeDRealESRGANModel``, whose training
steps give the discriminator the HR batch. The launcher registers them and runs BasicSR's
``train_pipeline`` with the current directory as root::

    python -m sed_discriminator.integrations.basicsr -opt options.yml
    torchrun --nproc_per_node=4 -m sed_discriminator.integrations.basicsr -opt options.yml --launcher pytorch

Needs ``basicsr-fixed`` (``pip install basicsr-fixed``); see docs/integrations.md.
"""

from __future__ import annotations


def _import_basicsr() -> None:
    try:
        import basicsr.models  # noqa: F401  (imports BasicSR's archs, data, losses and models)
    except ModuleNotFoundError as err:
        if err.name == "torchvision.transforms.functional_tensor":
            raise ImportError(
                "The installed `basicsr` is PyPI's basicsr 1.4.2, which does not import with torchvision >= 0.17. "
                "Replace it: `pip uninstall basicsr && pip install basicsr-fixed` (the same code and import name; "
                "the `basicsr` extra of sed-discriminator installs it too). "
                "For Real-ESRGAN add `pip install --no-deps realesrgan`."
            ) from err
        if err.name is not None and err.name.split(".")[0] == "basicsr":
            raise ImportError(
                "sed_discriminator.integrations.basicsr needs BasicSR: pip install basicsr-fixed "
                '(or the `basicsr` extra: pip install ".[basicsr]" in a clone of sed-discriminator).'
            ) from err
        raise


_import_basicsr()

from .._common import REGISTRY_NAME, TrainerConditionedSeD, add_to_registry, deprecated_conditioned_sed  # noqa: E402
from .models import SeDESRGANModel, SeDRealESRGANModel, SeDSRGANModel, load_sed_checkpoint  # noqa: E402

__getattr__ = deprecated_conditioned_sed(__name__)  # 0.2's ConditionedSeD, renamed TrainerConditionedSeD

__all__ = [
    "SeDESRGANModel",
    "SeDRealESRGANModel",
    "SeDSRGANModel",
    "TrainerConditionedSeD",
    "load_sed_checkpoint",
    "main",
    "register",
]


def register() -> list[str]:
    """Add SeD's architecture (``ConditionedSeD``) and model types to BasicSR's registries; safe to call again.

    Call it before BasicSR builds the model, in every process (the launcher does; so must a
    training script of your own: ``register()`` then ``basicsr.train.train_pipeline(root)``).

    Returns:
        The model types registered (``SeDRealESRGANModel`` only where Real-ESRGAN's model
        class, or BasicSR's copy of it, can be imported).

    Raises:
        ValueError: another object is already registered under one of the names.

    Example:
        >>> from sed_discriminator.integrations.basicsr import register
        >>> register()
        ['SeDSRGANModel', 'SeDESRGANModel', 'SeDRealESRGANModel']
    """
    from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY

    add_to_registry(ARCH_REGISTRY, REGISTRY_NAME, TrainerConditionedSeD)
    models = [m for m in (SeDSRGANModel, SeDESRGANModel, SeDRealESRGANModel) if m is not None]
    for model in models:
        add_to_registry(MODEL_REGISTRY, model.__name__, model)
    return [m.__name__ for m in models]


def main(argv: list[str] | None = None) -> None:
    """Register, then run BasicSR's ``train_pipeline`` with the current directory as root.

    ``experiments/<name>`` and ``tb_logger/<name>`` are written under the current directory,
    relative paths in the YAML file are read from it, and ``--auto_resume`` looks there.

    Args:
        argv: BasicSR's command line (``-opt options.yml [--launcher pytorch] [--auto_resume]
            [--debug] [--force_yml key=value ...]``); ``None`` reads ``sys.argv``.
    """
    import os
    import sys

    from basicsr.train import train_pipeline

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv[0] = "python -m sed_discriminator.integrations.basicsr"  # the program name BasicSR's --help shows
    train_pipeline(os.getcwd())
