"""Networks of the ESRGAN retrofit: the generator, the discriminators, the perceptual loss, and weight loading.

Pretrained weights (CLIP RN50 for SeD's semantics, torchvision's VGG19 for the perceptual
loss) are never replaced by random ones silently: :func:`load_extractor` and
:func:`load_vgg19_features` raise :class:`WeightsUnavailable` with the fix, unless the caller
allows random weights, in which case they print a banner that is hard to miss.

Both treat a failure the same way. Weights that cannot be had (a missing file, no network,
an empty cache) may be replaced by random ones when allowed. A weight file that exists but
does not load (empty, truncated, damaged, text, another model's) is always an error,
:class:`DamagedWeights`, naming the file: allowing random weights does not cover a broken download.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- random weights


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded, and random ones were not allowed."""


class DamagedWeights(WeightsUnavailable):
    """A weight file exists but does not load (random weights are not used in its place)."""


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def _damaged(path: str, what: str, flag: str, err: BaseException) -> DamagedWeights:
    size = os.path.getsize(path) if os.path.isfile(path) else None
    detail = "it is empty" if size == 0 else f"it is truncated, damaged or not a weight file ({_first_line(err)})"
    return DamagedWeights(
        f"{flag} {path!r} cannot be loaded as {what} weights: {detail}. Download the file again, or pass another "
        f"one with {flag}. (--allow-random-weights stands in for weights that are missing, not for a broken file.)"
    )


def banner(lines: Sequence[str], stream=None) -> None:
    """Print a framed, upper-case-headed warning that stands out in a training log."""
    stream = stream or sys.stderr
    width = max(len(line) for line in lines) + 4
    bar = "!" * width
    print(bar, file=stream)
    for line in lines:
        print(f"! {line.ljust(width - 4)} !", file=stream)
    print(bar, file=stream, flush=True)


def _random_banner(what: str, reason: str) -> None:
    banner(
        [
            f"RANDOM WEIGHTS: {what}",
            reason,
            "Fine for a smoke run; the results say nothing about real training.",
        ]
    )


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether ``host`` resolves within ``timeout`` seconds (a cheap check before a download)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _go_offline_if_unreachable() -> None:
    # Offline, huggingface_hub retries each file for about a minute before giving up. When the
    # Hub does not even resolve, switch it to offline mode: cached weights still load at once.
    if os.environ.get("HF_HUB_OFFLINE") or hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    print("huggingface.co does not resolve: using the local weight cache only (HF_HUB_OFFLINE=1).", file=sys.stderr)


