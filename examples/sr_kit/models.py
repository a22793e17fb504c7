"""Networks of the ESRGAN retrofit: RRDBNet (spandrel), the discriminators, BasicSR's perceptual loss, EMA, weights.

Pretrained weights (SeD's semantic extractor, torchvision's VGG19) are never replaced by random
ones silently: a weight that cannot be had raises :class:`WeightsUnavailable` with the fix unless
random weights are allowed (then a banner says so); a file that exists but does not load is
always :class:`DamagedWeights`, naming it. Every weight file is read by the library's reader
(damage check; pickle-based files and TorchScript under its trust rule, ``trust_pickle``).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
from torch import nn

from sed_discriminator.weights import UntrustedFileError, read_state_dict, unwrap_state_dict


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded, and random ones were not allowed."""


class DamagedWeights(WeightsUnavailable):
    """A weight file exists but does not load (random weights are not used in its place)."""


def untrusted_here(err: UntrustedFileError) -> UntrustedFileError:
    """The library's refusal of a sound file, with the scripts' way out (a flag, not the Python keyword)."""
    return UntrustedFileError(f"{err} On this command line: add --trust-pickle.")


def _damaged(path: str, what: str, flag: str, err: BaseException) -> WeightsUnavailable:
    if isinstance(err, UntrustedFileError):  # a sound file this torch cannot read safely: the fix is a flag
        return WeightsUnavailable(f"{flag} {path!r}: {untrusted_here(err)}")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__
    empty = os.path.isfile(path) and os.path.getsize(path) == 0
    detail = "it is empty" if empty else f"it is truncated, damaged or not a weight file ({reason})"
    return DamagedWeights(
        f"{flag} {path!r} cannot be loaded as {what} weights: {detail}. Download the file again, or pass another "
        f"one with {flag}. (--allow-random-weights stands in for weights that are missing, not for a broken file.)"
    )


def banner(lines: Sequence[str], stream=None) -> None:
    """Print a framed warning that stands out in a training log."""
    width = max(len(line) for line in lines) + 4
    text = "\n".join(["!" * width, *(f"! {line.ljust(width - 4)} !" for line in lines), "!" * width])
    print(text, file=stream or sys.stderr, flush=True)


def _random_banner(what: str, reason: str) -> None:
    banner([f"RANDOM WEIGHTS: {what}", reason, "Fine for a smoke run; the results say nothing about real training."])


def load_extractor(name: str = "clip_rn50", weights: str = "default", allow_random: bool = False,
                   trust_pickle: bool = False):  # fmt: skip
    """``(extractor, is_random)``: the frozen :class:`~sed_discriminator.SemanticExtractor` with its weights.

    Raises:
        DamagedWeights: ``weights`` is a file that does not load (whatever ``allow_random`` says).
        WeightsUnavailable: the weights could not be had and ``allow_random`` is false, or the
            trust rule refuses the file.
    """
    from sed_discriminator import SemanticExtractor

    reason = "--extractor-weights random was given."
    if weights != "random":
        try:
            return SemanticExtractor(name, pretrained=weights, trust_pickle=trust_pickle), False
        except Exception as err:  # offline, empty cache, missing or broken file, ...
            if os.path.exists(weights):
                raise _damaged(weights, f"the {name} extractor's", "--extractor-weights", err) from err
            if not allow_random:
                raise WeightsUnavailable(f"{err}\n\nTo train anyway with RANDOM semantic weights (a smoke run, "
                                         "not a result), add --allow-random-weights.") from err  # fmt: skip
            reason = f"the {weights!r} weights of {name} could not be loaded ({type(err).__name__})."
    _random_banner(f"semantic extractor {name} (SeD's semantic trunk)", reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return SemanticExtractor(name, pretrained=None), True


# ------------------------------------------------------------------------------------ generator


def build_generator(num_feat: int = 64, num_blocks: int = 23, scale: int = 4) -> nn.Module:
    """ESRGAN's RRDBNet (spandrel's), ESRGAN-initialised: dense-block convs Kaiming-normal x 0.1, zero biases."""
    from spandrel.architectures.ESRGAN import ESRGAN

    model = ESRGAN(num_filters=num_feat, num_blocks=num_blocks, scale=scale)
    for block in model.modules():
        if type(block).__name__.startswith("ResidualDenseBlock"):
            for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d)):
                nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
                conv.weight.data.mul_(0.1)
                nn.init.zeros_(conv.bias)
    return model


def load_generator_weights(source: str | os.PathLike | Mapping[str, torch.Tensor], scale: int | None = None,
                           *, name: str | None = None, trust_pickle: bool = False) -> nn.Module:  # fmt: skip
    """An SR generator from a weight file or a state dict, the architecture detected by spandrel.

    The library reads the file (``params_ema`` / ``params`` unwrapped); spandrel maps the old, new
    and BSRGAN key layouts of RRDBNet to one architecture. Not spandrel's own reader: it runs
    ``torch.jit.load`` on any ``.pt`` file, code included.

    Raises:
        FileNotFoundError: no such file.
        ValueError: damaged, refused by the trust rule (:class:`UntrustedFileError`), not an SR
            generator spandrel recognises, or of another scale.
    """
    import spandrel

    name = name or (str(source) if not isinstance(source, Mapping) else "the state dict")
    try:
        state = (unwrap_state_dict(source, source=name) if isinstance(source, Mapping)
                 else read_state_dict(source, trust_pickle=trust_pickle))  # fmt: skip
    except UntrustedFileError as err:
        raise untrusted_here(err) from None
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    except Exception as err:
        raise ValueError(f"{name} is not a generator checkpoint spandrel recognises ({type(err).__name__}: {err}). "
                         "Pass an ESRGAN / Real-ESRGAN / KAIR RRDBNet .pth file.") from err  # fmt: skip
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ValueError(f"{name} holds a {descriptor.architecture.name} model, not an image-to-image generator.")
    if scale is not None and descriptor.scale != scale:
        raise ValueError(f"{name} is a x{descriptor.scale} model but --scale is {scale}; pass --scale "
                         f"{descriptor.scale}.")  # fmt: skip
    if descriptor.architecture.id != "ESRGAN":
        warnings.warn(f"{name} is a {descriptor.architecture.name} model, not ESRGAN's RRDBNet; training it anyway.",
                      UserWarning, stacklevel=2)  # fmt: skip
    return descriptor.model


