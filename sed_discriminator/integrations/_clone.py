"""The adapter for a trainer that runs from its git clone (traiNNer-redux, neosr): one class, two instances.

Both trainers build their model with ``<package>.models.build_model`` and train it with
``optimize_parameters``; they differ in the package name, the registry's spelling of names, the
batch their discriminator judges as real, and the config file's format. :class:`CloneTrainer`
holds those differences; the adapter modules bind its methods as their public functions.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._common import (
    REGISTRY_NAME,
    TrainerConditionedSeD,
    add_to_registry,
    check_no_data_parallel,
    log_diagnostics,
    step_condition,
)

__all__ = ["CloneTrainer"]


@dataclass(frozen=True)
class CloneTrainer:
    """What differs between the trainers run from a clone; its methods are the adapter's functions.

    Args:
        package: the trainer's import name (``"traiNNer"``); lower-cased, the adapter module's name.
        repository: where users clone it from.
        config: the config file placeholder of the usage line (``"options.yml"``).
        trainer: the trainer's name for messages (``"traiNNer-redux"``); default ``package``.
        lowercase_registry: the registry stores names lower-cased (traiNNer-redux).
        real_hr: the batch the model's step judges as real, from the model; default ``model.gt``.
    """

    package: str
    repository: str
    config: str
    trainer: str = ""
    lowercase_registry: bool = False
    real_hr: Callable[[Any], Any] = lambda model: getattr(model, "gt", None)

    @property
    def module(self) -> str:
        """The adapter's module name under ``sed_discriminator.integrations``."""
        return self.package.lower()

    @property
    def name(self) -> str:
        """The trainer's name for messages."""
        return self.trainer or self.package

    @property
    def launch_hint(self) -> str:
        """The torchrun command for several GPUs (named in the DataParallel error)."""
        return (
            f"torchrun --nproc_per_node=N -m sed_discriminator.integrations.{self.module} <clone> -opt <{self.config}> "
            "--launcher pytorch"
        )

    def functions(self) -> tuple[Callable[..., Any], ...]:
        """``(use_clone, register, hook_model, install, main)``: the adapter module's public functions."""
        return self.use_clone, self.register, self.hook_model, self.install, self.main

    def use_clone(self, path: str | os.PathLike) -> Path:
        """Put the trainer's clone first on ``sys.path`` and return its absolute path.

        Raises:
            FileNotFoundError: ``path`` is not such a clone (no ``train.py`` and ``<package>/``).
        """
        clone = Path(path).expanduser().resolve()
        if not (clone / "train.py").is_file() or not (clone / self.package / "__init__.py").is_file():
            raise FileNotFoundError(
                f"{clone} is not a {self.name} clone (it needs train.py and the {self.package}/ package). Pass the "
                f"folder you cloned {self.repository} into."
            )
        if str(clone) not in sys.path:
            sys.path.insert(0, str(clone))
        return clone

    def register(self) -> None:
        """Add ``ConditionedSeD`` (:class:`TrainerConditionedSeD`) to the trainer's architecture registry; idempotent.

        Needs the trainer importable (see :meth:`use_clone`); neosr parses ``sys.argv`` when it is
        imported, so ``-opt <options.toml>`` must be on it.
        """
        registry = importlib.import_module(f"{self.package}.utils.registry").ARCH_REGISTRY
        key = REGISTRY_NAME.lower() if self.lowercase_registry else REGISTRY_NAME
        add_to_registry(registry, key, TrainerConditionedSeD)

    def hook_model(self, model: Any) -> Any:
        """Make ``model.optimize_parameters`` give its ConditionedSeD the step's real HR batch; returns ``model``.

        The condition holds for everything the step runs (neosr's ``closure``, called again by its
        SAM optimizer, and the optimizer steps after it). Works on any model object with ``net_d``,
        ``gt`` and an ``optimize_parameters`` method; hooking twice does nothing; models without a
        ConditionedSeD train as before.

        Raises:
            RuntimeError: the model's ConditionedSeD is wrapped in DataParallel.
        """
        check_no_data_parallel(getattr(model, "net_d", None), launch_hint=self.launch_hint)
        step = model.optimize_parameters
        if getattr(step, "__sed_conditioned__", False):
            return model

        def conditioned_step(*args: Any, **kwargs: Any) -> Any:
            net_d, hr = getattr(model, "net_d", None), self.real_hr(model)
            with step_condition(net_d, hr, launch_hint=self.launch_hint):
                result = step(*args, **kwargs)
            log_diagnostics(net_d, model, args[0] if args else kwargs.get("current_iter"), hr)
            return result

        conditioned_step.__wrapped__ = step  # type: ignore[attr-defined]
        conditioned_step.__sed_conditioned__ = True  # type: ignore[attr-defined]
        model.optimize_parameters = conditioned_step
        return model

    def install(self) -> None:
        """Register the architecture and hook every model ``<package>.models.build_model`` builds from now on.

        Call it before the trainer's ``train.py`` is imported (it binds ``build_model`` at import).
        Safe to call again: a factory that is hooked already stays as it is.
        """
        models = importlib.import_module(f"{self.package}.models")
        self.register()
        original = models.build_model
        if getattr(original, "__sed_conditioned__", False):
            return

        def build_model(opt: Any) -> Any:
            return self.hook_model(original(opt))

        build_model.__wrapped__ = original  # type: ignore[attr-defined]
        build_model.__sed_conditioned__ = True  # type: ignore[attr-defined]
        build_model.__doc__ = original.__doc__
        models.build_model = build_model

    def main(self, argv: list[str] | None = None) -> None:
        """Run the clone's ``train.py`` with SeD registered and its training step hooked.

        The working directory becomes the clone, as for the clone's own ``python train.py`` (its
        relative paths, e.g. datasets in the config, are read from there); a relative ``-opt``
        path is taken from the directory the launcher was started in. ``sys.argv`` is set before
        the trainer is imported (neosr parses its options then).

        Args:
            argv: ``[clone, *train.py arguments]``; ``None`` reads ``sys.argv[1:]``.
        """
        args = list(sys.argv[1:] if argv is None else argv)
        if not args or args[0].startswith("-"):
            raise SystemExit(
                f"usage: python -m sed_discriminator.integrations.{self.module} <path of your {self.name} clone> "
                f"-opt <{self.config}> [train.py flags]\n(the first argument must be the clone's path)"
            )
        clone = self.use_clone(args[0])
        args = args[1:]
        for i, arg in enumerate(args[:-1]):
            if arg == "-opt":
                args[i + 1] = os.path.abspath(args[i + 1])
        os.chdir(clone)
        sys.argv = [str(clone / "train.py"), *args]
        self.install()
        runpy.run_path(str(clone / "train.py"), run_name="__main__")
