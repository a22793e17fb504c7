"""Image-quality metrics as SR papers report them (the SeD paper's Table 1 included).

PSNR and SSIM are computed on the luma (Y) channel of ITU-R BT.601 YCbCr, as MATLAB's
``rgb2ycbcr`` defines it for images in [0, 1]: ``Y = 16 + 65.481 R + 128.553 G + 24.966 B``,
in [16, 235] (not rounded to integers), after removing ``crop_border`` pixels (the scale)
from every side. SSIM is Wang et al.'s: an 11x11 Gaussian window with sigma 1.5, constants
``(0.01 * 255)^2`` and ``(0.03 * 255)^2``, over the valid part of the image, in float64.

LPIPS (AlexNet, v0.1) comes from the ``lpips`` package when it and its weights are available.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_Y_WEIGHTS = (65.481, 128.553, 24.966)
SSIM_WINDOW = 11  # px; the Gaussian window's side (sigma 1.5)


def _as_float64(img: torch.Tensor) -> torch.Tensor:
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"Expected an RGB image of shape (3, H, W), got {tuple(img.shape)}.")
    if not img.is_floating_point():
        return img.double() / 255.0
    return img.double()


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """Y channel (H, W) in [16, 235] of an RGB image (3, H, W) in [0, 1] (float) or [0, 255] (uint8)."""
    x = _as_float64(img)
    w = torch.tensor(_Y_WEIGHTS, dtype=torch.float64, device=x.device).view(3, 1, 1)
    return 16.0 + (x * w).sum(0)


def _crop(x: torch.Tensor, border: int) -> torch.Tensor:
    return x[..., border:-border, border:-border] if border > 0 else x


def _prepare(sr: torch.Tensor, hr: torch.Tensor, crop_border: int) -> tuple[torch.Tensor, torch.Tensor]:
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR images differ in shape: {tuple(sr.shape)} vs {tuple(hr.shape)}.")
    if min(hr.shape[-2:]) <= 2 * crop_border:
        raise ValueError(f"The image {tuple(hr.shape[-2:])} is too small to crop {crop_border} px from each side.")
    return _crop(rgb_to_y(sr), crop_border), _crop(rgb_to_y(hr), crop_border)


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 4) -> float:
    """PSNR in dB on the Y channel with ``crop_border`` pixels removed; ``inf`` for identical images.

    Args:
        sr, hr: RGB images (3, H, W), float in [0, 1] or uint8.
        crop_border: pixels removed from each side (the SR scale).
    """
    y_sr, y_hr = _prepare(sr, hr, crop_border)
    mse = torch.mean((y_sr - y_hr) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def gaussian_kernel_1d(
    size: int = SSIM_WINDOW, sigma: float = 1.5, device: torch.device | str | None = None
) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (float64); SSIM's 2-D window is its outer product with itself."""
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _gaussian_filter_valid(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    # (C, H, W) -> (C, H - k + 1, W - k + 1): the 2-D window applied as a column pass then a row pass.
    channels, size = maps.shape[0], kernel.numel()
    x = F.conv2d(maps[None], kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)[0]


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 4) -> float:
    """SSIM on the Y channel with ``crop_border`` pixels removed (1.0 for identical images).

    The 11x11 Gaussian window is separable, so the local statistics are filtered by two 1-D
    passes (22 products a pixel instead of 121); the result equals the 2-D convolution's to
    float64 rounding.

    Args:
        sr, hr: RGB images (3, H, W), float in [0, 1] or uint8.
        crop_border: pixels removed from each side (the SR scale).

    Example:
        >>> img = torch.rand(3, 32, 32)
        >>> round(ssim_y(img, img), 6)
        1.0
    """
    y_sr, y_hr = _prepare(sr, hr, crop_border)
    if min(y_hr.shape) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after cropping, got {tuple(y_hr.shape)}."
        )
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    stats = torch.stack([y_sr, y_hr, y_sr * y_sr, y_hr * y_hr, y_sr * y_hr])
    mu_x, mu_y, xx, yy, xy = _gaussian_filter_valid(stats, gaussian_kernel_1d(device=y_hr.device))
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean().item()


class LPIPSMetric:
    """LPIPS (AlexNet) from the ``lpips`` package, or unavailable with a reason.

    ``available`` tells whether it can be used; ``reason`` says why not (package missing,
    weights not downloadable offline).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.model = None
        self.reason = ""
        try:
            import lpips  # type: ignore[import-not-found]
        except ImportError:
            self.reason = "the lpips package is not installed (pip install lpips)"
            return
        try:
            self.model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
        except Exception as err:  # AlexNet weights come from torchvision's download server
            self.reason = f"its AlexNet weights could not be loaded ({type(err).__name__}: {err})"

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 4) -> float:
        """LPIPS between two RGB images (3, H, W) in [0, 1] (lower is better), with the border cropped."""
        if self.model is None:
            raise RuntimeError(f"LPIPS is unavailable: {self.reason}.")
        device = next(self.model.parameters()).device
        a = _crop(sr.float(), crop_border)[None].to(device) * 2 - 1
        b = _crop(hr.float(), crop_border)[None].to(device) * 2 - 1
        return self.model(a, b).item()
