"""SeD in a bare training loop: a toy x4 generator, L1 + SeD's adversarial loss, crops of one photo.

    python examples/minimal_loop.py                   # CLIP RN50 weights from the Hugging Face Hub (or its cache)
    python examples/minimal_loop.py --random-weights  # offline smoke run: RANDOM semantic weights

The photo comes with scikit-image, which the library itself does not need: install the ``examples``
extra (``pip install ".[examples]"`` from a clone) or ``pip install scikit-image``.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

try:
    from skimage import data
except ImportError as err:
    raise SystemExit(
        "examples/minimal_loop.py takes its photo from scikit-image: pip install scikit-image "
        '(or install the examples extra: pip install ".[examples]").'
    ) from err

from sed_discriminator import SeDAdversary

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--random-weights", action="store_true", help="no CLIP weights: a smoke run, not a result")
args = parser.parse_args()
torch.manual_seed(0)

photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255  # (3, 512, 512) in [0, 1]
generator = nn.Sequential(  # a toy x4 generator; put ESRGAN's RRDBNet here
    nn.Conv2d(3, 64, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(64, 3 * 16, 3, padding=1), nn.PixelShuffle(4)
)
# The adversary owns SeD and the frozen CLIP extractor; weight=0.01 is the paper's GAN weight.
try:
    weights = None if args.random_weights else "default"
    adversary = SeDAdversary("patch", pretrained=weights, loss="vanilla", weight=0.01)
except RuntimeError as err:  # offline and no cached CLIP weights
    raise SystemExit(f"{err}\n\nFor an offline smoke run, add --random-weights.") from err
opt_g = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.9, 0.99))
opt_d = torch.optim.Adam(adversary.discriminator.parameters(), lr=1e-4, betas=(0.9, 0.99))

for step in range(1, args.steps + 1):
    top, left = torch.randint(0, 512 - 64, (2, 4))
    hr = torch.stack([photo[:, t : t + 64, c : c + 64] for t, c in zip(top.tolist(), left.tolist())])  # (4, 3, 64, 64)
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)  # (4, 3, 16, 16)
    sr = generator(lr)

    g_loss = F.l1_loss(sr, hr) + adversary.generator_loss(sr, hr)  # no gradient reaches D here
    opt_g.zero_grad()
    g_loss.backward()
    opt_g.step()

    d_loss = adversary.discriminator_loss(sr, hr)  # BCE(D(hr)) + BCE(D(sr.detach())), same HR semantics
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    print(f"step {step:3d}  G {g_loss.item():.4f}  D {d_loss.item():.4f}")
