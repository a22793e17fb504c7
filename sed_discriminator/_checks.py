"""Input validation shared by the discriminator and the extractor: each error says how to fix it."""

from __future__ import annotations

import warnings

import torch

from .config import _compiling, value_checks_enabled


def check_flag(value: object, name: str, *, none_ok: bool = False, config: str | None = None) -> bool | None:
    """``value`` if it is ``True`` or ``False`` (or ``None`` with ``none_ok``); else an error naming ``name``.

    Read by truthiness, the string ``"false"`` would mean true: every flag of the library takes a
    Python ``bool`` only. numpy and torch booleans are refused too (pass ``bool(x)``), so that
    ``np.bool_`` and a one-element tensor never get another meaning than the caller's.

    Args:
        value: the flag as given.
        name: the parameter (``"semantic_fusion"``) or the config key (``"trust_pickle_d"``).
        none_ok: ``None`` is a valid value too (e.g. ``channels_last``).
        config: for a key read from a trainer's config, where it is set (``"under network_d in the
            YAML file"``): the error is then a ``ValueError`` that says to write it unquoted.

    Raises:
        TypeError: a parameter that is not a ``bool``.
        ValueError: a config key that is not a ``bool``.
    """
    if isinstance(value, bool) or (none_ok and value is None):
        return value  # type: ignore[return-value]
    choices = "True, False or None" if none_ok else "True or False"
    got = f"got {value!r} ({type(value).__name__})"
    if config is not None:
        words = "true, false or null" if none_ok else "true or false"
        raise ValueError(
            f"{name} must be {words}, {got}; write {words} unquoted {config} (a quoted 'false' is a string, "
            "which would mean true)."
        )
    raise TypeError(f"{name} must be {choices}, {got}.")


def check_image(
    x: torch.Tensor,
    *,
    owner: str,
    channels: int,
    min_size: int = 1,
) -> None:
    """Raise ``ValueError`` unless ``x`` is a float (B, channels, H, W) batch of at least ``min_size`` px.

    With value checks on (:func:`~sed_discriminator.config.set_value_checks`), also rejects NaN/Inf.
    The value range is checked by :func:`check_input_range`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor image batch, got {type(x).__name__}.")
    if x.ndim != 4:
        hint = " Add the batch dimension with x.unsqueeze(0)." if x.ndim == 3 else ""
        raise ValueError(
            f"{owner} expects an image batch of shape (B, {channels}, H, W), "
            f"got a {x.ndim}-D tensor of shape {tuple(x.shape)}.{hint}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{owner} expects a floating-point image with values in [0, 1], got dtype {x.dtype}. "
            "Convert it with x.float() / 255."
        )
    if x.shape[1] != channels:
        hint = {1: "Repeat a grayscale image with x.expand(-1, 3, -1, -1).", 4: "Drop the alpha channel: x[:, :3]."}
        raise ValueError(
            f"{owner} expects {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)}). "
            + (hint.get(x.shape[1], "") if channels == 3 else "")
        )
    height, width = x.shape[-2:]
    if height < min_size or width < min_size:
        raise ValueError(
            f"{owner} needs images of at least {min_size}x{min_size} pixels, got {height}x{width}. "
            f"Use training patches of {min_size} px or more per side."
        )
    if value_checks_enabled() and x.numel():
        _check_finite(x, owner=owner, what="image")


def check_features(x: torch.Tensor, *, owner: str, channels: int) -> None:
    """Raise ``ValueError`` unless ``x`` is a float (B, channels, H, W) feature map."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner} expects image features as a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 4 or not x.is_floating_point() or x.shape[1] != channels:
        raise ValueError(
            f"{owner} was built for image features of shape (B, {channels}, H, W), float; got shape "
            f"{tuple(x.shape)} and dtype {x.dtype}. The call is block(features, semantic): features first."
        )


def check_same_dtype(weight: torch.Tensor, *, owner: str, **inputs: torch.Tensor | None) -> None:
    """Raise ``ValueError`` when an input's dtype differs from the weights' outside autocast (or is float64 inside).

    PyTorch's own message ("Input type (c10::Half) and bias type (float) should be the same")
    comes from deep inside a layer; this one names the input and the three ways out.
    """
    for name, t in inputs.items():
        if t is None or t.dtype == weight.dtype:
            continue
        if _autocast_enabled(t.device.type):
            if t.dtype != torch.float64:
                continue
            # autocast casts float32 inputs only: a float64 one would meet the layers' low-precision weights.
            raise ValueError(
                f"{owner} got a float64 {name.replace('_', ' ')} under torch.autocast, which leaves float64 tensors "
                f"as they are (its weights are {weight.dtype}). Convert it with .float() first."
            )
        raise ValueError(
            f"{owner}'s weights are {weight.dtype} but its {name.replace('_', ' ')} is {t.dtype}. Convert the input "
            f"with .to({weight.dtype}), the model with .to({t.dtype}), or run the forward under "
            f"torch.autocast({t.device.type!r}) for mixed precision."
        )


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type without autocast (meta)
        return False


