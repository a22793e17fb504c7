#!/usr/bin/env python
"""Evaluate SR generators as the SeD paper does: PSNR / SSIM on Y (border = scale cropped) and LPIPS.

    python examples/evaluate.py --hr-dir Set5/HR --lr-dir Set5/LR_bicubic/X4 \\
        --model runs/rrdb_sed_patch/checkpoints/step_00300000.pt --model RRDB_ESRGAN_x4.pth

Each ``--model`` is a training checkpoint of ``retrofit_esrgan.py`` (its EMA weights when it has
them) or any generator file spandrel loads; ``--sr-dir`` evaluates images already super-resolved.
Without ``--lr-dir`` the LR inputs are made from the HR images with MATLAB-style bicubic (the
degradation of the benchmark LR files). The table (Markdown and CSV) puts the results beside
the paper's Table 1 rows for the same dataset, with a bicubic baseline.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from sr_kit import checkpoint as ckpt  # noqa: E402
from sr_kit import data as sr_data  # noqa: E402
from sr_kit.dist import pick_device  # noqa: E402
from sr_kit.metrics import LPIPSMetric, psnr_y, ssim_y  # noqa: E402
from sr_kit.models import generator_from_state_dict, load_generator_weights  # noqa: E402

# The SeD paper's Table 1 (x4): LPIPS, PSNR (Y), SSIM (Y).
PAPER_TABLE1: dict[str, dict[str, tuple[float, float, float]]] = {
    "Set5": {
        "ESRGAN": (0.076, 30.44, 0.852), "RRDB+P": (0.070, 30.67, 0.860), "RRDB+P+SeD": (0.064, 31.22, 0.867),
        "RRDB+U": (0.072, 31.13, 0.869), "RRDB+U+SeD": (0.069, 31.73, 0.880),
    },
    "Set14": {
        "ESRGAN": (0.133, 26.28, 0.699), "RRDB+P": (0.130, 26.92, 0.724), "RRDB+P+SeD": (0.117, 27.37, 0.736),
        "RRDB+U": (0.127, 27.52, 0.739), "RRDB+U+SeD": (0.123, 27.94, 0.757),
    },
    "DIV2K val": {
        "ESRGAN": (0.115, 28.20, 0.777), "RRDB+P": (0.111, 28.71, 0.792), "RRDB+P+SeD": (0.094, 29.27, 0.802),
        "RRDB+U": (0.110, 29.28, 0.802), "RRDB+U+SeD": (0.102, 29.85, 0.818),
    },
    "Urban100": {
        "ESRGAN": (0.123, 24.37, 0.734), "RRDB+P": (0.120, 24.86, 0.752), "RRDB+P+SeD": (0.106, 25.93, 0.779),
        "RRDB+U": (0.125, 25.61, 0.768), "RRDB+U+SeD": (0.112, 26.20, 0.788),
    },
    "Manga109": {
        "ESRGAN": (0.065, 28.41, 0.859), "RRDB+P": (0.058, 28.60, 0.872), "RRDB+P+SeD": (0.048, 29.99, 0.888),
        "RRDB+U": (0.056, 29.49, 0.882), "RRDB+U+SeD": (0.047, 30.46, 0.897),
    },
}  # fmt: skip
_DATASET_HINTS = {
    "set5": "Set5", "set14": "Set14", "div2k": "DIV2K val", "urban100": "Urban100", "manga109": "Manga109",
}  # fmt: skip


def guess_dataset(hr_dir: str) -> str | None:
    """The Table 1 dataset named in the HR folder's path (``.../Set5/HR`` -> ``"Set5"``)."""
    for part in reversed(Path(hr_dir).resolve().parts):
        key = part.lower().replace("_", "").replace("-", "")
        for hint, name in _DATASET_HINTS.items():
            if key.startswith(hint):
                return name
    return None