def load_extractor(name: str = "clip_rn50", weights: str = "openai", allow_random: bool = False):
    """The frozen :class:`~sed_discriminator.SemanticExtractor` with its pretrained weights.

    Args:
        name: extractor preset.
        weights: an open_clip tag (``"openai"``), a local file, or ``"random"``.
        allow_random: build it with random weights (and a banner) when ``weights`` cannot be loaded.

    Returns:
        ``(extractor, is_random)``.

    Raises:
        DamagedWeights: ``weights`` is a file that does not load (whatever ``allow_random`` says).
        WeightsUnavailable: the weights could not be had and ``allow_random`` is false.
    """
    from sed_discriminator import SemanticExtractor

    if weights != "random":
        local = os.path.exists(weights)
        if not local:
            _go_offline_if_unreachable()
        try:
            return SemanticExtractor(name, pretrained=weights), False
        except Exception as err:  # offline, empty cache, missing or broken file, ...
            if local:
                raise _damaged(weights, f"the {name} extractor's", "--extractor-weights", err) from err
            if not allow_random:
                raise WeightsUnavailable(
                    f"{err}\n\nTo train anyway with RANDOM semantic weights (a smoke run, not a result), "
                    "add --allow-random-weights."
                ) from err
            reason = f"the {weights!r} weights of {name} could not be loaded ({type(err).__name__})."
    else:
        reason = "--extractor-weights random was given."
    _random_banner(f"semantic extractor {name} (SeD's CLIP trunk)", reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return SemanticExtractor(name, pretrained=None), True


# ------------------------------------------------------------------------------------ generator


def esrgan_init(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """ESRGAN's initialisation for training from scratch.

    The convolutions inside the residual dense blocks get Kaiming-normal weights scaled by
    ``scale`` and zero biases, so the 23 residual-in-residual blocks start close to identity;
    the convolutions of the main path (first, trunk end, upsampling, last) keep PyTorch's default.
    """
    for block in model.modules():
        if type(block).__name__.startswith("ResidualDenseBlock"):
            for conv in block.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
                    conv.weight.data.mul_(scale)
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
    return model


def build_generator(num_feat: int = 64, num_blocks: int = 23, scale: int = 4) -> nn.Module:
    """ESRGAN's RRDBNet (spandrel's implementation), ESRGAN-initialised."""
    from spandrel.architectures.ESRGAN import ESRGAN

    return esrgan_init(ESRGAN(num_filters=num_feat, num_blocks=num_blocks, scale=scale))


def _checked_generator(descriptor: Any, source: str, scale: int | None) -> nn.Module:
    import spandrel

    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ValueError(f"{source} holds a {descriptor.architecture.name} model, not an image-to-image generator.")
    if scale is not None and descriptor.scale != scale:
        raise ValueError(
            f"{source} is a x{descriptor.scale} model but --scale is {scale}; pass --scale {descriptor.scale}."
        )
    if descriptor.architecture.id != "ESRGAN":
        warnings.warn(
            f"{source} is a {descriptor.architecture.name} model, not ESRGAN's RRDBNet; training it anyway.",
            UserWarning,
            stacklevel=3,
        )
    return descriptor.model


def generator_from_state_dict(state: Mapping[str, torch.Tensor], source: str, scale: int | None = None) -> nn.Module:
    """Rebuild an SR generator from its weights, the architecture detected by spandrel.

    Raises:
        ValueError: not an SR model spandrel recognises, or its scale is not ``scale``.
    """
    import spandrel

    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(dict(state))
    except Exception as err:
        raise ValueError(f"{source} holds no generator spandrel recognises ({type(err).__name__}: {err}).") from err
    return _checked_generator(descriptor, source, scale)


def load_generator_weights(path: str | os.PathLike, scale: int | None = None) -> nn.Module:
    """Generator from a weight file: PSNR-trained ESRGAN weights, a Real-ESRGAN or KAIR RRDBNet file, ...

    spandrel reads ``.pth`` / ``.safetensors`` / ``.ckpt`` files, unwraps ``params`` /
    ``params_ema`` and maps the old, new and BSRGAN key layouts of RRDBNet to one architecture.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an SR generator spandrel recognises, or of another scale.
    """
    import spandrel

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No generator weight file at {path!r}.")
    try:
        descriptor = spandrel.ModelLoader().load_from_file(path)
    except Exception as err:
        raise ValueError(
            f"{path} is not a generator checkpoint spandrel recognises ({type(err).__name__}: {err}). "
            "Pass an ESRGAN / Real-ESRGAN / KAIR RRDBNet .pth file."
        ) from err
    return _checked_generator(descriptor, path, scale)


# ------------------------------------------------------------------------------ discriminators

DISCRIMINATORS = {
    "sed-patch": "P+SeD: PatchGAN with semantic fusion (the paper's RRDB+P+SeD)",
    "sed-pixel": "U+SeD: U-Net (per-pixel) with semantic fusion (RRDB+U+SeD)",
    "patch": "P: the same PatchGAN without semantics (baseline RRDB+P)",
    "pixel": "U: the same U-Net without semantics (baseline RRDB+U)",
    "vgg": "ESRGAN's VGG-style discriminator (baseline ESRGAN)",
}


class VGGStyleDiscriminator(nn.Module):
    """ESRGAN's discriminator: strided conv stages with BatchNorm down to 4x4, then two linear layers.

    Each stage is a 3x3 conv and a 4x4 stride-2 conv, both followed by BatchNorm (except the
    very first conv) and LeakyReLU(0.2); widths double up to 8x ``width``. A 128 px input has
    five stages, as in ESRGAN; other sizes of the form 4 * 2^k get k stages.

    Args:
        width: channels of the first stage (64 in ESRGAN).
        input_size: training patch size, 4 * 2^k with k >= 1.
        in_channels: image channels.

    Shape:
        - input: (B, in_channels, input_size, input_size)
        - output: (B, 1) logits
    """

    def __init__(self, width: int = 64, input_size: int = 128, in_channels: int = 3) -> None:
        super().__init__()
        stages = (input_size // 4).bit_length() - 1
        if input_size < 8 or 4 * 2**stages != input_size:
            raise ValueError(
                "The VGG-style discriminator needs a patch size of the form 4 * 2^k (32, 64, 128, 256...), "
                f"got {input_size}."
            )
        self.input_size = input_size
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(stages):
            out = width * min(2**i, 8)
            first = nn.Conv2d(channels, out, 3, 1, 1, bias=i == 0)
            layers += [first] if i == 0 else [first, nn.BatchNorm2d(out)]
            layers += [nn.LeakyReLU(0.2), nn.Conv2d(out, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out)]
            layers += [nn.LeakyReLU(0.2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * 16, 100), nn.LeakyReLU(0.2), nn.Linear(100, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"VGGStyleDiscriminator was built for {self.input_size} px inputs, got {tuple(x.shape[-2:])}."
            )
        return self.classifier(self.features(x))


def build_discriminator(kind: str, width: int, patch_size: int, extractor: Any = None) -> nn.Module:
    """A discriminator called as ``d(x)`` (the SeD kinds read the semantics set by ``set_condition(hr)``).

    Args:
        kind: a key of :data:`DISCRIMINATORS`.
        width: base width (64 in the paper and in ESRGAN).
        patch_size: HR training patch size (the VGG-style one is built for it).
        extractor: the :class:`~sed_discriminator.SemanticExtractor` of the SeD kinds.
    """
    from sed_discriminator import ConditionedSeD, SeD

    if kind not in DISCRIMINATORS:
        raise ValueError(f"Unknown discriminator {kind!r}; choose one of {list(DISCRIMINATORS)}.")
    if kind.startswith("sed-"):
        if extractor is None:
            raise ValueError(f"The {kind!r} discriminator needs a semantic extractor.")
        return ConditionedSeD(kind.removeprefix("sed-"), extractor=extractor, width=width)
    if kind in ("patch", "pixel"):
        return SeD(kind, width=width, semantic_fusion=False)
    return VGGStyleDiscriminator(width, patch_size)


# ------------------------------------------------------------------------------ perceptual loss

# Indices of the convolutions of torchvision's vgg19().features, by their usual names.
VGG19_CONVS = {
    "conv1_1": 0, "conv1_2": 2,
    "conv2_1": 5, "conv2_2": 7,
    "conv3_1": 10, "conv3_2": 12, "conv3_3": 14, "conv3_4": 16,
    "conv4_1": 19, "conv4_2": 21, "conv4_3": 23, "conv4_4": 25,
    "conv5_1": 28, "conv5_2": 30, "conv5_3": 32, "conv5_4": 34,
}  # fmt: skip
PAPER_LAYER_WEIGHTS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg19_features() -> nn.Sequential:
    from torchvision.models.vgg import cfgs, make_layers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights agree across runs, resumes and processes
        return make_layers(cfgs["E"], batch_norm=False)


def load_vgg19_features(weights: str = "imagenet", allow_random: bool = False) -> tuple[nn.Sequential, bool]:
    """torchvision's VGG19 convolutional part with its ImageNet weights.

    Args:
        weights: ``"imagenet"`` (torchvision's ``IMAGENET1K_V1``, downloaded once into
            ``$TORCH_HOME/hub/checkpoints``), a local ``vgg19-dcbb9e9d.pth``-style file, or ``"random"``.
        allow_random: use random weights (with a banner) when they cannot be loaded.

    Returns:
        ``(features, is_random)``.

    Raises:
        DamagedWeights: ``weights`` is a file that does not load (whatever ``allow_random`` says).
        WeightsUnavailable: the weights could not be had and ``allow_random`` is false.
    """
    features = _vgg19_features()
    if weights == "random":
        _random_banner("VGG19 of the perceptual loss", "--vgg-weights random was given.")
        return features, True
    if weights != "imagenet" and os.path.exists(weights):
        try:
            _load_vgg19_file(features, weights)
        except Exception as err:
            raise _damaged(weights, "VGG19", "--vgg-weights", err) from err
        return features, False
    try:
        if weights != "imagenet":
            raise FileNotFoundError(f"No VGG19 weight file at {weights!r}")
        from torchvision.models import VGG19_Weights

        _load_vgg19_state(features, VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False))
    except Exception as err:  # URLError offline, a missing file, ...
        if not allow_random:
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise WeightsUnavailable(
                f"Could not load the VGG19 weights of the perceptual loss ({type(err).__name__}: {err}). "
                f"On a machine with internet, download https://download.pytorch.org/models/vgg19-dcbb9e9d.pth "
                f"into {hub} (or pass its path with --vgg-weights PATH).\n\nTo train anyway with RANDOM VGG "
                "weights (a smoke run, not a result), add --allow-random-weights."
            ) from err
        reason = f"its {weights!r} weights could not be loaded ({type(err).__name__})."
        _random_banner("VGG19 of the perceptual loss", reason)
        return _vgg19_features(), True
    return features, False


def _load_vgg19_state(features: nn.Sequential, state: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict, found a {type(state).__name__}")
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    features.load_state_dict(state)


def _load_vgg19_file(features: nn.Sequential, path: str) -> None:
    import zipfile

    from .checkpoint import verify_archive

    if zipfile.is_zipfile(path):
        verify_archive(path)  # torch.load does not check the archive's CRCs
    _load_vgg19_state(features, torch.load(path, map_location="cpu", weights_only=True))


class VGGPerceptualLoss(nn.Module):
    """Weighted L1 distance between VGG19 features (before the ReLU) of the SR and HR images.

    The paper's recipe: conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 with weights 0.1, 0.1, 1,
    1, 1, on inputs normalised with ImageNet's mean and std. The HR features carry no gradient.

    Args:
        features: VGG19 ``features`` (see :func:`load_vgg19_features`); frozen here.
        layer_weights: ``{conv name: weight}``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, features: nn.Sequential, layer_weights: Mapping[str, float] = PAPER_LAYER_WEIGHTS) -> None:
        super().__init__()
        unknown = sorted(set(layer_weights) - set(VGG19_CONVS))
        if unknown:
            raise ValueError(f"Unknown VGG19 layers {unknown}; choose from {list(VGG19_CONVS)}.")
        last = max(VGG19_CONVS[name] for name in layer_weights)
        layers = [nn.ReLU(inplace=False) if isinstance(m, nn.ReLU) else m for m in list(features)[: last + 1]]
        self.features = nn.Sequential(*layers)  # in-place ReLUs would overwrite the features we keep
        self.taps = {VGG19_CONVS[name]: weight for name, weight in layer_weights.items()}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        return super().train(False)

    def _features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        out = {}
        x = (x - self.mean) / self.std
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                out[index] = x
        return out

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self._features(hr)
        pred = self._features(sr)
        return sum(weight * F.l1_loss(pred[i].float(), target[i].float()) for i, weight in self.taps.items())


# ------------------------------------------------------------------------------------------ EMA


class EMA:
    """Exponential moving average of a model's weights (buffers are copied).

    Args:
        model: the model to track (a deep copy is kept, in eval mode, without gradients).
        decay: weight of the old average at each update.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        if not 0.0 < decay < 1.0:
            raise ValueError(f"The EMA decay must be in (0, 1), got {decay}.")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.model.load_state_dict(state["model"])