def check_semantic(semantic: torch.Tensor, *, owner: str, channels: int, batch: int, check_finite: bool = True) -> None:
    """Raise ``ValueError`` unless ``semantic`` is a float (batch, channels, h, w) map with h, w >= 1.

    ``check_finite=False`` skips the optional NaN/Inf check (for callers whose caller checked already).
    """
    if not isinstance(semantic, torch.Tensor):
        raise TypeError(
            f"{owner} expects the semantic map as a torch.Tensor, got {type(semantic).__name__}. "
            "Compute it with SemanticExtractor()(hr_images)."
        )
    if semantic.ndim != 4:
        raise ValueError(
            f"{owner} expects a semantic map of shape (B, {channels}, h, w), "
            f"got a {semantic.ndim}-D tensor of shape {tuple(semantic.shape)}."
        )
    if not semantic.is_floating_point():
        raise ValueError(f"{owner} expects a floating-point semantic map, got dtype {semantic.dtype}.")
    if semantic.shape[1] != channels:
        raise ValueError(
            f"{owner} was built with semantic_channels={channels} but the semantic map has "
            f"{semantic.shape[1]} channels (shape {tuple(semantic.shape)}). Build it with "
            f"semantic_channels={semantic.shape[1]} or use the extractor it was designed for."
        )
    if semantic.shape[0] != batch:
        raise ValueError(
            f"{owner} got an image batch of {batch} but a semantic batch of {semantic.shape[0]}. "
            "Compute the semantics from the HR batch that matches these images."
        )
    if 0 in semantic.shape[-2:]:
        raise ValueError(
            f"{owner} got a semantic map with an empty {semantic.shape[-2]}x{semantic.shape[-1]} grid (shape "
            f"{tuple(semantic.shape)}): there is nothing to fuse. Compute it with SemanticExtractor()(hr_images) "
            "from images at least as large as the extractor's stride."
        )
    if check_finite and value_checks_enabled() and semantic.numel():
        _check_finite(semantic, owner=owner, what="semantic map")


def _check_finite(x: torch.Tensor, *, owner: str, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{owner} got NaN or Inf values in its {what}; check the upstream computation.")


# The range check: images whose values leave [low - slack, high + slack] are refused, with
# slack = RANGE_SLACK * (high - low). For the default [0, 1] that accepts [-0.9, 1.9]: a trained
# generator overshoots [0, 1] by a few hundredths and an untrained one (random init) stays within
# about [-0.75, 0.85] in our tests, while a batch of [-1, 1] images has pixels below -0.9 (any pixel
# darker than 5 % of full scale) and a 0-255 batch pixels above 1.9 (any pixel above 1.9/255).
RANGE_SLACK = 0.9
# Eager calls of each module that are range-checked when value checks are off (each check is
# one fused min/max and a device synchronisation; none after these calls). With value checks on,
# every call is checked.
RANGE_CHECK_CALLS = 16


def check_input_range(
    module: object, x: torch.Tensor, *, owner: str, value_range: tuple[float, float], judges_fakes: bool = False
) -> None:
    """Raise ``ValueError`` when ``x`` leaves ``value_range`` by more than the slack (see ``RANGE_SLACK``).

    ``judges_fakes`` (SeD): a generator early in training can leave the range by more than the
    slack, so there values beyond it only warn, unless they are of another scale altogether (more
    than ten range widths above it: 0-255 images), which still raises.

    Runs on the first :data:`RANGE_CHECK_CALLS` eager calls of ``module`` (on every call with
    value checks on); never under ``torch.compile`` (no graph break), on the ``meta`` device, nor
    while a CUDA graph is captured (no synchronisation allowed).
    """
    if _compiling() or not x.numel() or x.is_meta:
        return
    left = module.__dict__.get("_range_checks_left", RANGE_CHECK_CALLS)
    every_call = value_checks_enabled()
    if left <= 0 and not every_call:
        return
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    module.__dict__["_range_checks_left"] = max(left - 1, 0)
    lo_t, hi_t = torch.aminmax(x.detach())
    lo, hi = lo_t.item(), hi_t.item()
    low, high = value_range
    slack = RANGE_SLACK * (high - low)
    if lo != lo or hi != hi:  # NaN: only the value checks look for it
        return
    if low - slack <= lo and hi <= high + slack:
        return
    message = (
        f"{owner} expects image values in [{low:g}, {high:g}], got [{lo:.4g}, {hi:.4g}]. Scale [0, 255] images "
        "by 1/255 and [-1, 1] images with (x + 1) / 2, or pass input_range=(low, high), the range your images are "
        "in (SeD, SemanticExtractor, ConditionedSeD and SeDAdversary take it). Values up to "
        f"{slack:g} outside the range pass (a generator's overshoot)."
    )
    if judges_fakes and hi <= high + 10 * (high - low):
        warnings.warn(message + " (A warning here: an untrained generator's output can leave the range too.)",
                      UserWarning, stacklevel=3)  # fmt: skip
        return
    raise ValueError(message)
