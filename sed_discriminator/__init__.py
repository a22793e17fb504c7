"""sed-discriminator: the Semantic-aware Discriminator (SeD, CVPR 2024) for GAN super-resolution.

The top level holds what a training loop needs; the rest lives in submodules:
``sed_discriminator.extractor`` (presets, registry), ``sed_discriminator.losses`` (loss modules,
``LOSS_KINDS``), ``sed_discriminator.config`` (value checks), ``sed_discriminator.sefb``,
``sed_discriminator.spectral_norm`` and ``sed_discriminator.integrations`` (trainers).
"""

from .config import math_attention as math_attention
from .config import set_fused_attn as set_fused_attn
from .config import use_fused_attn as use_fused_attn
from .discriminator import SeD as SeD
from .extractor import SemanticExtractor as SemanticExtractor
from .extractor import list_extractors as list_extractors
from .losses import discriminator_loss as discriminator_loss
from .losses import generator_loss as generator_loss
from .losses import r1_penalty as r1_penalty
from .sefb import SeFB as SeFB
from .training import ConditionedSeD as ConditionedSeD
from .training import SeDAdversary as SeDAdversary
from .training import frozen_parameters as frozen_parameters
from .version import __version__ as __version__
from .weights import load_official_weights as load_official_weights

__all__ = [
    "ConditionedSeD",
    "SeD",
    "SeDAdversary",
    "SeFB",
    "SemanticExtractor",
    "__version__",
    "discriminator_loss",
    "frozen_parameters",
    "generator_loss",
    "list_extractors",
    "load_official_weights",
    "math_attention",
    "r1_penalty",
    "set_fused_attn",
    "use_fused_attn",
]
