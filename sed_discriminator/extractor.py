"""The frozen semantic extractor: a pretrained vision model from timm that maps images to a semantic map.

Each preset is a timm model, the feature level whose output SeD is conditioned on, and the
model's own normalisation (from its ``pretrained_cfg``). The default, ``clip_rn50``, is the
paper's: OpenAI CLIP RN50's image tower through ``layer3`` (1024 channels at stride 16), fed
at the image's own size. Any timm model with ``forward_intermediates`` works as
``SemanticExtractor("timm:NAME", layer=K)``; more presets are added with :func:`register_extractor`.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ._checks import check_flag, check_image, check_input_range
from ._state import read_state_dict, unwrap_state_dict

__all__ = [
    "DEFAULT_WEIGHTS",
    "ExtractorPreset",
    "SemanticExtractor",
    "register_extractor",
    "list_extractors",
    "get_extractor_preset",
    "read_state_dict",
]

DEFAULT_WEIGHTS = "default"
TIMM_PREFIX = "timm:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# Files a timm / open_clip Hugging Face repo may hold, in the order they are looked up in the cache.
_HUB_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class ExtractorPreset:
    """One semantic trunk: a timm model and the feature level SeD is conditioned on.

    Attributes:
        name: registry name, e.g. ``"clip_rn50"``.
        model: timm model name with its default pretrained tag, e.g. ``"resnet50_clip.openai"``.
        layer: feature level: an index into the model's ``feature_info`` (its stages for CNNs,
            its blocks for ViTs, whose patch tokens become a (C, h, w) map).
        channels: channels of the semantic map (found from the model when left out).
        stride: input pixels per semantic cell (found from the model when left out).
        description: one line for the docs and :func:`list_extractors` users.
        weight_files: other weight files that load (named in the error when weights are missing).
        build: instead of ``model``, a callable returning your own ``nn.Module`` that maps a
            normalised (B, 3, H, W) batch to (B, channels, ~H/stride, ~W/stride); then
            ``channels`` and ``stride`` are required and ``mean``/``std`` default to CLIP's.
        mean: per-channel mean subtracted from [0, 1] inputs (default: the model's ``pretrained_cfg``).
        std: per-channel std dividing [0, 1] inputs (default: the model's ``pretrained_cfg``).

    Example:
        >>> preset = ExtractorPreset("dinov2_vits14_block8", model="vit_small_patch14_dinov2.lvd142m", layer=8)
    """

    name: str
    model: str | None = None
    layer: int | None = None
    channels: int | None = None
    stride: int | None = None
    description: str = field(default="", compare=False)
    weight_files: str = field(default="", compare=False)
    build: Callable[[], nn.Module] | None = field(default=None, compare=False, repr=False)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.build is None):
            raise ValueError(
                f"ExtractorPreset {self.name!r} needs exactly one of model= (a timm model name) or build=."
            )
        if self.build is not None and (self.channels is None or self.stride is None):
            raise ValueError(f"ExtractorPreset {self.name!r} with build= needs channels= and stride=.")

    @property
    def architecture(self) -> str | None:
        """The timm model name without its pretrained tag."""
        return None if self.model is None else self.model.split(".", 1)[0]

    @property
    def default_tag(self) -> str | None:
        """The pretrained tag of ``model`` (``"openai"`` for ``resnet50_clip.openai``), if it names one."""
        return None if self.model is None or "." not in self.model else self.model.split(".", 1)[1]


_PRESETS: dict[str, ExtractorPreset] = {}


def register_extractor(preset: ExtractorPreset, overwrite: bool = False) -> ExtractorPreset:
    """Add a preset to the registry so ``SemanticExtractor(preset.name)`` can build it.

    A timm preset registered without ``channels``/``stride`` gets them from the model (built
    on the ``meta`` device, so nothing is allocated).

    Args:
        preset: the preset to add.
        overwrite: replace an existing preset of the same name instead of raising.

    Returns:
        The registered preset (with ``channels`` and ``stride`` filled in).
    """
    check_flag(overwrite, "overwrite")
    if preset.name in _PRESETS and not overwrite:
        raise ValueError(
            f"An extractor named {preset.name!r} is registered already; pass overwrite=True to replace it."
        )
    if preset.name.startswith(TIMM_PREFIX):
        raise ValueError(f"Preset names may not start with {TIMM_PREFIX!r}: that prefix names timm models directly.")
    if preset.channels is None or preset.stride is None:
        model = _create_model(preset.model, meta=True)  # type: ignore[arg-type]
        layer = _check_layer(preset.layer, model, preset.model)  # type: ignore[arg-type]
        _check_grid_follows_input(preset.model, layer, model)  # type: ignore[arg-type]
        info = model.feature_info[layer]
        preset = replace(preset, layer=layer, channels=int(info["num_chs"]), stride=int(info["reduction"]))
    _PRESETS[preset.name] = preset
    return preset


def list_extractors() -> dict[str, ExtractorPreset]:
    """The registered presets by name (sorted), each with its ``channels``, ``stride`` and ``description``.

    Example:
        >>> {name: (p.channels, p.stride) for name, p in list_extractors().items()}["clip_rn50"]
        (1024, 16)
    """
    return {name: _PRESETS[name] for name in sorted(_PRESETS)}


def get_extractor_preset(name: str, layer: int | None = None) -> ExtractorPreset:
    """The preset registered under ``name``, or ``"timm:NAME"`` as a preset; ``layer`` overrides its level.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or a layer the model does not have.
    """
    if not isinstance(name, str):
        raise TypeError(f"The extractor name must be a string, got {type(name).__name__}.")
    if name.startswith(TIMM_PREFIX):
        model = name[len(TIMM_PREFIX) :]
        if not model:
            raise ValueError("'timm:' needs a model name, e.g. 'timm:vit_small_patch14_dinov2.lvd142m'.")
        return ExtractorPreset(name=name, model=model, layer=layer, description=f"timm model {model}")
    if name not in _PRESETS:
        raise ValueError(
            f"Unknown extractor {name!r}. Available: {sorted(_PRESETS)}, or any timm model as 'timm:<model name>'."
        )
    preset = _PRESETS[name]
    if layer is not None and layer != preset.layer:
        if preset.build is not None:
            raise ValueError(f"Extractor {name!r} is a custom trunk (build=); it has no layer= to choose.")
        preset = replace(preset, layer=layer, channels=None, stride=None)
    return preset


# name, timm model with its default tag, feature level, channels, stride, description, other weight files
_PRESET_TABLE = (
    ("clip_rn50", "resnet50_clip.openai", 3, 1024, 16, "OpenAI CLIP RN50 image tower through layer3: the paper's "
     "extractor.", "OpenAI's RN50.pt TorchScript archive, an open_clip RN50 checkpoint or timm's model.safetensors"),
    ("clip_rn101", "resnet101_clip.openai", 3, 1024, 16, "OpenAI CLIP RN101 image tower through layer3 (RN50's "
     "width, 23 blocks in layer3).", "OpenAI's RN101.pt TorchScript archive, an open_clip RN101 checkpoint or "
     "timm's model.safetensors"),
    ("clip_convnext_base", "convnext_base.clip_laion2b", 2, 512, 16, "LAION-2B CLIP ConvNeXt-Base image tower "
     "through stage 2.", "an open_clip convnext_base checkpoint or timm's model.safetensors"),
    ("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m", 11, 384, 14, "DINOv2 ViT-S/14 (self-supervised), "
     "normalised patch tokens of the last block.", ""),
    ("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", 11, 768, 14, "DINOv2 ViT-B/14 (self-supervised), "
     "normalised patch tokens of the last block.", ""),
    ("siglip_vitb16", "vit_base_patch16_siglip_224.webli", 11, 768, 16, "SigLIP ViT-B/16 (WebLI image-text), "
     "normalised patch tokens of the last block.", "an open_clip ViT-B-16-SigLIP checkpoint or timm's "
     "model.safetensors"),
    ("resnet50_in1k", "resnet50.a1_in1k", 3, 1024, 16, "ImageNet-1k supervised ResNet-50 (timm A1 recipe) through "
     "layer3.", ""),
)  # fmt: skip
for _row in _PRESET_TABLE:
    register_extractor(ExtractorPreset(*_row))


def _create_model(model: str, meta: bool = False) -> nn.Module:
    """A randomly initialised timm model; ViTs take any input size (see :class:`SemanticExtractor`).

    ``meta=True`` builds it on the ``meta`` device (no memory, no initialisation) where the timm
    version allows, else on the CPU.
    """
    if meta:
        try:
            with torch.device("meta"):
                return _create_model(model)
        except (NotImplementedError, RuntimeError) as err:  # older timm initialises some weights by copying
            if "meta" not in str(err).lower():
                raise
    import timm

    try:
        return timm.create_model(model, pretrained=False, dynamic_img_size=True, dynamic_img_pad=True)
    except TypeError:  # not a model with a patch embedding: those arguments do not exist
        pass
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"timm has no model {model!r} (timm {timm.__version__}); list them with timm.list_models('*pattern*')."
            ) from None
        raise
    return timm.create_model(model, pretrained=False)


def _check_layer(layer: int | None, model: nn.Module, model_name: str) -> int:
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        raise ValueError(f"timm model {model_name!r} has no forward_intermediates(); pick another model.")
    levels = [(i, int(f["num_chs"]), int(f["reduction"])) for i, f in enumerate(model.feature_info)]
    if layer is None:
        return len(levels) - 1
    index = layer + len(levels) if layer < 0 else layer
    if not 0 <= index < len(levels):
        choices = ", ".join(f"{i}: {c} ch @ stride {s}" for i, c, s in levels)
        raise ValueError(f"layer={layer} does not exist in timm model {model_name!r}; its levels are {{{choices}}}.")
    return index


def _native_size(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224))[-2:])  # type: ignore[return-value]


def _grid_at(model: nn.Module, layer: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """The semantic grid of ``model`` (on the meta device: no compute) at ``size``, or None where it fails there."""
    try:
        out = model.forward_intermediates(
            torch.empty(1, 3, *size, device="meta"), indices=[layer], intermediates_only=True, output_fmt="NCHW"
        )[0]
    except Exception:  # any failure means "does not run at this size" to the callers
        return None
    return tuple(out.shape[-2:])  # type: ignore[return-value]


def _on_meta(model_name: str, model: nn.Module | None = None) -> nn.Module | None:
    if model is None or any(not p.is_meta for p in model.parameters()):
        model = _create_model(model_name, meta=True)
    return model if all(p.is_meta for p in model.parameters()) else None  # old timm: no meta build, no probe


def _check_grid_follows_input(model_name: str, layer: int, model: nn.Module | None = None) -> None:
    """Refuse a timm model whose semantic grid is the same whatever the input size (e.g. CrossViT).

    Such a model resizes every image to its own input size inside, so the ``reduction`` timm
    reports is no stride (17 for ``crossvit_tiny_240``, with a 14x14 grid at any size).
    """
    meta = _on_meta(model_name, model)
    if meta is None:
        return
    height, width = _native_size(meta)
    small, large = _grid_at(meta, layer, (height, width)), _grid_at(meta, layer, (2 * height, 2 * width))
    if small is not None and small == large:
        raise ValueError(
            f"timm model {model_name!r} gives a {small[0]}x{small[1]} semantic grid whatever the input size (it "
            f"resizes every image to {height}x{width} inside), so its map has no stride to align with the image. "
            "Pick another model: a preset from list_extractors() or a timm CNN / ViT whose grid follows the input."
        )


def _explain_input_size(model_name: str, layer: int, size: tuple[int, int], err: Exception) -> ValueError | None:
    """A clear error when a timm model fails because it only runs at its own input size (None otherwise)."""
    meta = _on_meta(model_name)
    if meta is None:
        return None
    native = _native_size(meta)
    if tuple(size) == native or _grid_at(meta, layer, native) is None or _grid_at(meta, layer, size) is not None:
        return None
    detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return ValueError(
        f"timm model {model_name} does not run at {size[0]}x{size[1]}: it is built for {native[0]}x{native[1]} "
        f"images (its pretrained_cfg input_size; timm says: {detail}). Resize the images to {native[0]}x{native[1]} "
        f"before the extractor (F.interpolate(x, size={native}, mode='bicubic', antialias=True)), or pick a model "
        "that takes any size: a preset from list_extractors() or a timm CNN / ViT built with dynamic_img_size."
    )


def _is_clip_resnet(model: nn.Module) -> bool:
    from timm.models.byobnet import ByobNet

    return isinstance(model, ByobNet) and "_clip" in str(
        (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    )


def _match_openai_clip_pooling(model: nn.Module) -> None:
    """Give timm's CLIP ResNets OpenAI's shortcut pooling (floor, not ceil) so odd sizes work and match.

    OpenAI's (and open_clip's) downsampling shortcut is ``AvgPool2d(stride)``, which floors like
    the main path's anti-aliasing pool; timm's ``DownsampleAvg`` uses ``ceil_mode=True``, which
    agrees for even sizes only (the two branches cannot be added at odd ones).
    """
    from timm.models.byobnet import DownsampleAvg

    if not _is_clip_resnet(model):
        return
    for module in model.modules():
        if isinstance(module, DownsampleAvg) and isinstance(module.pool, nn.AvgPool2d):
            module.pool.ceil_mode = False


def _tags(architecture: str) -> list[str]:
    import timm

    return sorted(n.split(".", 1)[1] for n in timm.list_pretrained(f"{architecture}.*") if "." in n)


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_weights(preset: ExtractorPreset, model_name: str, tag: str | None, cache_dir: str | None) -> str:
    """The cached (or freshly downloaded) weight file of a timm model's Hugging Face repo.

    The cache is read first without any network call (``huggingface_hub.try_to_load_from_cache``);
    on a miss, ``HF_HUB_OFFLINE=1`` fails at once, else ``hf_hub_download`` is tried (with the hub
    client's own retries when the network is down). Each failure is one error naming the file to
    get and how to pass it. timm's ``create_model(pretrained=True)`` would download the same file,
    but only after building the model, and then read a ``.bin`` with its own ``torch.load``; here
    the file goes through the library's one reader (the untrusted-file rule) and a miss costs no build.
    """
    import timm.models

    cfg = timm.models.get_pretrained_cfg(model_name)
    cfg = {} if cfg is None else cfg.to_dict()
    repo = cfg.get("hf_hub_id")
    filename = cfg.get("hf_hub_filename")
    candidates = tuple(dict.fromkeys((filename, *_HUB_FILES) if filename else _HUB_FILES))
    url = f"https://huggingface.co/{repo}/resolve/main/{candidates[0]}" if repo else cfg.get("url") or "its source"
    how = (
        f"On a machine with internet, download {url}"
        + (f" (or {preset.weight_files})" if preset.weight_files else "")
        + f", copy it here and pass its path: SemanticExtractor({preset.name!r}, pretrained='/path/to/file'). "
        "Or fill the Hugging Face cache once online (same cache_dir=) and run again."
    )
    what = f"the {tag or 'default'!r} weights of timm model {model_name} for SemanticExtractor({preset.name!r})"
    if not repo:
        raise RuntimeError(f"Cannot fetch {what}: timm has no Hugging Face repo for them. {how}")
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    for name in candidates:
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    where = cache_dir or constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE or _truthy_env("HF_HUB_OFFLINE"):
        raise RuntimeError(f"{what[0].upper()}{what[1:]} are not in the Hugging Face cache ({where}) and "
                           f"HF_HUB_OFFLINE is set, so they are not downloaded. {how}")  # fmt: skip
    try:
        return hf_hub_download(repo, candidates[0], cache_dir=cache_dir)
    except Exception as err:  # network, hub and cache errors all mean the same to the user
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise RuntimeError(
            f"Could not download {what} ({type(err).__name__}: {detail}). {how} On a machine without internet, "
            "export HF_HUB_OFFLINE=1: a missing file is then reported at once, without the hub client's retries."
        ) from err


def _looks_like_path(value: str) -> bool:
    return os.sep in value or (os.altsep or os.sep) in value or value.lower().endswith(_WEIGHT_FILE_SUFFIXES)


def _rebuild_extractor(config: dict[str, Any]) -> SemanticExtractor:
    return SemanticExtractor(**config)


class SemanticExtractor(nn.Module):
    """Frozen pretrained trunk that turns images in [0, 1] into the semantic map SeD is conditioned on.

    The trunk is always in eval mode (``train()`` cannot change that, so BatchNorm running
    statistics never move), never needs gradients and runs under ``torch.no_grad()``. Images
    are fed at their own size: CNN presets give their model's grid, about H / stride (the CLIP
    and ConvNeXt presets floor: ``H // 16``; ``resnet50_in1k`` ceils); ViT presets pad the normalised
    image with zeros at the bottom and right up to a multiple of the patch size, so the grid is
    ``ceil(H / patch) x ceil(W / patch)`` and covers the whole image (256 x 200 -> 19 x 15 for DINOv2's 14 px patches).

    Pickling (``pickle``, ``torch.save(extractor)``) stores :attr:`config`, not the weights:
    unpickling builds the extractor again and reloads its weights from the same tag or file
    (random again for ``pretrained=None``), on the CPU in float32.

    Args:
        name: a preset from :func:`list_extractors` (default ``"clip_rn50"``, the paper's), or
            ``"timm:NAME"`` for any timm model with ``forward_intermediates``.
        pretrained: ``"default"`` (the preset's weights: ``"openai"`` for the CLIP ResNets), a timm
            pretrained tag of the model (``"openai"``, ``"yfcc15m"``, ...; from the Hugging Face
            cache without network when cached, else downloaded), a local file (OpenAI's
            TorchScript ``RN50.pt``, an open_clip or timm state dict as ``.pt``/``.bin``/
            ``.safetensors``; see ``trust_pickle``), or ``None`` for random weights (with a warning).
        cache_dir: Hugging Face cache folder (default: the hub's own).
        input_range: value range of the images you pass; e.g. ``(-1, 1)`` inputs are mapped to [0, 1].
        layer: feature level instead of the preset's: an index into the model's ``feature_info``
            (stages for CNNs, blocks for ViTs; negative counts from the end). For ``timm:NAME``
            the default is the last level.
        mean: per-channel mean of the normalisation instead of the model's ``pretrained_cfg``.
        std: per-channel std of the normalisation instead of the model's ``pretrained_cfg``.
        trust_pickle: you trust the weight file (you made it, or it is an official release): read a
            TorchScript archive (OpenAI's ``RN50.pt``: ``torch.jit.load`` runs its code) and, on
            torch < 2.10, a pickle-based ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)``
            has known escapes there). ``.safetensors`` files never need it. Or convert the file once
            with ``python -m sed_discriminator.convert``.

    Shape:
        - input: (B, 3, H, W), H and W at least ``stride``
        - output: (B, channels, h, w); (B, 1024, 16, 16) for a 256 px clip_rn50 input

    Example:
        >>> extractor = SemanticExtractor("clip_rn50", pretrained=None)  # doctest: +SKIP
        >>> extractor(torch.rand(2, 3, 256, 256)).shape  # doctest: +SKIP
        torch.Size([2, 1024, 16, 16])
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        name: str = "clip_rn50",
        *,
        pretrained: str | os.PathLike | None = DEFAULT_WEIGHTS,
        cache_dir: str | os.PathLike | None = None,
        input_range: tuple[float, float] = (0.0, 1.0),
        layer: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        trust_pickle: bool = False,
    ) -> None:
        super().__init__()
        check_flag(trust_pickle, "trust_pickle")
        low, high = (float(v) for v in input_range)
        if not high > low:
            raise ValueError(f"input_range must be (low, high) with high > low, got {tuple(input_range)}.")
        for label, value in (("mean", mean), ("std", std)):
            if value is not None and len(tuple(value)) != 3:
                raise ValueError(f"{label} must have 3 values (one per RGB channel), got {tuple(value)}.")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std must be positive, got {tuple(std)}.")
        cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        source = self._resolve_source(pretrained)
        preset = get_extractor_preset(name, layer)
        self.input_range = (low, high)
        self._config = dict(
            name=name,
            pretrained=source,
            cache_dir=cache_dir,
            input_range=self.input_range,
            layer=layer,
            mean=None if mean is None else tuple(float(v) for v in mean),
            std=None if std is None else tuple(float(v) for v in std),
            trust_pickle=trust_pickle,
        )
        hub_file = None
        if preset.model is not None:
            tag = self._resolve_tag(preset, source)
            model_name = f"{preset.architecture}.{tag}" if tag else preset.model
            if source is not None and not os.path.isfile(source):  # found before the (slow) build: fails fast
                hub_file = _hub_weights(preset, model_name, tag, cache_dir)
        elif source is not None and not os.path.isfile(source):
            raise ValueError(
                f"Extractor {preset.name!r} is a custom trunk without hub weights; pass pretrained= as a local "
                "file path, or None."
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random trunks agree across processes and runs
            if preset.build is not None:
                self.trunk = preset.build()
                self._layer, self._tokens = None, False
                self._model_name = None
                cfg_mean, cfg_std = CLIP_MEAN, CLIP_STD
            elif source is None:
                self.trunk = _create_model(model_name)
            else:  # weights come from a file: no random initialisation to pay for
                self.trunk = _create_model(model_name, meta=True)
            if preset.build is None:
                self._model_name = model_name
                self._layer = _check_layer(preset.layer, self.trunk, model_name)
                if preset.stride is None:  # a stride read from timm's feature_info: check that it means one
                    _check_grid_follows_input(model_name, self._layer, self.trunk)
                info = self.trunk.feature_info[self._layer]
                preset = replace(
                    preset, layer=self._layer, channels=int(info["num_chs"]), stride=int(info["reduction"])
                )
                cfg = self.trunk.pretrained_cfg or {}
                cfg_mean, cfg_std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
                self._tokens = hasattr(self.trunk, "patch_embed") and hasattr(self.trunk, "blocks")
                _match_openai_clip_pooling(self.trunk)
                self._full_state_keys = set(self.trunk.state_dict())
                self._prune()
        self.preset = preset
        mean_ = tuple(mean) if mean is not None else (preset.mean or cfg_mean)
        std_ = tuple(std) if std is not None else (preset.std or cfg_std)
        self.register_buffer("mean", torch.tensor(mean_, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std_, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.pretrained = self._load(source, hub_file)
        self.requires_grad_(False)
        self.train(False)

    # -- construction ---------------------------------------------------------------------------

    @staticmethod
    def _resolve_source(pretrained: str | os.PathLike | None) -> str | None:
        if pretrained is None:
            return None
        if not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(
                f"pretrained must be a tag, a file path or None, got {type(pretrained).__name__}; to use weights you "
                "already hold, save them with torch.save(state_dict, path) and pass the path."
            )
        value = os.fspath(pretrained)
        if os.path.isfile(value):
            return os.path.abspath(value)
        if _looks_like_path(value) or os.path.isdir(value):
            raise FileNotFoundError(f"No weight file at {value!r}; check the path or pass a pretrained tag.")
        return value

    @staticmethod
    def _resolve_tag(preset: ExtractorPreset, source: str | None) -> str | None:
        """The timm pretrained tag whose config (normalisation) and hub weights are used."""
        if source is None or os.path.isfile(source) or source == DEFAULT_WEIGHTS:
            if preset.default_tag is None:  # "timm:NAME" without a tag: timm's default weights of NAME
                import timm.models

                cfg = timm.models.get_pretrained_cfg(preset.architecture)
                return getattr(cfg, "tag", None) or None
            return preset.default_tag
        tags = _tags(preset.architecture)  # type: ignore[arg-type]
        if source not in tags:
            raise ValueError(
                f"Unknown pretrained tag {source!r} for extractor {preset.name!r} (timm model {preset.architecture}). "
                f"Available tags: {tags}, {DEFAULT_WEIGHTS!r}, a local file path, or None for random weights."
            )
        return source

    def _prune(self) -> None:
        """Drop the stages/blocks after the feature level and the classifier head (never run, never loaded)."""
        prune = getattr(self.trunk, "prune_intermediate_layers", None)
        if prune is None:
            return
        try:
            prune(indices=[self._layer], prune_norm=not self._tokens, prune_head=True)
        except (NotImplementedError, AssertionError, TypeError):
            pass  # a model that cannot be pruned runs whole; the outputs are the same
        head = getattr(self.trunk, "head", None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            self.trunk.head = nn.Identity()  # e.g. CLIP's attention pool, which older timm versions keep

    def _load(self, source: str | None, hub_file: str | None) -> str | None:
        if source is None:
            warnings.warn(
                f"SemanticExtractor({self.preset.name!r}) has RANDOM weights: its semantic maps are meaningless. "
                f"Pass pretrained={DEFAULT_WEIGHTS!r} (or a tag) or a local weight file for real training.",
                UserWarning,
                stacklevel=3,
            )
            return None
        if os.path.isfile(source):
            path = source
        else:
            path = hub_file
        state = self._trunk_weights(read_state_dict(path, trust_pickle=self._config["trust_pickle"]), path)
        on_meta = any(t.is_meta for t in self.trunk.state_dict().values())
        self.trunk.load_state_dict(state, strict=True, assign=on_meta)
        leftover = [n for n, t in [*self.trunk.named_parameters(), *self.trunk.named_buffers()] if t.is_meta]
        if leftover:  # tensors outside the state dict (non-persistent buffers): build for real and load again
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.trunk = _create_model(self._model_name)
            _match_openai_clip_pooling(self.trunk)
            self._prune()
            self.trunk.load_state_dict(state, strict=True)
        return source

    def _trunk_weights(self, state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        expected = self.trunk.state_dict()
        if state and all(k.startswith("trunk.") for k in state):  # a SemanticExtractor's own state_dict()
            state = {k[len("trunk.") :]: v for k, v in state.items()}
        if self.preset.model is not None:
            if _is_clip_resnet(self.trunk) and "conv1.weight" in state and "layer1.0.conv1.weight" in state:
                # open_clip's image tower alone, without the ``visual.`` prefix
                state = {f"visual.{k}": v for k, v in state.items()}
            filter_fn = getattr(sys.modules[type(self.trunk).__module__], "checkpoint_filter_fn", None)
            if filter_fn is not None:
                try:
                    state = unwrap_state_dict(filter_fn(dict(state), self.trunk), source=source)
                except (KeyError, ValueError, RuntimeError, IndexError) as err:
                    raise ValueError(
                        f"{source} could not be converted to timm model {self._model_name} "
                        f"({type(err).__name__}: {err}); it is a checkpoint of another model."
                    ) from err
            known = self._full_state_keys
        else:
            known = set(expected)
        missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in state if k not in known and k not in expected)
        if missing or unexpected:
            raise ValueError(
                f"{source} does not match this extractor's trunk ({self._model_name or self.preset.name}): "
                f"{len(missing)} missing keys (e.g. {missing[:3]}) and {len(unexpected)} unexpected keys "
                f"(e.g. {unexpected[:3]}). Pass {self.preset.weight_files or 'a checkpoint of the same model'}."
            )
        for key, value in expected.items():
            if key in state and tuple(state[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"{source}: {key} has shape {tuple(state[key].shape)} but the trunk expects "
                    f"{tuple(value.shape)}; the checkpoint is of another model than the preset."
                )
        out = {}
        for key, value in expected.items():
            if key not in state:  # an untracked BatchNorm counter
                out[key] = torch.zeros_like(value, device="cpu") if value.is_meta else value
            elif state[key].is_floating_point() and state[key].dtype != value.dtype:
                out[key] = state[key].to(value.dtype)  # e.g. OpenAI's fp16 archive into a float32 model
            else:
                out[key] = state[key]
        return out

    # -- properties -----------------------------------------------------------------------------

    @property
    def channels(self) -> int:
        """Channels of the semantic map."""
        return int(self.preset.channels)  # type: ignore[arg-type]

    @property
    def stride(self) -> int:
        """Input pixels per semantic cell."""
        return int(self.preset.stride)  # type: ignore[arg-type]

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``SemanticExtractor(**extractor.config)`` builds it again (a new dict)."""
        return dict(self._config)

    # -- behaviour ------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> SemanticExtractor:
        """Kept for API compatibility: the extractor stays in eval mode whatever ``mode`` is (a bool)."""
        check_flag(mode, "SemanticExtractor.train(mode)")
        return super().train(False)

    def __reduce_ex__(self, protocol: int):
        return _rebuild_extractor, (self.config,)

    def __copy__(self) -> SemanticExtractor:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> SemanticExtractor:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Semantic map of an image batch.

        Args:
            x: images (B, 3, H, W) in ``input_range`` (default [0, 1]), any float dtype (computed
                in the extractor's dtype, or under autocast in the autocast dtype).

        Returns:
            The semantic map, without gradient history.
        """
        check_image(x, owner="SemanticExtractor", channels=3, min_size=self.stride)
        check_input_range(self, x, owner="SemanticExtractor", value_range=self.input_range)
        low, high = self.input_range
        x = x.to(self.mean.dtype)
        if (low, high) != (0.0, 1.0):
            x = (x - low) / (high - low)
        x = (x - self.mean) / self.std
        if self._layer is None:
            return self.trunk(x)
        try:
            return self.trunk.forward_intermediates(
                x, indices=[self._layer], norm=self._tokens, output_fmt="NCHW", intermediates_only=True
            )[0]
        except (RuntimeError, AssertionError) as err:  # e.g. swin / levit / cait at another size than theirs
            clear = _explain_input_size(self._model_name, self._layer, tuple(x.shape[-2:]), err)
            if clear is None:
                raise
            raise clear from err

    def extra_repr(self) -> str:
        return (
            f"name={self.preset.name!r}, pretrained={self.pretrained!r}, channels={self.channels}, "
            f"stride={self.stride}, layer={self._layer}"
        )