def load_model(path: str, scale: int, use_ema: bool = True) -> torch.nn.Module:
    """A generator from a training checkpoint of retrofit_esrgan.py or from a weight file spandrel loads."""
    try:
        state = ckpt.load_checkpoint(path)
    except ckpt.CheckpointError:
        return load_generator_weights(path, scale)
    model = generator_from_state_dict(state["generator"], path, scale)
    if use_ema and state.get("ema") is not None:
        model.load_state_dict(state["ema"]["model"])
    return model


def labels(paths: list[str]) -> list[str]:
    """Short distinct row names: the file stem, with parent folders added where stems collide."""
    parts = [Path(p).resolve().with_suffix("").parts for p in paths]
    depth = 1
    while depth < max((len(p) for p in parts), default=1) and len({p[-depth:] for p in parts}) < len(parts):
        depth += 1
    return ["/".join(p[-depth:]) for p in parts]


def _mod_crop(hr: torch.Tensor, scale: int) -> torch.Tensor:
    h, w = hr.shape[-2:]
    return hr[:, : h - h % scale, : w - w % scale]


def _quantize(img: torch.Tensor) -> torch.Tensor:
    # Results are compared as the 8-bit images they would be saved as.
    return img.clamp(0, 1).mul(255).round().div(255)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--hr-dir", required=True, help="HR (ground-truth) images")
    p.add_argument("--lr-dir", help="LR inputs paired by name (e.g. Set5/LR_bicubic/X4); default: MATLAB bicubic of HR")
    p.add_argument("--model", action="append", default=[],
                   help="a training checkpoint or generator weights (repeatable)")
    p.add_argument("--sr-dir", action="append", default=[],
                   help="already super-resolved images with the HR file names (repeatable)")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--dataset", choices=list(PAPER_TABLE1), help="paper rows to show (default: guessed from --hr-dir)")
    p.add_argument("--out", default="outputs/eval", help="folder for results.md, results.csv and per_image.csv")
    p.add_argument("--save-sr", action="store_true", help="also write each model's SR images into --out")
    p.add_argument("--no-ema", action="store_true", help="use a checkpoint's raw G weights even when it has an EMA")
    p.add_argument("--no-bicubic", action="store_true", help="leave out the bicubic baseline row")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p


