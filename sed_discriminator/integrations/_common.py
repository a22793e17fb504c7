"""What the trainer adapters share: the registered architecture, the per-step condition, D's checkpoints.

Nothing here imports a trainer. The trainers' model classes call ``net_d(x)`` with one tensor;
:func:`step_condition` gives the bare :class:`~sed_discriminator.ConditionedSeD` the HR batch for
the duration of one training step, and :class:`TrainerConditionedSeD` is what a trainer's
registry builds from ``network_d: {type: ConditionedSeD, ...}``. :func:`load_sed_checkpoint` is
``pretrain_network_d`` for an SeD, under the library's trust rule.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .. import training
from .._checks import check_flag
from .._state import UntrustedFileError, read_checkpoint, unwrap_state_dict
from ..discriminator import SeD
from ..spectral_norm import remap_legacy_spectral_norm_keys
from ..weights import load_official_weights

__all__ = [
    "REGISTRY_NAME",
    "TrainerConditionedSeD",
    "bare_discriminator",
    "bare_sed",
    "load_sed_checkpoint",
    "log_diagnostics",
    "check_no_data_parallel",
    "deprecated_conditioned_sed",
    "iteration_label",
    "step_condition",
]

DIAGNOSTICS_EVERY = 100  # BasicSR's default print_freq
NETWORK_D = "under network_d in the trainer's config"  # where TrainerConditionedSeD's keys are set
REGISTRY_NAME = "ConditionedSeD"  # the `type:` users write in network_d; the class has its own name (0.2 shared it)


class TrainerConditionedSeD(training.ConditionedSeD):
    """:class:`sed_discriminator.ConditionedSeD` as a trainer's registry builds it from ``type: ConditionedSeD``.

    The same network, arguments, parameters and state dict (whose ``load_state_dict``, like every
    SeD's, also takes the authors' legacy spectral-norm keys, so a trainer's own loader such as
    ``pretrain_network_d`` reads their checkpoints strictly). Additions for trainers:

    - ``map_state_dict`` gives the keys a state dict loads under (traiNNer-redux checks keys with it);
    - a call without a condition says which model type of the trainer sets it;
    - ``pretrained=False`` (TOML has no null) means ``pretrained=None``: random extractor weights;
    - ``diagnostics_every`` (config key, default 100, ``0`` = off): every that many iterations the
      adapters measure :func:`~sed_discriminator.diagnostics.semantic_diagnostics` on the step's SR
      batch (two no-grad D forwards) and the latest values stay in the trainer's ``log_dict``
      (``sem_influence``, ``attn_sharpness_att1..3``), so they reach its console, TensorBoard, wandb;
    - ``trust_pickle_d`` (config key, default false): the traiNNer-redux and neosr adapters read
      ``pretrain_network_d`` with :func:`load_sed_checkpoint`, which refuses a pickle-based file
      (``.pth``) on torch < 2.10 unless this is true (you trust the file). Kept as an attribute,
      never in the state dict. BasicSR reads its own key, ``path: {trust_pickle_d: true}``.

    Args:
        variant: ``"patch"`` or ``"pixel"``.
        **kwargs: the keyword arguments of :class:`sed_discriminator.ConditionedSeD`
            (``extractor``, ``pretrained``, ``semantic_source``, ``width``, ``heads``, ...).

    Example:
        >>> net_d = TrainerConditionedSeD("patch", pretrained=None, width=8)  # doctest: +SKIP
        >>> with net_d.condition(gt):  # done by the trainer adapters  # doctest: +SKIP
        ...     logits = net_d(output)
    """

    def __init__(
        self,
        variant: str = "patch",
        *,
        diagnostics_every: int = DIAGNOSTICS_EVERY,
        trust_pickle_d: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("pretrained", "") is False:  # TOML (neosr) has no null: `pretrained = false` means random
            kwargs["pretrained"] = None
        if isinstance(diagnostics_every, bool) or not isinstance(diagnostics_every, int) or diagnostics_every < 0:
            raise ValueError(
                f"diagnostics_every must be a whole number of iterations >= 0 (0 turns the SeD diagnostics off), got "
                f"{diagnostics_every!r}; set it under network_d in the trainer's config."
            )
        check_flag(trust_pickle_d, "trust_pickle_d", config=NETWORK_D)
        for key in ("semantic_fusion", "channels_last"):  # SeD's own check would name no config
            if key in kwargs:
                check_flag(kwargs[key], key, none_ok=key == "channels_last", config=NETWORK_D)
        super().__init__(variant, **kwargs)
        self.diagnostics_every = diagnostics_every
        self.trust_pickle_d = trust_pickle_d
        self.last_diagnostics: dict[str, float] = {}

    def map_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keys this network loads ``state_dict`` under (traiNNer-redux checks keys with it)."""
        return remap_legacy_spectral_norm_keys(state_dict)

    def forward(self, x: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if semantic is None and self.semantic_fusion and self.semantic_source == "condition" and not self.has_condition:
            raise RuntimeError(
                "ConditionedSeD was called without the HR condition of the step: the trainer's model class must set "
                "it. In BasicSR / Real-ESRGAN use model_type SeDSRGANModel, SeDESRGANModel or SeDRealESRGANModel and "
                "launch with `python -m sed_discriminator.integrations.basicsr -opt <options.yml>`; for "
                "traiNNer-redux and neosr use `python -m sed_discriminator.integrations.trainner` / `.neosr` "
                "(docs/integrations.md). Or build it with semantic_source='input'."
            )
        return super().forward(x, semantic)


def bare_discriminator(net_d: nn.Module | None, *, launch_hint: str = "") -> training.ConditionedSeD | None:
    """The :class:`sed_discriminator.ConditionedSeD` inside ``net_d``, or ``None`` for another network.

    DistributedDataParallel, ``torch.compile`` and ``AveragedModel`` (neosr's EMA copy of D)
    wrappers are looked through (in any order).

    Raises:
        RuntimeError: ``net_d`` holds a ConditionedSeD wrapped in DataParallel (see
            :func:`check_no_data_parallel`).
    """
    net = bare_sed(net_d, launch_hint=launch_hint)
    return net if isinstance(net, training.ConditionedSeD) else None


def bare_sed(net_d: Any, *, launch_hint: str = "") -> SeD | None:
    """The :class:`~sed_discriminator.SeD` (or ConditionedSeD) inside ``net_d``, or ``None`` for another object.

    Looks through the wrappers :func:`bare_discriminator` does.

    Raises:
        RuntimeError: ``net_d`` holds a ConditionedSeD wrapped in DataParallel.
    """
    check_no_data_parallel(net_d, launch_hint=launch_hint)
    net = net_d
    for _ in range(8):
        if isinstance(net, (nn.parallel.DistributedDataParallel, AveragedModel)):
            net = net.module
        elif isinstance(getattr(net, "_orig_mod", None), nn.Module):
            net = net._orig_mod
        else:
            break
    return net if isinstance(net, SeD) else None


def iteration_label(current_iter: Any) -> Any:
    """The ``<iter>`` in a saved network's file name: BasicSR-style trainers save iteration -1 as ``latest``."""
    return "latest" if current_iter == -1 else current_iter


def load_sed_checkpoint(
    model: SeD,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    param_key: str | None = "params",
    trust_pickle: bool = False,
    config: str = "the YAML file",
    trust_hint: str = "",
    logger: logging.Logger | None = None,
) -> None:
    """Load a discriminator file into the bare SeD ``model`` as a trainer's ``pretrain_network_d`` does.

    ``param_key`` picks the entry of the file (falling back to ``params`` when it is absent, as
    the trainers do); the legacy spectral-norm keys of the authors' files are renamed and
    ``module.`` prefixes stripped. The file is read by the library's one reader under its trust
    rule; strict loading goes through :func:`~sed_discriminator.load_official_weights`, which
    names a mismatch (e.g. a pixel file for a patch model).

    Args:
        model: the bare SeD.
        path: a trainer's ``net_d`` file (``{"params": state_dict}`` or a plain state dict, ``.pth``
            or ``.safetensors``), or a file of the authors' code.
        strict: the trainer's ``strict_load_d``; ``False`` loads the matching keys and logs the rest.
        param_key: the trainer's ``param_key_d``.
        trust_pickle: read a pickle-based file also on torch < 2.10 (see
            :func:`~sed_discriminator.load_official_weights`).
        config: the config file the messages point to (``"options.toml"``).
        trust_hint: how to say ``trust_pickle`` in that config, added to the untrusted-file error.
        logger: where the load is reported (the trainer's root logger); default the ``sed_discriminator`` one.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        UntrustedFileError: (a ``ValueError``) the trust rule refuses the file.
        ValueError: the file cannot be read, lacks ``param_key``, or does not match ``model``
            (strict).
    """
    check_flag(strict, "strict_load_d", config=f"under path in {config}")
    path = os.fspath(path)
    try:
        raw: Any = read_checkpoint(path, trust_pickle=trust_pickle)
    except FileNotFoundError:
        raise FileNotFoundError(f"pretrain_network_d: no file at {path!r}; check the path in {config}.") from None
    except UntrustedFileError as err:
        hint = f" In {config}: {trust_hint}." if trust_hint else ""
        raise UntrustedFileError(f"pretrain_network_d: {err}{hint}") from err
    except ValueError as err:  # empty, truncated, damaged or not a weight file: the message says what to do
        raise ValueError(f"pretrain_network_d: {path!r} cannot be read as a torch checkpoint: {err}") from err
    if isinstance(raw, Mapping) and param_key is not None:
        if param_key in raw:
            raw = raw[param_key]
        elif "params" in raw:
            raw = raw["params"]
        elif all(isinstance(v, Mapping) for v in raw.values()):
            raise ValueError(
                f"pretrain_network_d: {path!r} has no entry {param_key!r} (it has {sorted(raw)}); set param_key_d "
                f"in {config} to one of them."
            )
    logger = logger or logging.getLogger("sed_discriminator")
    if strict:
        load_official_weights(model, raw)
        logger.info(f"Loaded {type(model).__name__} from {path} (strict).")
        return
    result = model.load_state_dict(unwrap_state_dict(raw, source=path), strict=False)  # renames legacy keys
    logger.warning(
        f"Loaded {type(model).__name__} from {path} with strict_load_d: false; missing keys: "
        f"{list(result.missing_keys)}, unexpected keys: {list(result.unexpected_keys)}."
    )


def check_no_data_parallel(net_d: nn.Module | None, *, launch_hint: str = "") -> None:
    """Refuse a ConditionedSeD under ``nn.DataParallel``.

    DataParallel copies the module to every GPU at every call and splits the batch, but not the
    stored HR condition: each replica would see the semantics of the whole batch on the first GPU.

    Raises:
        RuntimeError: saying to launch one process per GPU instead.
    """
    net = net_d
    for _ in range(8):
        if isinstance(net, nn.DataParallel):
            inner = net.module
            while isinstance(getattr(inner, "_orig_mod", None), nn.Module):
                inner = inner._orig_mod
            if isinstance(inner, training.ConditionedSeD):
                hint = f" ({launch_hint})" if launch_hint else ""
                raise RuntimeError(
                    "ConditionedSeD cannot run under nn.DataParallel (the trainer uses it for num_gpu > 1 without a "
                    "distributed launcher): the replicas would share one HR condition that is not split with the "
                    f"batch. Launch one process per GPU with torchrun and `--launcher pytorch`{hint}, or set "
                    "num_gpu: 1."
                )
            return
        inner = getattr(net, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return
        net = inner


@contextlib.contextmanager
def step_condition(net_d: nn.Module | None, hr: torch.Tensor | None, *, launch_hint: str = "") -> Iterator[None]:
    """Give the bare ConditionedSeD in ``net_d`` the HR batch ``hr`` for the block, and clear it after.

    A no-op for any other discriminator (or none), and for ``semantic_source="input"`` (it needs
    no condition). The condition is cleared also when the block raises, so nothing of one step
    reaches the next.

    Args:
        net_d: the trainer's ``net_d`` (bare, DDP-wrapped or compiled).
        hr: the HR batch the step's real discriminator calls judge.
        launch_hint: how to launch this trainer with torchrun, for the DataParallel error.

    Raises:
        RuntimeError: ``hr`` is missing, or ``net_d`` is under DataParallel.
    """
    bare = bare_discriminator(net_d, launch_hint=launch_hint)
    if bare is None or bare.semantic_source != "condition":
        yield
        return
    if not isinstance(hr, torch.Tensor):
        raise RuntimeError(
            "The training step has no HR batch to condition SeD on (the model's gt is "
            f"{type(hr).__name__}): feed the training data with its ground truth images (a paired dataset, or "
            "a trainer option that synthesises the LQ images from them)."
        )
    with bare.condition(hr):
        yield


def add_to_registry(registry: Any, key: str, obj: Any) -> None:
    """Put ``obj`` in a BasicSR-style ``Registry`` under ``key``, idempotently.

    These registries refuse a second object under a name. Registering the same object again
    does nothing; an earlier definition of the same class (a reloaded module) is replaced; an
    unrelated object under the name is an error.

    Args:
        registry: a ``Registry`` of BasicSR, traiNNer-redux or neosr (a ``_obj_map`` dict inside).
        key: the name as the registry stores it (traiNNer-redux lower-cases its names).
        obj: the class to register.

    Raises:
        ValueError: another object is registered under ``key``.
    """
    table = registry._obj_map  # the registries offer no replace: their register() asserts on a duplicate
    existing = table.get(key)
    if existing is obj:
        return
    same_definition = (getattr(existing, "__module__", None), getattr(existing, "__qualname__", None)) == (
        obj.__module__,
        obj.__qualname__,
    )
    if existing is not None and not same_definition:
        where = f"{getattr(existing, '__module__', '?')}.{getattr(existing, '__qualname__', '?')}"
        raise ValueError(
            f"The {registry._name!r} registry already holds another {key!r} ({where}); sed-discriminator cannot "
            "register its own under that name. Rename or remove the other one."
        )
    table[key] = obj


def deprecated_conditioned_sed(module: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that still serves 0.2's ``<module>.ConditionedSeD``, with a deprecation warning.

    In 0.2 the registered class was named ``ConditionedSeD`` like the library's own; it is
    :class:`TrainerConditionedSeD` since 0.3 (the config's ``type: ConditionedSeD`` is unchanged).
    """

    def __getattr__(name: str) -> Any:
        if name == "ConditionedSeD":
            warnings.warn(
                f"{module}.ConditionedSeD is deprecated since sed-discriminator 0.3 and will be removed in 0.4: import "
                "TrainerConditionedSeD from sed_discriminator.integrations (the class a trainer's registry builds "
                "from `type: ConditionedSeD`, which configs keep), or sed_discriminator.ConditionedSeD outside a "
                "trainer.",
                DeprecationWarning,
                stacklevel=2,
            )
            return TrainerConditionedSeD
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def log_diagnostics(net_d: nn.Module | None, model: Any, current_iter: Any, hr: torch.Tensor | None) -> None:
    """Measure SeD's diagnostics every ``diagnostics_every`` iterations and put the latest into ``model.log_dict``.

    Called by the adapters after the step. The values are measured on the step's SR batch
    (``model.output``) with the semantics of the step's HR batch (one extractor forward: the
    stored condition is stale after D's optimizer step); between measurements the latest values
    stay in each step's log dict, so every log line has them.

    Args:
        net_d: the trainer's ``net_d`` (bare, DDP-wrapped or compiled).
        model: the trainer's model, with ``output`` and ``log_dict``.
        current_iter: the step's iteration (the first argument of ``optimize_parameters``).
        hr: the step's condition batch (the real images D judged).
    """
    from ..diagnostics import semantic_diagnostics

    bare = bare_discriminator(net_d)
    every = getattr(bare, "diagnostics_every", 0)
    if not every or not bare.semantic_fusion:
        return
    output = getattr(model, "output", None)
    if isinstance(current_iter, int) and current_iter % every == 0 and isinstance(output, torch.Tensor):
        if output.shape[0] < 2:
            warnings.warn(
                "SeD diagnostics need a batch of at least 2 images (each is judged with another's semantics); this "
                "step's batch has 1. Raise the batch size or set diagnostics_every: 0 under network_d.",
                stacklevel=2,
            )
        else:
            source = hr if bare.semantic_source == "condition" and isinstance(hr, torch.Tensor) else output
            with torch.no_grad():
                semantic = bare.extractor(source.detach())
            bare.last_diagnostics = semantic_diagnostics(bare, output.detach(), semantic)
    log = getattr(model, "log_dict", None)
    if bare.last_diagnostics and isinstance(log, dict):
        log.update(bare.last_diagnostics)
