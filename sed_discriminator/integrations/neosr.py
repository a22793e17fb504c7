"""SeD in neosr, chosen in its TOML config.

neosr runs from its clone and reads ``sys.argv`` when its packages are imported (its
architectures parse the options at import), so this adapter sets the command line first,
then imports neosr, registers the architecture ``ConditionedSeD`` and wraps
``neosr.models.build_model`` so that the training step of the model it builds (any
``model_type``: ``image``, ``otf``) runs inside ``net_d.condition(gt)`` on the bare
discriminator. ``base.load_network`` / ``save_network`` are hooked too: for an SeD,
``pretrain_network_d`` follows the library's trust rule (``trust_pickle_d = true`` under
``[network_d]`` trusts a ``.pth`` file on torch < 2.10) and every ``net_d_<iter>.pth`` gets a
``.safetensors`` copy beside it.

Launch (the clone's own ``train.py`` runs, with its flags; experiments go to the clone as usual)::

    python -m sed_discriminator.integrations.neosr /path/to/neosr -opt options/x.toml
    torchrun --nproc_per_node=N -m sed_discriminator.integrations.neosr /path/to/neosr \\
        -opt options/x.toml --launcher pytorch

Read docs/integrations.md first: at the version read, neosr computes the generator's GAN term
under ``torch.inference_mode()`` and calls the discriminator in ``eval()`` mode, which this
adapter does not change.
"""

from __future__ import annotations

from ._clone import CloneTrainer
from ._common import deprecated_conditioned_sed

__getattr__ = deprecated_conditioned_sed(__name__)  # 0.2's ConditionedSeD, renamed TrainerConditionedSeD

__all__ = ["NEOSR", "hook_model", "install", "main", "register", "use_clone"]

NEOSR = CloneTrainer(
    "neosr", repository="github.com/neosr-project/neosr", config="options.toml", base_model="neosr.models.base:base"
)
use_clone, register, hook_model, install, main = NEOSR.functions()

if __name__ == "__main__":
    main()
