"""The frozen semantic extractor: a pretrained vision trunk that maps images to a semantic map.

The default preset, ``clip_rn50``, is the paper's: the image tower of OpenAI CLIP RN50 run
through ``layer3`` (1024 channels at stride 16), on inputs normalised with CLIP's mean/std
and fed at their own size. More trunks are added by registering an :class:`ExtractorPreset`.
"""

from __future__ import annotations

import functools
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import check_image
from ._state import read_state_dict

__all__ = [
    "ExtractorPreset",
    "SemanticExtractor",
    "CLIPResNetTrunk",
    "register_extractor",
    "list_extractors",
    "get_extractor_preset",
    "read_state_dict",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class ExtractorPreset:
    """Everything needed to build and load one semantic trunk.

    Attributes:
        name: registry name, e.g. ``"clip_rn50"``.
        channels: channels of the semantic map.
        stride: input pixels per semantic cell.
        build: callable returning the randomly initialised trunk; ``trunk(x)`` maps a
            normalised (B, 3, H, W) batch to (B, channels, ~H/stride, ~W/stride).
        mean: per-channel mean subtracted from [0, 1] inputs.
        std: per-channel std dividing [0, 1] inputs.
        open_clip_model: open_clip model name whose pretrained tags this preset accepts.
        state_dict_prefix: prefix of the trunk's keys in full-model checkpoints (``"visual."`` for CLIP).
        description: one line for :func:`list_extractors` users.
    """

    name: str
    channels: int
    stride: int
    build: Callable[[], nn.Module]
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    open_clip_model: str | None = None
    state_dict_prefix: str = "visual."
    description: str = field(default="", compare=False)


class CLIPResNetTrunk(nn.Module):
    """CLIP's modified ResNet (3-conv stem, anti-aliased bottlenecks) from the stem through ``layer3``.

    Parameter names equal those of open_clip's ``ModifiedResNet`` (and of OpenAI's archive
    without the ``visual.`` prefix); ``layer4`` and the attention pool are never built.

    Args:
        layers: bottleneck counts of layer1..layer3 (RN50: (3, 4, 6); RN101: (3, 4, 23)).
        width: stem width (64 for RN50/RN101); layer3 gives ``16 * width`` channels.

    Shape:
        - input: (B, 3, H, W), already normalised
        - output: (B, 16 * width, ~H/16, ~W/16)
    """

    def __init__(self, layers: tuple[int, int, int] = (3, 4, 6), width: int = 64) -> None:
        super().__init__()
        from open_clip.modified_resnet import Bottleneck

        half = width // 2
        self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(half, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        inplanes = width
        stages = []
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.out_channels = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.act3(self.bn3(self.conv3(x))))
        return self.layer3(self.layer2(self.layer1(x)))


_PRESETS: dict[str, ExtractorPreset] = {}


def register_extractor(preset: ExtractorPreset, overwrite: bool = False) -> ExtractorPreset:
    """Add a preset to the registry so ``SemanticExtractor(preset.name)`` can build it.

    Args:
        preset: the preset to add.
        overwrite: replace an existing preset of the same name instead of raising.
    """
    if preset.name in _PRESETS and not overwrite:
        raise ValueError(f"An extractor named {preset.name!r} is registered already; pass overwrite=True to replace it.")
    _PRESETS[preset.name] = preset
    return preset


def list_extractors() -> list[str]:
    """Names of the registered extractor presets, sorted."""
    return sorted(_PRESETS)


def get_extractor_preset(name: str) -> ExtractorPreset:
    """The preset registered under ``name``; raises ``ValueError`` listing the valid names."""
    if name not in _PRESETS:
        raise ValueError(f"Unknown extractor {name!r}. Available: {list_extractors()}.")
    return _PRESETS[name]


register_extractor(
    ExtractorPreset(
        name="clip_rn50",
        channels=1024,
        stride=16,
        build=functools.partial(CLIPResNetTrunk, (3, 4, 6)),
        open_clip_model="RN50",
        description="OpenAI CLIP RN50 image tower through layer3 (the paper's extractor).",
    )
)
register_extractor(
    ExtractorPreset(
        name="clip_rn101",
        channels=1024,
        stride=16,
        build=functools.partial(CLIPResNetTrunk, (3, 4, 23)),
        open_clip_model="RN101",
        description="OpenAI CLIP RN101 image tower through layer3 (same width as RN50, deeper layer3).",
    )
)


def _is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _trunk_weights(state: Mapping[str, torch.Tensor], trunk: nn.Module, prefix: str, source: str) -> dict:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    expected = trunk.state_dict()
    roots = {k.split(".", 1)[0] for k in expected}
    unexpected = sorted(k for k in state if k.split(".", 1)[0] in roots and k not in expected)
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match this extractor's trunk: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}) and {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). "
            "Pass OpenAI's CLIP archive or an open_clip checkpoint of the same model as the preset."
        )
    for key, value in expected.items():
        if key in state and state[key].shape != value.shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(state[key].shape)} but the trunk expects "
                f"{tuple(value.shape)}; the checkpoint is of another model than the preset."
            )
    return {k: state.get(k, v) for k, v in expected.items()}


