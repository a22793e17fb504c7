"""Image-quality metrics as SR papers report them: PSNR / SSIM on Y (SSIM: BasicSR's, float64) and LPIPS.

Y is ITU-R BT.601 luma as MATLAB's ``rgb2ycbcr`` gives it (in [16, 235], not rounded), after
``crop_border`` pixels (the scale) are removed from every side. LPIPS (AlexNet, v0.1) comes
from the ``lpips`` package when it and its weights are available.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SSIM_WINDOW = 11  # px; the side of SSIM's Gaussian window (sigma 1.5)


def _y_pair(sr: torch.Tensor, hr: torch.Tensor, crop_border: int) -> tuple[torch.Tensor, torch.Tensor]:
    # (1, 1, H, W) Y / 255 in float64. Not BasicSR's rgb2ycbcr_pt: it makes its weights in float32 (PSNR 1e-7 dB off).
    if sr.shape != hr.shape or sr.ndim != 3 or sr.shape[0] != 3:
        raise ValueError(f"Expected two RGB images (3, H, W) of one shape, got {tuple(sr.shape)} and "
                         f"{tuple(hr.shape)}.")  # fmt: skip
    if min(hr.shape[-2:]) <= 2 * crop_border:
        raise ValueError(f"The image {tuple(hr.shape[-2:])} is too small to crop {crop_border} px from each side.")
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64, device=hr.device).view(3, 1, 1)
    y = lambda x: (16 + ((x.double() if x.is_floating_point() else x.double() / 255) * weights).sum(0)) / 255  # noqa: E731
    return y(sr)[None, None], y(hr)[None, None]


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 4) -> float:
    """PSNR in dB on Y of two RGB images (3, H, W) (float in [0, 1] or uint8); ``inf`` for identical images."""
    # Not BasicSR's calculate_psnr_pt: it adds 1e-8 to the MSE (identical images score 80 dB, 45 dB ones 1e-3 dB less).
    a, b = _y_pair(sr, hr, crop_border)
    c = crop_border
    mse = torch.mean((a - b)[..., c : a.shape[-2] - c, c : a.shape[-1] - c] ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 4) -> float:
    """SSIM on Y (Wang et al.: 11x11 Gaussian window, sigma 1.5, over the valid part), BasicSR's ``calculate_ssim_pt``.

    Example:
        >>> img = torch.rand(3, 32, 32)
        >>> round(ssim_y(img, img), 6)
        1.0
    """
    from basicsr.metrics.psnr_ssim import calculate_ssim_pt

    a, b = _y_pair(sr, hr, crop_border)
    if min(hr.shape[-2:]) - 2 * crop_border < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after cropping {crop_border} px.")
    return calculate_ssim_pt(a, b, crop_border).item()


def load_lpips(device: torch.device | str = "cpu") -> tuple[Callable[..., float] | None, str]:
    """``(lpips, "")``, ``lpips(sr, hr, crop_border=4)`` the LPIPS (AlexNet) of two RGB images (3, H, W) in [0, 1]
    with the border cropped (lower is better); ``(None, why)`` when the package or its weights cannot be had."""
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError:
        return None, "the lpips package is not installed (pip install lpips)"
    try:
        model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as err:  # AlexNet weights come from torchvision's download server
        return None, f"its AlexNet weights could not be loaded ({type(err).__name__}: {err})"

    @torch.no_grad()
    def score(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 4) -> float:
        c = crop_border
        a, b = (x.float()[None, :, c : x.shape[-2] - c, c : x.shape[-1] - c].to(device) * 2 - 1 for x in (sr, hr))
        return model(a, b).item()

    return score, ""
