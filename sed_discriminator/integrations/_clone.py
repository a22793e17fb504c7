"""The adapter for a trainer that runs from its git clone (traiNNer-redux, neosr): one class, two instances.

Both trainers build their model with ``<package>.models.build_model``, train it with
``optimize_parameters`` and read and write networks with their base model class's
``load_network`` / ``save_network``; they differ in the package name, the registry's spelling of
names, the batch their discriminator judges as real, where a saved network goes, and the config
file's format. :class:`CloneTrainer` holds those differences; the adapter modules bind its
methods as their public functions.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import runpy
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._state import read_checkpoint
from ..weights import save_safetensors
from ._common import (
    REGISTRY_NAME,
    TrainerConditionedSeD,
    add_to_registry,
    bare_sed,
    check_no_data_parallel,
    iteration_label,
    load_sed_checkpoint,
    log_diagnostics,
    step_condition,
)

__all__ = ["CloneTrainer"]


def _models_folder_file(model: Any, arguments: Mapping[str, Any]) -> str:
    """Where BasicSR's layout (neosr's ``save_network``) writes a network: ``<path.models>/<label>_<iter>.pth``."""
    label = f"{arguments['net_label']}_{iteration_label(arguments['current_iter'])}.pth"
    return os.path.join(model.opt["path"]["models"], label)


def _is_main_process() -> bool:
    """Rank 0 or no process group: where the trainers' ``@master_only`` save runs."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
        base_model: ``"module:Class"``, the trainer's model base class that defines ``load_network``
            and ``save_network`` (hooked by :meth:`install`, before a model's constructor loads
            ``pretrain_network_d``).
        saved_file: the file the trainer's ``save_network`` wrote, from the model and the call's
            arguments by name; default ``<opt["path"]["models"]>/<net_label>_<iter>.pth`` (neosr).
    """

    package: str
    repository: str
    config: str
    trainer: str = ""
    lowercase_registry: bool = False
    real_hr: Callable[[Any], Any] = lambda model: getattr(model, "gt", None)
    base_model: str = ""
    saved_file: Callable[[Any, Mapping[str, Any]], str] = _models_folder_file

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

    @property
    def trust_hint(self) -> str:
        """How a user trusts ``pretrain_network_d`` in this trainer's config (named in the untrusted-file error)."""
        if self.config.endswith(".toml"):
            return "set `trust_pickle_d = true` under [network_d] for a file you trust"
        return "set `trust_pickle_d: true` under network_d for a file you trust"

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
        ConditionedSeD train as before. The model's ``load_network`` / ``save_network`` are hooked
        too (:meth:`hook_checkpoints`).

        Raises:
            RuntimeError: the model's ConditionedSeD is wrapped in DataParallel.
        """
        check_no_data_parallel(getattr(model, "net_d", None), launch_hint=self.launch_hint)
        self.hook_checkpoints(model)
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

    def hook_checkpoints(self, target: Any) -> Any:
        """Route an SeD's ``load_network`` / ``save_network`` through the library; returns ``target``.

        ``target`` is a model or a model class (:meth:`install` hooks the trainer's base class, whose
        constructors load ``pretrain_network_d`` before :meth:`hook_model` sees the model). For a
        network whose bare discriminator is an SeD:

        - ``load_network`` reads the file with :func:`~._common.load_sed_checkpoint`: the library's
          trust rule (a ``.pth`` file on torch < 2.10 only with ``trust_pickle_d: true`` under
          ``network_d``), legacy keys, errors that name the file and the fix;
        - ``save_network`` runs the trainer's own save, then writes the weights of the file it wrote
          as ``<label>_<iter>.safetensors`` beside it (rank 0 only): the file to share. Read back from
          the trainer's file, so it holds what that file holds (schedule-free optimizers swap D's
          weights only while the trainer saves; neosr saves D's EMA copy). A trainer that saves
          safetensors itself (traiNNer-redux's default) gets no second file.

        Any other network goes to the trainer's own methods, unchanged. Hooking twice does nothing.
        """
        for name, body in (("load_network", self._load_network), ("save_network", self._save_network)):
            original = getattr(target, name, None)
            if original is not None and not getattr(original, "__sed_conditioned__", False):
                setattr(target, name, _wrap(target, original, body))
        return target

    def _load_network(self, model: Any, call: Callable[[], Any], arguments: dict[str, Any] | None) -> Any:
        values = list(arguments.values()) if arguments else []
        bare = bare_sed(values[0], launch_hint=self.launch_hint) if len(values) >= 2 else None
        if bare is None:
            return call()
        load_sed_checkpoint(
            bare,
            values[1],
            strict=arguments.get("strict", True),
            param_key=arguments.get("param_key"),
            trust_pickle=getattr(bare, "trust_pickle_d", False),
            config=self.config,
            trust_hint=self.trust_hint,
            logger=logging.getLogger(self.package),
        )
        return None

    def _save_network(self, model: Any, call: Callable[[], Any], arguments: dict[str, Any] | None) -> Any:
        result = call()
        if not arguments or not _is_main_process():
            return result
        nets, keys = arguments.get("net"), arguments.get("param_key", "params")
        if isinstance(nets, (list, tuple)):  # neosr's save_network also takes lists (one file for all)
            if len(nets) != 1:
                return result
            nets, keys = nets[0], keys[0] if isinstance(keys, (list, tuple)) else keys
        bare = bare_sed(nets, launch_hint=self.launch_hint)
        if bare is None:
            return result
        saved = os.fspath(self.saved_file(model, arguments))
        target = os.path.splitext(saved)[0] + ".safetensors"
        if os.path.abspath(saved) == os.path.abspath(target):  # the trainer's own file is safetensors already
            return result
        logger = logging.getLogger(self.package)
        if not os.path.isfile(saved):
            logger.warning(f"{saved} was not written, so neither is {target}.")
            return result
        raw: Any = read_checkpoint(saved, trust_pickle=True)  # the file the trainer has just written, in this process
        if isinstance(raw, Mapping) and isinstance(raw.get(keys), Mapping):
            raw = raw[keys]
        save_safetensors(raw, target, overwrite=True, metadata={"variant": bare.variant})
        logger.info(f"Saved {target} (the weights of {os.path.basename(saved)}; the file to share).")
        return result

    def install(self) -> None:
        """Register the architecture and hook every model ``<package>.models.build_model`` builds from now on.

        Also hooks ``load_network`` / ``save_network`` of the trainer's base model class
        (:meth:`hook_checkpoints`), so that the constructors' ``pretrain_network_d`` follows the
        library's trust rule. Call it before the trainer's ``train.py`` is imported (it binds
        ``build_model`` at import). Safe to call again: what is hooked already stays as it is.
        """
        models = importlib.import_module(f"{self.package}.models")
        self.register()
        self._hook_base_model()
        original = models.build_model
        if getattr(original, "__sed_conditioned__", False):
            return

        def build_model(opt: Any) -> Any:
            return self.hook_model(original(opt))

        build_model.__wrapped__ = original  # type: ignore[attr-defined]
        build_model.__sed_conditioned__ = True  # type: ignore[attr-defined]
        build_model.__doc__ = original.__doc__
        models.build_model = build_model

    def _hook_base_model(self) -> None:
        if not self.base_model:
            return
        module, _, name = self.base_model.partition(":")
        try:
            base = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            warnings.warn(
                f"{self.name} has no {self.base_model} ({err}): this adapter was written for the commits named in "
                f"docs/integrations.md. pretrain_network_d is then read by {self.name}'s own torch.load (the "
                "library's trust rule does not apply: give it only files you trust); saves still get their "
                ".safetensors copy.",
                stacklevel=3,
            )
            return
        self.hook_checkpoints(base)

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


def _wrap(target: Any, original: Callable[..., Any], body: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` (a method of the model or class ``target``) as ``body(model, call, arguments)`` runs it."""
    signature = inspect.signature(original)  # looks through the trainers' @master_only (functools.wraps)
    if isinstance(target, type):
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])  # without self

        def method(model: Any, *args: Any, **kwargs: Any) -> Any:
            call = functools.partial(original, model, *args, **kwargs)
            return body(model, call, _arguments(signature, args, kwargs))

    else:

        def method(*args: Any, **kwargs: Any) -> Any:
            call = functools.partial(original, *args, **kwargs)
            return body(target, call, _arguments(signature, args, kwargs))

    functools.update_wrapper(method, original)
    method.__sed_conditioned__ = True  # type: ignore[attr-defined]
    return method


def _arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by parameter name, defaults filled in; ``None`` where they do not fit the signature."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:  # the trainer's own method raises its error
        return None
    bound.apply_defaults()
    return dict(bound.arguments)
