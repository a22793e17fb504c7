"""SeD in traiNNer-redux, chosen in its YAML config.

traiNNer-redux runs from its clone and has no ``model_type``: ``traiNNer.models.build_model``
picks the model class (SRModel, RealESRGANModel, ...). This adapter registers the
architecture ``ConditionedSeD`` (traiNNer-redux lower-cases registry names, so ``type:
conditionedsed`` or ``type: ConditionedSeD``) and wraps ``build_model`` so that the training
step of the model it builds, ``optimize_parameters(current_iter, current_accum_iter,
apply_gradient)``, runs inside ``net_d.condition(hr)`` on the bare discriminator. ``hr`` is
the batch the step's discriminator judges as real: ``model._real_hr`` (ECO) where set, else
``model.gt``. ``BaseModel.load_network`` / ``save_network`` are hooked too: for an SeD,
``pretrain_network_d`` follows the library's trust rule (``trust_pickle_d: true`` under
``network_d`` trusts a ``.pth`` file on torch < 2.10) and a ``.pth`` save (``save_checkpoint_format:
pth``) gets a ``.safetensors`` copy beside it.

Launch (the clone's own ``train.py`` runs, with its flags; experiments go to the clone as usual)::

    python -m sed_discriminator.integrations.trainner /path/to/traiNNer-redux -opt options/train/x.yml
    torchrun --nproc_per_node=N -m sed_discriminator.integrations.trainner /path/to/traiNNer-redux \\
        -opt options/train/x.yml --launcher pytorch

traiNNer-redux is not on the package index: nothing here imports it before :func:`main` (or
:func:`register`) puts the clone on ``sys.path``. See docs/integrations.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ._clone import CloneTrainer
from ._common import deprecated_conditioned_sed, iteration_label

__getattr__ = deprecated_conditioned_sed(__name__)  # 0.2's ConditionedSeD, renamed TrainerConditionedSeD

__all__ = ["TRAINNER", "hook_model", "install", "main", "register", "use_clone"]


def _real_hr(model: Any) -> Any:
    real = getattr(model, "_real_hr", None)
    return real if real is not None else getattr(model, "gt", None)


def _saved_file(model: Any, arguments: Mapping[str, Any]) -> str:
    """``BaseModel.save_network(net, net_label, save_dir, current_iter, param_key)``'s file (commit 6862931)."""
    label = iteration_label(arguments["current_iter"])
    extension = model.opt.logger.save_checkpoint_format  # "safetensors" (default) or "pth"
    return os.path.join(arguments["save_dir"], f"{arguments['net_label']}_{label}.{extension}")


TRAINNER = CloneTrainer(
    "traiNNer",
    repository="github.com/the-database/traiNNer-redux",
    config="options.yml",
    trainer="traiNNer-redux",
    lowercase_registry=True,
    real_hr=_real_hr,
    base_model="traiNNer.models.base_model:BaseModel",
    saved_file=_saved_file,
)
use_clone, register, hook_model, install, main = TRAINNER.functions()

if __name__ == "__main__":
    main()