# ------------------------------------------------------------------------------ discriminators

DISCRIMINATORS = {
    "sed-patch": "P+SeD: PatchGAN with semantic fusion (the paper's RRDB+P+SeD)",
    "sed-pixel": "U+SeD: U-Net (per-pixel) with semantic fusion (RRDB+U+SeD)",
    "patch": "P: the same PatchGAN without semantics (baseline RRDB+P)",
    "pixel": "U: the same U-Net without semantics (baseline RRDB+U)",
}


def build_discriminator(kind: str, width: int, extractor: Any = None) -> nn.Module:
    """A discriminator called as ``d(x)`` (the SeD kinds read the semantics set by ``set_condition(hr)``)."""
    from sed_discriminator import ConditionedSeD, SeD

    if kind not in DISCRIMINATORS:
        raise ValueError(f"Unknown discriminator {kind!r}; choose one of {list(DISCRIMINATORS)}.")
    if kind.startswith("sed-"):
        if extractor is None:
            raise ValueError(f"The {kind!r} discriminator needs a semantic extractor.")
        return ConditionedSeD(kind.removeprefix("sed-"), extractor=extractor, width=width)
    return SeD(kind, width=width, semantic_fusion=False)


# ------------------------------------------------------------------------------ perceptual loss

PAPER_LAYER_WEIGHTS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}


def _vgg19_features() -> nn.Sequential:
    from torchvision.models.vgg import cfgs, make_layers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights agree across runs, resumes and processes
        return make_layers(cfgs["E"], batch_norm=False)


def load_vgg19_features(weights: str = "imagenet", allow_random: bool = False,
                        trust_pickle: bool = False) -> tuple[nn.Sequential, bool]:  # fmt: skip
    """``(features, is_random)``: torchvision's VGG19 convolutions with ImageNet weights, a local file's, or random.

    Raises:
        DamagedWeights: ``weights`` is a file that does not load (whatever ``allow_random`` says).
        WeightsUnavailable: the weights could not be had (or the trust rule refuses the file) and
            ``allow_random`` is false.
    """
    features = _vgg19_features()
    if weights == "random":
        _random_banner("VGG19 of the perceptual loss", "--vgg-weights random was given.")
        return features, True
    try:
        if weights != "imagenet" and os.path.exists(weights):
            state = read_state_dict(weights, trust_pickle=trust_pickle)
        elif weights == "imagenet":
            from torchvision.models import VGG19_Weights

            state = VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        else:
            raise FileNotFoundError(f"No VGG19 weight file at {weights!r}")
        features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if "classifier" not in k})
        return features, False
    except Exception as err:  # URLError offline, a missing file, a damaged one, ...
        if weights != "imagenet" and os.path.exists(weights):
            raise _damaged(weights, "VGG19", "--vgg-weights", err) from err
        if not allow_random:
            raise WeightsUnavailable(
                f"Could not load the VGG19 weights of the perceptual loss ({type(err).__name__}: {err}). On a machine "
                "with internet, download https://download.pytorch.org/models/vgg19-dcbb9e9d.pth into "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'} (or pass its path with --vgg-weights PATH).\n\n"
                "To train anyway with RANDOM VGG weights (a smoke run, not a result), add --allow-random-weights."
            ) from err
        reason = f"its {weights!r} weights could not be loaded ({type(err).__name__})."
        _random_banner("VGG19 of the perceptual loss", reason)
        return _vgg19_features(), True


def perceptual_loss(features: nn.Sequential, layer_weights: Mapping[str, float] = PAPER_LAYER_WEIGHTS) -> nn.Module:
    """BasicSR's ``PerceptualLoss`` (L1 between VGG19 features before the ReLU, ImageNet-normalised) on ``features``.

    Called as ``loss(sr, hr)``, it returns ``(perceptual, style)``; the style term is ``None`` here.
    """
    from basicsr.archs import vgg_arch
    from basicsr.losses.basic_loss import PerceptualLoss

    # BasicSR's VGGFeatureExtractor downloads torchvision's weights itself; it gets the features loaded above.
    vgg = SimpleNamespace(vgg19=lambda pretrained: SimpleNamespace(features=features))
    with mock.patch.object(vgg_arch, "vgg", vgg), mock.patch.object(vgg_arch, "VGG_PRETRAIN_PATH", os.devnull + "/x"):
        return PerceptualLoss(dict(layer_weights), vgg_type="vgg19", style_weight=0.0)


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """torch's EMA of ``model``'s weights and buffers (``ema.module`` is the averaged copy)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if not 0.0 < decay < 1.0:
        raise ValueError(f"The EMA decay must be in (0, 1), got {decay}.")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True).requires_grad_(False)