def evaluate(args: argparse.Namespace) -> list[dict[str, object]]:
    """Score every method on every image; returns the summary rows (also written to ``--out``)."""
    from tqdm import tqdm

    device = pick_device(args.device)
    hr_paths = sr_data.list_images(args.hr_dir, "HR folder (--hr-dir)")
    lr_paths = sr_data.pair_lr_files(hr_paths, args.lr_dir, args.scale) if args.lr_dir else None
    sr_dirs = {label: sr_data.pair_lr_files(hr_paths, d, 1) for label, d in zip(labels(args.sr_dir), args.sr_dir)}
    models = {
        label: load_model(m, args.scale, not args.no_ema).to(device).eval()
        for label, m in zip(labels(args.model), args.model)
    }
    if not (models or sr_dirs or not args.no_bicubic):
        raise sr_data.DataError("Nothing to evaluate: pass --model, --sr-dir, or leave the bicubic baseline on.")
    lpips = None if args.no_lpips else LPIPSMetric(device)
    if lpips is not None and not lpips.available:
        print(f"LPIPS skipped: {lpips.reason}.", file=sys.stderr)
        lpips = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    methods = (["Bicubic"] if not args.no_bicubic else []) + list(models) + list(sr_dirs)
    per_image: list[dict[str, object]] = []
    bar = tqdm(total=len(hr_paths) * len(methods), unit="img", disable=args.no_progress, file=sys.stderr)
    for index, hr_path in enumerate(hr_paths):
        hr = _mod_crop(sr_data.to_tensor(sr_data.read_image(hr_path)), args.scale)
        if lr_paths is not None:
            lr = sr_data.to_tensor(sr_data.read_image(lr_paths[index]))
            if tuple(lr.shape[-2:]) != (hr.shape[-2] // args.scale, hr.shape[-1] // args.scale):
                raise sr_data.DataError(
                    f"{lr_paths[index]} is {lr.shape[-1]}x{lr.shape[-2]} but {hr_path} needs an LR of "
                    f"{hr.shape[-1] // args.scale}x{hr.shape[-2] // args.scale} at x{args.scale}."
                )
        else:
            lr = sr_data.bicubic_downsample(hr, args.scale, method="matlab")
        for method in methods:
            bar.set_description(f"{hr_path.name} / {method}")
            if method == "Bicubic":
                sr = sr_data.matlab_imresize(lr, tuple(hr.shape[-2:]))
            elif method in models:
                with torch.no_grad():
                    sr = models[method](lr[None].to(device)).float().cpu()[0]
            else:
                sr = sr_data.to_tensor(sr_data.read_image(sr_dirs[method][index]))
            sr = _quantize(sr)
            if sr.shape != hr.shape:
                raise sr_data.DataError(
                    f"{method} gives {tuple(sr.shape)} for {hr_path.name}, expected {tuple(hr.shape)}."
                )
            row: dict[str, object] = {
                "image": hr_path.name,
                "method": method,
                "psnr_y": psnr_y(sr, hr, args.scale),
                "ssim_y": ssim_y(sr, hr, args.scale),
                "lpips": lpips(sr, hr, args.scale) if lpips is not None else None,
            }
            per_image.append(row)
            if args.save_sr and method in models:
                folder = out / "sr" / method
                folder.mkdir(parents=True, exist_ok=True)
                sr_data.save_image(sr_data.to_uint8(sr), folder / f"{hr_path.stem}.png")
            bar.update(1)
    bar.close()

    summary = []
    for method in methods:
        rows = [r for r in per_image if r["method"] == method]
        summary.append({
            "method": method,
            "lpips": _mean([r["lpips"] for r in rows]),
            "psnr_y": _mean([r["psnr_y"] for r in rows]),
            "ssim_y": _mean([r["ssim_y"] for r in rows]),
            "source": "this evaluation",
        })  # fmt: skip
    dataset = args.dataset or guess_dataset(args.hr_dir)
    for method, (lp, ps, ss) in PAPER_TABLE1.get(dataset, {}).items():
        summary.append({"method": method, "lpips": lp, "psnr_y": ps, "ssim_y": ss, "source": "paper, Table 1"})
    _write_outputs(out, summary, per_image, dataset, args, len(hr_paths))
    return summary


def _mean(values: list[object]) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def _cell(value: object, digits: int) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _write_outputs(out: Path, summary, per_image, dataset, args, count: int) -> None:
    lr_source = f"files of {args.lr_dir}" if args.lr_dir else "MATLAB-style bicubic of the HR images"
    lines = [
        f"# x{args.scale} results on {dataset or Path(args.hr_dir).name} ({count} images)",
        "",
        f"PSNR / SSIM on the Y channel with {args.scale} px cropped from each border; LPIPS (AlexNet) on RGB "
        f"with the same crop. LR: {lr_source}.",
        "",
        "| method | LPIPS ↓ | PSNR ↑ | SSIM ↑ | source |",
        "|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['method']} | {_cell(row['lpips'], 3)} | {_cell(row['psnr_y'], 2)} | {_cell(row['ssim_y'], 3)} "
            f"| {row['source']} |"
        )
    if dataset is None:
        lines += ["", "The paper's Table 1 has no rows for this folder; pass --dataset to pick one of "
                  f"{', '.join(PAPER_TABLE1)}."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "lpips", "psnr_y", "ssim_y", "source"])
        writer.writeheader()
        writer.writerows(summary)
    with open(out / "per_image.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "method", "psnr_y", "ssim_y", "lpips"])
        writer.writeheader()
        writer.writerows(per_image)
    print(text)
    print(f"Written: {out / 'results.md'}, {out / 'results.csv'}, {out / 'per_image.csv'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except (sr_data.DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
