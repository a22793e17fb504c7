"""sed-discriminator: the Semantic-aware Discriminator (SeD, CVPR 2024) for GAN super-resolution."""

from .config import math_attention as math_attention
from .config import set_fused_attn as set_fused_attn
from .config import set_value_checks as set_value_checks
from .config import use_fused_attn as use_fused_attn
from .config import value_checks_enabled as value_checks_enabled
from .discriminator import SeD as SeD
from .discriminator import load_official_weights as load_official_weights
from .extractor import ExtractorPreset as ExtractorPreset
from .extractor import SemanticExtractor as SemanticExtractor
from .extractor import get_extractor_preset as get_extractor_preset
from .extractor import list_extractors as list_extractors
from .extractor import register_extractor as register_extractor
from .sefb import SeFB as SeFB
from .version import __version__ as __version__
from .losses import DiscriminatorLoss as DiscriminatorLoss
from .losses import GeneratorLoss as GeneratorLoss
from .losses import discriminator_loss as discriminator_loss
from .losses import generator_loss as generator_loss
from .losses import r1_penalty as r1_penalty
from .training import ConditionedSeD as ConditionedSeD
from .training import SeDAdversary as SeDAdversary
from .training import frozen_parameters as frozen_parameters

__all__ = [
    "ConditionedSeD",
    "DiscriminatorLoss",
    "ExtractorPreset",
    "GeneratorLoss",
    "SeD",
    "SeDAdversary",
    "SeFB",
    "SemanticExtractor",
    "__version__",
    "discriminator_loss",
    "frozen_parameters",
    "generator_loss",
    "get_extractor_preset",
    "list_extractors",
    "load_official_weights",
    "math_attention",
    "r1_penalty",
    "register_extractor",
    "set_fused_attn",
    "set_value_checks",
    "use_fused_attn",
    "value_checks_enabled",
]