def _cached_hub_file(cfg: Mapping, cache_dir: str | None) -> str | None:
    """The file open_clip would fetch from the Hugging Face hub, if it is already cached; else None.

    Looked up without any network call, in open_clip's order (safetensors first), so cached
    weights load at once, online or offline.
    """
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        from open_clip import pretrained as open_clip_pretrained
    except ImportError:
        return None
    repo_id, filename = os.path.split(hub)
    filename = filename or getattr(open_clip_pretrained, "HF_WEIGHTS_NAME", "open_clip_pytorch_model.bin")
    safe_alternatives = getattr(open_clip_pretrained, "_get_safe_alternatives", lambda name: ())
    for name in (*safe_alternatives(filename), filename):
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _download(preset: ExtractorPreset, tag: str, cache_dir: str | None) -> str:
    import open_clip

    model = preset.open_clip_model
    if model is None:
        raise ValueError(
            f"Extractor {preset.name!r} has no pretrained tags; pass pretrained= as a local file path."
        )
    tags = open_clip.list_pretrained_tags_by_model(model)
    if tag not in tags:
        raise ValueError(
            f"Unknown pretrained tag {tag!r} for extractor {preset.name!r} (open_clip model {model}). "
            f"Available tags: {tags}, or a local file path."
        )
    cfg = open_clip.get_pretrained_cfg(model, tag)
    cached = _cached_hub_file(cfg, cache_dir)
    if cached is not None:
        return cached
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as err:  # network, hub and cache errors all mean the same to the user
        raise RuntimeError(
            f"Could not get the {tag!r} weights of {model} for SemanticExtractor({preset.name!r}), "
            f"probably because this machine is offline ({type(err).__name__}: {err}). "
            f"On a machine with internet, download OpenAI's archive ({cfg.get('url') or 'n/a'}) or the "
            f"open_clip file of the Hugging Face repo {cfg.get('hf_hub', 'n/a').rstrip('/')!r}, copy it here and "
            "pass its path: SemanticExtractor(pretrained='/path/to/file'). Or fill the cache once online "
            "and pass the same cache_dir=. Offline, export HF_HUB_OFFLINE=1 to skip the network retries."
        ) from err
    if not path:
        raise RuntimeError(f"open_clip returned no file for {model}/{tag}; pass pretrained= as a local file path.")
    return path


def _looks_like_path(value: str) -> bool:
    return os.sep in value or (os.altsep or os.sep) in value or value.lower().endswith(_WEIGHT_FILE_SUFFIXES)


class SemanticExtractor(nn.Module):
    """Frozen pretrained trunk that turns images in [0, 1] into the semantic map SeD is conditioned on.

    The trunk is always in eval mode (``train()`` cannot change that, so BatchNorm running
    statistics never move), never needs gradients and runs under ``torch.no_grad()``.

    Args:
        name: registered preset, see :func:`list_extractors` (default ``"clip_rn50"``, the paper's).
        pretrained: a tag (``"openai"``, fetched through open_clip: online or from its cache),
            a local file (OpenAI's TorchScript ``RN50.pt``, an open_clip state dict as
            ``.pt``/``.bin``/``.safetensors``), or ``None`` for random weights (with a warning).
        cache_dir: download cache passed to open_clip.
        input_range: value range of the images you pass; ``(-1, 1)`` inputs are mapped to [0, 1].

    Shape:
        - input: (B, 3, H, W), H and W at least ``stride``
        - output: (B, channels, ~H/stride, ~W/stride); (B, 1024, 16, 16) for a 256 px clip_rn50 input

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
        pretrained: str | os.PathLike | None = "openai",
        *,
        cache_dir: str | None = None,
        input_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__()
        preset = get_extractor_preset(name)
        low, high = input_range
        if not high > low:
            raise ValueError(f"input_range must be (low, high) with high > low, got {input_range}.")
        self.preset = preset
        self.input_range = (float(low), float(high))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random trunks agree across processes and runs
            self.trunk = preset.build()
        self.register_buffer("mean", torch.tensor(preset.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preset.std).view(1, 3, 1, 1), persistent=False)
        self.pretrained = self._load(pretrained, cache_dir)
        self.requires_grad_(False)
        self.train(False)

    @property
    def channels(self) -> int:
        """Channels of the semantic map."""
        return self.preset.channels

    @property
    def stride(self) -> int:
        """Input pixels per semantic cell."""
        return self.preset.stride

    def _load(self, pretrained: str | os.PathLike | None, cache_dir: str | None) -> str | None:
        if pretrained is None:
            warnings.warn(
                f"SemanticExtractor({self.preset.name!r}) has RANDOM weights: its semantic maps are "
                "meaningless. Pass pretrained='openai' or a local weight file for real training.",
                UserWarning,
                stacklevel=3,
            )
            return None
        value = os.fspath(pretrained)
        if os.path.isfile(value):
            path = value
        elif _looks_like_path(value):
            raise FileNotFoundError(f"No weight file at {value!r}; check the path or pass a pretrained tag.")
        else:
            path = _download(self.preset, value, cache_dir)
        state = _trunk_weights(read_state_dict(path), self.trunk, self.preset.state_dict_prefix, path)
        self.trunk.load_state_dict(state, strict=True)
        return value

    def train(self, mode: bool = True) -> SemanticExtractor:
        """Kept for API compatibility: the extractor stays in eval mode whatever ``mode`` is."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Semantic map of an image batch.

        Args:
            x: images (B, 3, H, W) in ``input_range`` (default [0, 1]).

        Returns:
            The semantic map, without gradient history.
        """
        check_image(x, owner="SemanticExtractor", channels=3, min_size=self.stride, value_range=self.input_range)
        low, high = self.input_range
        if (low, high) != (0.0, 1.0):
            x = (x - low) / (high - low)
        return self.trunk((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"name={self.preset.name!r}, pretrained={self.pretrained!r}, channels={self.channels}, stride={self.stride}"
