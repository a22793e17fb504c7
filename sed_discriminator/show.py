"""``python -m sed_discriminator.show``: pictures of SeD's semantics, attention and realness, as PNG files.

Subcommands (each writes one titled, labelled PNG; ``--help`` on each lists its options):

- ``semantics``: an image beside its semantic map (PCA colours) for any extractor preset;
- ``attention``: for each SeFB, where chosen semantic cells look in the image;
- ``realness``: a discriminator's per-pixel verdict on an SR image beside its HR.

Without ``--image`` the photos bundled with scikit-image are used (offline). ``--pretrained none``
and a missing ``--checkpoint`` mean random weights, and the figure says so in red.

Example::

    python -m sed_discriminator.show semantics --extractor dinov2_vits14 --demo chelsea --out chelsea_sem.png
    python -m sed_discriminator.show realness --checkpoint net_d_100000.pth --hr hr.png --sr sr.png --out real.png
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import visualize
from .diagnostics import attention_grids
from .discriminator import SeD
from .extractor import SemanticExtractor
from .weights import load_official_weights

DEMO_IMAGES = ("astronaut", "chelsea", "coffee")


def _progress(message: str) -> None:
    print(f"[sed_discriminator.show] {message}", file=sys.stderr, flush=True)


def _fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (1, 3, H, W) so the longer side is ``size``; both sides multiples of 16 (the extractors' stride)."""
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    new = tuple(max(32, round(n * scale / 16) * 16) for n in (h, w))
    if new == (h, w):
        return image
    return F.interpolate(image, size=new, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def load_image(path: str | None, demo: str, size: int) -> tuple[torch.Tensor, str]:
    """An RGB image as (1, 3, H, W) in [0, 1] and its name: the file at ``path``, else a scikit-image photo."""
    import numpy as np

    if path is not None:
        try:
            from PIL import Image
        except ImportError as err:
            raise ImportError(
                f"Reading images needs Pillow: {visualize.INSTALL_HINT} (or pip install pillow)."
            ) from err
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as err:
            raise ValueError(f"Cannot read image {path!r} ({err}); give a PNG or JPEG file.") from err
        name = os.path.basename(path)
    else:
        try:
            import skimage.data
        except ImportError as err:
            raise ImportError(
                f"The demo photos come from scikit-image, which is not installed: {visualize.INSTALL_HINT} "
                "(or pip install scikit-image), or pass --image PATH."
            ) from err
        array = getattr(skimage.data, demo)()
        name = f"scikit-image {demo}"
    tensor = torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0
    return _fit(tensor, size), name


def _extractor(args: argparse.Namespace) -> tuple[SemanticExtractor, bool]:
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    _progress(f"building extractor {args.extractor!r} (pretrained={pretrained!r})")
    extractor = SemanticExtractor(args.extractor, pretrained=pretrained).to(args.device)
    return extractor, extractor.pretrained is None


def _discriminator(args: argparse.Namespace, channels: int) -> tuple[SeD, bool]:
    model = SeD(args.variant, width=args.width, semantic_channels=channels)
    if args.checkpoint is None:
        _progress(f"SeD({args.variant!r}) with RANDOM weights (no --checkpoint)")
    else:
        _progress(f"loading discriminator weights from {args.checkpoint}")
        load_official_weights(model, args.checkpoint, trust_pickle=args.trust_pickle)
    return model.to(args.device), args.checkpoint is None


def _random_label(**parts: bool) -> str | None:
    names = [name for name, random in parts.items() if random]
    return " and ".join(names) if names else None


def _check_out(args: argparse.Namespace) -> None:
    # Fail before the slow part, not after it.
    if not args.out.lower().endswith(".png"):
        raise SystemExit(f"error: --out must end in .png, got {args.out!r}")
    if os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"error: {args.out} exists; pass --overwrite to replace it")


def cmd_semantics(args: argparse.Namespace) -> str:
    image, name = load_image(args.image, args.demo, args.size)
    extractor, random_ext = _extractor(args)
    _progress(f"semantic map of {name} ({image.shape[-2]} x {image.shape[-1]} px)")
    semantic = extractor(image.to(args.device))
    fig = visualize.plot_semantics(
        image, semantic, extractor_name=args.extractor, random_weights=_random_label(extractor=random_ext)
    )
    return visualize.save_figure(fig, args.out, overwrite=args.overwrite, dpi=args.dpi)


def _points(values: Sequence[str]) -> list[tuple[float, float]]:
    points = []
    for value in values:
        try:
            y, x = (float(v) for v in value.split(","))
        except ValueError:
            raise SystemExit(
                f"error: --points takes 'y,x' fractions of the image size, e.g. 0.3,0.5; got {value!r}"
            ) from None
        points.append((y, x))
    return points


