"""The channel-count error names the fix that fits the input (grayscale: repeat it; RGBA: drop the alpha)."""

from __future__ import annotations

import pytest
import torch

from sed_discriminator import SeD


@pytest.mark.parametrize(
    ("channels", "hint"),
    [
        (1, r"Repeat a grayscale image with x\.expand\(-1, 3, -1, -1\)\.$"),
        (4, r"Drop the alpha channel: x\[:, :3\]\.$"),
        (2, r"expects 3 channels, got 2 \(shape \(1, 2, 32, 32\)\)\. $"),
    ],
)
def test_channel_error_hint_fits_the_input(channels: int, hint: str) -> None:
    d = SeD("patch", width=8, semantic_channels=64, head_dim=8)
    with pytest.raises(ValueError, match=hint) as info:
        d(torch.rand(1, channels, 32, 32), torch.rand(1, 64, 2, 2))
    assert ("grayscale" in str(info.value)) == (channels == 1)
