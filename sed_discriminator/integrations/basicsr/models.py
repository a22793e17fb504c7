"""BasicSR model classes that give ConditionedSeD the HR batch of each training step.

Each class is its BasicSR (or Real-ESRGAN) parent with the same training step; the step runs
inside ``net_d.condition(hr)`` on the bare discriminator, so that the step's discriminator
calls, and only they, see the HR semantics. ``feed_data`` is left alone: it also runs for
validation, where no discriminator is called.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from basicsr.models.esrgan_model import ESRGANModel
from basicsr.models.srgan_model import SRGANModel
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only

from ..._checks import check_flag
from ...discriminator import SeD
from ...weights import save_safetensors
from .._common import (
    check_no_data_parallel,
    iteration_label,
    load_sed_checkpoint,  # BasicSR's public name for the adapters' loader
    log_diagnostics,
    step_condition,
)

__all__ = ["SeDSRGANModel", "SeDESRGANModel", "SeDRealESRGANModel", "LAUNCH_HINT", "load_sed_checkpoint"]

_UNDER_PATH = "under path in the YAML file"
LAUNCH_HINT = (
    "torchrun --nproc_per_node=N -m sed_discriminator.integrations.basicsr -opt <options.yml> --launcher pytorch"
)


def _real_esrgan_base() -> type | None:
    """Real-ESRGAN's RealESRGANModel, else BasicSR's own copy of it, else ``None``."""
    try:
        from realesrgan.models.realesrgan_model import RealESRGANModel
    except ImportError:
        try:
            from basicsr.models.realesrgan_model import RealESRGANModel
        except ImportError:
            return None
    return RealESRGANModel


class _ConditionedSteps:
    """Mixin for SRGANModel and its subclasses: the step's D calls see the step's HR semantics."""

    def sed_condition_batch(self) -> torch.Tensor | None:
        """The HR batch whose semantics condition the step's discriminator calls (the real images D judges)."""
        return getattr(self, "gt", None)

    def optimize_parameters(self, current_iter: int) -> None:
        hr = self.sed_condition_batch()
        with step_condition(self.net_d, hr, launch_hint=LAUNCH_HINT):
            super().optimize_parameters(current_iter)
        log_diagnostics(self.net_d, self, current_iter, hr)

    def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
        net = super().model_to_device(net)
        check_no_data_parallel(net, launch_hint=LAUNCH_HINT)
        return net

    def load_network(self, net: torch.nn.Module, load_path: str, strict: bool = True, param_key: str | None = "params"):
        """BasicSR's loader, and for an SeD :func:`load_sed_checkpoint` (legacy keys, clear errors, trust rule).

        ``path: {trust_pickle_d: true}`` in the YAML file is its ``trust_pickle``: needed for a
        ``.pth`` file on torch < 2.10 (a ``.safetensors`` file never needs it).
        """
        bare = self.get_bare_model(net)
        if not isinstance(bare, SeD):
            return super().load_network(net, load_path, strict, param_key)
        trust = check_flag(self.opt.get("path", {}).get("trust_pickle_d", False), "trust_pickle_d", config=_UNDER_PATH)
        load_sed_checkpoint(
            bare,
            load_path,
            strict=strict,
            param_key=param_key,
            trust_pickle=trust,
            trust_hint="set `trust_pickle_d: true` under path for a file you trust",
            logger=get_root_logger(),
        )
        return None

    @master_only
    def save_network(self, net: Any, net_label: str, current_iter: Any, param_key: Any = "params") -> None:
        """BasicSR's ``.pth`` file, and for an SeD the same weights as ``<label>_<iter>.safetensors`` beside it.

        The ``.pth`` file is what BasicSR resumes from; the safetensors file is the one to share
        (reading it never runs code). It loads into ``SeD(variant, width=...)`` strictly.
        """
        super().save_network(net, net_label, current_iter, param_key)
        bare = self.get_bare_model(net) if isinstance(net, torch.nn.Module) else None
        if isinstance(bare, SeD):
            path = os.path.join(self.opt["path"]["models"], f"{net_label}_{iteration_label(current_iter)}.safetensors")
            save_safetensors(bare, path, overwrite=True, metadata={"variant": bare.variant})


class SeDSRGANModel(_ConditionedSteps, SRGANModel):
    """BasicSR's SRGANModel (vanilla/LSGAN/hinge GAN) with the HR condition set for its discriminator calls."""


class SeDESRGANModel(_ConditionedSteps, ESRGANModel):
    """BasicSR's ESRGANModel (relativistic GAN: ``net_d(gt)`` and ``net_d(output)``) with the HR condition set."""


_RealESRGANModel = _real_esrgan_base()

if _RealESRGANModel is not None:

    class SeDRealESRGANModel(_ConditionedSteps, _RealESRGANModel):  # type: ignore[valid-type,misc]
        """Real-ESRGAN's RealESRGANModel with the HR condition set for its discriminator calls.

        The condition is the batch D judges as real: the USM-sharpened GT (``gan_gt_usm``,
        the default) or the plain GT when ``gan_gt_usm: false``.
        """

        def sed_condition_batch(self) -> torch.Tensor | None:
            if check_flag(self.opt.get("gan_gt_usm", True), "gan_gt_usm", config="in the YAML file") is False:
                return getattr(self, "gt", None)
            return getattr(self, "gt_usm", None)

else:  # pragma: no cover - basicsr-fixed 1.4.2 ships the class
    SeDRealESRGANModel = None  # type: ignore[assignment,misc]