def cmd_attention(args: argparse.Namespace) -> str:
    image, name = load_image(args.image, args.demo, args.size)
    extractor, random_ext = _extractor(args)
    model, random_d = _discriminator(args, extractor.channels)
    image = image.to(args.device)
    _progress(f"cross-attention of every SeFB on {name}")
    grids = attention_grids(model, image, extractor(image))
    fig = visualize.plot_attention(
        image, grids, points=_points(args.points), random_weights=_random_label(extractor=random_ext, D=random_d)
    )
    return visualize.save_figure(fig, args.out, overwrite=args.overwrite, dpi=args.dpi)


def _bicubic_x4(hr: torch.Tensor) -> torch.Tensor:
    h, w = hr.shape[-2:]
    lr = F.interpolate(hr, size=(h // 4, w // 4), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(lr, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def cmd_realness(args: argparse.Namespace) -> str:
    hr, name = load_image(args.hr, args.demo, args.size)
    if args.sr is None:
        sr, sr_label = _bicubic_x4(hr), "Bicubic x4 (SR stand-in)"
    else:
        sr, _ = load_image(args.sr, args.demo, args.size)
        sr_label = f"SR {os.path.basename(args.sr)}"
        if sr.shape != hr.shape:
            raise SystemExit(
                f"error: --sr and --hr must have one size, got {tuple(sr.shape[-2:])} and {tuple(hr.shape[-2:])}"
            )
    extractor, random_ext = _extractor(args)
    model, random_d = _discriminator(args, extractor.channels)
    hr, sr = hr.to(args.device), sr.to(args.device)
    _progress(f"judging {sr_label} and HR {name}")
    semantic = extractor(hr)
    sr_logits, _ = model._inspect(sr, semantic)
    hr_logits, _ = model._inspect(hr, semantic)
    fig = visualize.plot_realness(
        sr, hr, sr_logits, hr_logits, sr_label=sr_label, random_weights=_random_label(extractor=random_ext, D=random_d)
    )
    return visualize.save_figure(fig, args.out, overwrite=args.overwrite, dpi=args.dpi)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sed_discriminator.show",
        description="Pictures of SeD at work, written as PNG (needs matplotlib: " + visualize.INSTALL_HINT + ").",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, image_flag: str = "--image") -> None:
        p.add_argument(image_flag, default=None, help="image file (PNG/JPEG); default: a scikit-image demo photo")
        p.add_argument("--demo", choices=DEMO_IMAGES, default="astronaut", help="demo photo when no image is given")
        p.add_argument("--size", type=int, default=256, help="longer side in pixels (default 256)")
        p.add_argument("--extractor", default="clip_rn50", help="extractor preset (default clip_rn50, the paper's)")
        p.add_argument(
            "--pretrained",
            default="default",
            help="extractor weights: 'default', a tag, a file, or 'none' for random weights (marked in the figure)",
        )
        p.add_argument("--device", default="cpu")
        p.add_argument("--out", required=True, help="PNG file to write")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default 100)")

    def discriminator(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--checkpoint",
            default=None,
            help="D weights: this library's, the authors' or a BasicSR/traiNNer net_d file; default: random weights",
        )
        p.add_argument(
            "--trust-pickle",
            action="store_true",
            help="read a .pt/.pth checkpoint on torch < 2.10 (only a file you trust; safetensors need no flag)",
        )
        p.add_argument("--variant", choices=("pixel", "patch"), default="pixel")
        p.add_argument("--width", type=int, default=64, help="the checkpoint's base width (64, the paper's)")

    p = sub.add_parser("semantics", help="an image and its semantic map as PCA colours")
    common(p)
    p.set_defaults(run=cmd_semantics)
    p = sub.add_parser("attention", help="where semantic cells look in the image, per SeFB")
    common(p)
    discriminator(p)
    p.add_argument(
        "--points",
        nargs="+",
        default=["0.3,0.5", "0.7,0.3", "0.5,0.8"],
        help="semantic cells to show, as y,x fractions of the image size (default: three spread points)",
    )
    p.set_defaults(run=cmd_attention)
    p = sub.add_parser("realness", help="a D's per-pixel verdict on an SR image beside its HR")
    common(p, image_flag="--hr")
    discriminator(p)
    p.add_argument("--sr", default=None, help="SR image of --hr (default: a bicubic x4 stand-in)")
    p.set_defaults(run=cmd_realness)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.size < 32:
        raise SystemExit(f"error: --size must be at least 32 (SeD's smallest input), got {args.size}")
    _check_out(args)
    visualize._matplotlib()  # a missing extra fails now, not after the models ran
    with torch.no_grad():
        path = args.run(args)
    _progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
