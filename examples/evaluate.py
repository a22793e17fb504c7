#!/usr/bin/env python
"""Evaluate SR generators as the SeD paper does: PSNR / SSIM on Y (border = scale cropped) and LPIPS.

    python examples/evaluate.py --hr-dir Set5/HR --lr-dir Set5/LR_bicubic/X4 \\
        --model runs/rrdb_sed_patch/checkpoints/step_00300000.pt --model RRDB_ESRGAN_x4.pth

Each ``--model`` is a training checkpoint of ``retrofit_esrgan.py`` (its EMA weights when it has
them) or a generator file spandrel loads; ``--sr-dir`` scores images already super-resolved.
Without ``--lr-dir`` the LR inputs are MATLAB-style bicubic of the HR images. The table (Markdown
and CSV) puts the results beside the paper's Table 1 rows for the dataset, with a bicubic row.
Folders are read one level deep, images paired by unique names, HR images cropped to a multiple
of the scale, and every size checked from the file headers before any work.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from sr_kit import checkpoint as ckpt  # noqa: E402
from sr_kit import data as sr_data  # noqa: E402
from sr_kit.cli import DefaultsHelpFormatter, positive_int  # noqa: E402
from sr_kit.dist import pick_device  # noqa: E402
from sr_kit.metrics import SSIM_WINDOW as _SSIM_WINDOW  # noqa: E402
from sr_kit.metrics import load_lpips, psnr_y, ssim_y  # noqa: E402
from sr_kit.models import load_generator_weights, untrusted_here  # noqa: E402

from sed_discriminator.weights import UntrustedFileError, read_checkpoint  # noqa: E402

# The SeD paper's Table 1 (x4): LPIPS, PSNR (Y), SSIM (Y) of each method, per dataset.
_TABLE1_METHODS = ("ESRGAN", "RRDB+P", "RRDB+P+SeD", "RRDB+U", "RRDB+U+SeD")
_TABLE1 = """
Set5       0.076 30.44 0.852  0.070 30.67 0.860  0.064 31.22 0.867  0.072 31.13 0.869  0.069 31.73 0.880
Set14      0.133 26.28 0.699  0.130 26.92 0.724  0.117 27.37 0.736  0.127 27.52 0.739  0.123 27.94 0.757
DIV2K_val  0.115 28.20 0.777  0.111 28.71 0.792  0.094 29.27 0.802  0.110 29.28 0.802  0.102 29.85 0.818
Urban100   0.123 24.37 0.734  0.120 24.86 0.752  0.106 25.93 0.779  0.125 25.61 0.768  0.112 26.20 0.788
Manga109   0.065 28.41 0.859  0.058 28.60 0.872  0.048 29.99 0.888  0.056 29.49 0.882  0.047 30.46 0.897
"""
PAPER_TABLE1: dict[str, dict[str, tuple[float, float, float]]] = {
    name.replace("_", " "): {m: tuple(map(float, values[3 * i : 3 * i + 3])) for i, m in enumerate(_TABLE1_METHODS)}
    for name, *values in (line.split() for line in _TABLE1.strip().splitlines())
}
# Image counts of the usual x4 benchmarks (and DIV2K's splits), to notice an incomplete or mixed folder.
DATASET_SIZES = {
    "Set5": 5, "Set14": 14, "BSD100": 100, "Urban100": 100, "Manga109": 109, "DIV2K val": 100, "DIV2K train": 800,
}  # fmt: skip
_DATASET_HINTS = {
    "set5": "Set5", "set14": "Set14", "bsd100": "BSD100", "bsds100": "BSD100", "b100": "BSD100",
    "urban100": "Urban100", "manga109": "Manga109", "div2k": "DIV2K val",
}  # fmt: skip


def guess_dataset(hr_dir: str) -> str | None:
    """The benchmark named in the HR folder's path (``.../Set5/HR`` -> ``"Set5"``; DIV2K: val unless ``train``)."""
    parts = [p.lower().replace("_", "").replace("-", "") for p in Path(hr_dir).resolve().parts]
    for depth in range(len(parts) - 1, -1, -1):
        key = parts[depth]
        for hint, name in _DATASET_HINTS.items():
            if key.startswith(hint) and not key[len(hint) : len(hint) + 1].isdigit():
                if name == "DIV2K val" and any("train" in part for part in parts[depth:]):
                    return "DIV2K train"
                return name
    return None


def load_model(path: str, scale: int, use_ema: bool = True, trust_pickle: bool = False) -> torch.nn.Module:
    """A generator from a training checkpoint of retrofit_esrgan.py (warning when it trained with random
    extractor / VGG weights) or from a generator weight file, read once by the library's reader."""
    try:
        state = read_checkpoint(path, trust_pickle=trust_pickle)
    except UntrustedFileError as err:
        raise untrusted_here(err) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a generator's weights (a state dict).")
    if state.get("format") != ckpt.FORMAT:
        return load_generator_weights(state, scale, name=path)
    model = load_generator_weights(state["generator"], scale, name=path)
    if use_ema and state.get("ema") is not None:  # torch's AveragedModel: the weights under "module."
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"})
    if state.get("random_weights"):
        print(f"warning: {path} was trained with RANDOM weights for {', '.join(state['random_weights'])} (a smoke "
              "run): its scores say nothing about what SeD achieves.", file=sys.stderr)  # fmt: skip
    return model


def labels(paths: list[str]) -> list[str]:
    """Short distinct row names: the file stem, with parent folders added where stems collide."""
    parts = [Path(p).resolve().with_suffix("").parts for p in paths]
    depth = 1
    while depth < max((len(p) for p in parts), default=1) and len({p[-depth:] for p in parts}) < len(parts):
        depth += 1
    return ["/".join(p[-depth:]) for p in parts]


# fmt: off
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--hr-dir", required=True,
                   help="folder of the HR (ground-truth) images, e.g. Set5/HR or Set5/GTmod12 (not its subfolders)")
    p.add_argument("--lr-dir", help="LR inputs paired by name, e.g. Set5/LR_bicubic/X4 or Set5/LRbicx4 "
                   "(default: MATLAB-style bicubic of the HR images)")
    p.add_argument("--model", action="append", default=[],
                   help="a training checkpoint or generator weights (repeatable)")
    p.add_argument("--sr-dir", action="append", default=[],
                   help="already super-resolved images with the HR file names (repeatable)")
    p.add_argument("--scale", type=positive_int, default=4, help="SR factor; also the border cropped before scoring")
    p.add_argument("--dataset", choices=list(DATASET_SIZES),
                   help="benchmark of --hr-dir, for its Table 1 rows and image count (default: guessed from the path)")
    p.add_argument("--out", default="outputs/eval", help="folder for results.md, results.csv and per_image.csv")
    p.add_argument("--save-sr", action="store_true", help="also write each model's SR images into --out")
    p.add_argument("--no-ema", action="store_true", help="use a checkpoint's raw G weights even when it has an EMA")
    p.add_argument("--trust-pickle", action="store_true", help="read --model files even where a crafted one could run "
                   "code: .pt/.pth on torch < 2.10, TorchScript archives; only files you trust")
    p.add_argument("--no-bicubic", action="store_true", help="leave out the bicubic baseline row")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p
# fmt: on


@dataclass
class ImageSet:
    """The checked files of one evaluation: HR paths, their partners, the HR crops (name, (w, h) -> (w, h))."""

    hr: list[Path]
    lr: list[Path] | None = None
    sr: dict[str, list[Path]] = field(default_factory=dict)
    crops: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def collect_images(args: argparse.Namespace, sr_labels: list[str]) -> ImageSet:
    """List and pair the files (one folder level each) and check every size from the headers (a DataError says why)."""
    scale = args.scale
    hr_paths = sr_data.list_images(args.hr_dir, "HR folder (--hr-dir)", recursive=False)
    sr_data.check_distinct_stems(hr_paths, f"HR folder (--hr-dir) {args.hr_dir!r}")
    images = ImageSet(hr_paths)
    subfolders = sorted(f"{p.name}/" for p in Path(args.hr_dir).iterdir() if p.is_dir() and p.name[0] != ".")
    if subfolders:
        images.notes.append(f"Subfolders of --hr-dir are not read: {', '.join(subfolders[:4])}.")
        print(f"note: {images.notes[-1]}", file=sys.stderr)
    if args.lr_dir:
        images.lr = sr_data.pair_lr_files(hr_paths, args.lr_dir, scale, "LR folder (--lr-dir)")
    for label, folder in zip(sr_labels, args.sr_dir):
        images.sr[label] = sr_data.pair_lr_files(hr_paths, folder, 1, "SR folder (--sr-dir)")

    smallest = 2 * scale + _SSIM_WINDOW
    for index, hr_path in enumerate(hr_paths):
        h, w = sr_data.image_size(hr_path)
        hc, wc = h - h % scale, w - w % scale
        if min(hc, wc) < smallest:
            raise sr_data.DataError(
                f"{hr_path} is {w}x{h} px: too small to score at x{scale}. {scale} px are cropped from each "
                f"side and SSIM needs {_SSIM_WINDOW}x{_SSIM_WINDOW} px left, so an HR image needs at least "
                f"{smallest}x{smallest} px (after cropping to a multiple of {scale}). Remove it or check --scale."
            )
        if (hc, wc) != (h, w):
            images.crops.append((hr_path.name, f"{w}x{h}", f"{wc}x{hc}"))
        if images.lr is not None:
            lh, lw = sr_data.image_size(images.lr[index])
            if (lh, lw) != (hc // scale, wc // scale):
                raise sr_data.DataError(_lr_size_message(images.lr[index], lw, lh, hr_path, w, h, scale))
        for label, paths in images.sr.items():
            sh, sw = sr_data.image_size(paths[index])
            if (sh, sw) != (hc, wc):
                raise sr_data.DataError(
                    f"{paths[index]} ({label}) is {sw}x{sh} but {hr_path} is scored at {wc}x{hc} (its size cropped "
                    f"to a multiple of x{scale}): the SR image must have that size."
                )
    return images


def _lr_size_message(lr_path: Path, lw: int, lh: int, hr_path: Path, w: int, h: int, scale: int) -> str:
    wc, hc = w - w % scale, h - h % scale
    message = (f"{lr_path} is {lw}x{lh} but {hr_path} ({w}x{h}, scored at {wc}x{hc}: cropped to a multiple of {scale}) "
               f"needs an LR image of {wc // scale}x{hc // scale} at x{scale}.")  # fmt: skip
    if (lw * scale, lh * scale) == (w - w % 12, h - h % 12):  # a benchmark pack's LRbicx4, made from GTmod12
        return message + (
            " These LR images fit the HR image cropped to a multiple of 12: pass the GTmod12 folder as --hr-dir."
        )
    return message + (
        f" Take both folders from one benchmark pack: the GTmod12 HR images (cropped to a multiple of "
        f"12) with its LRbicx{scale} LR images, or HR/ with LR_bicubic/X{scale}; or leave out --lr-dir."
    )


def _check_labels(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    sources = args.model + args.sr_dir
    resolved = [str(Path(s).resolve()) for s in sources]
    repeated = sorted({s for s, r in zip(sources, resolved) if resolved.count(r) > 1})
    if repeated:
        raise sr_data.DataError(f"{repeated} given more than once: pass each --model / --sr-dir once.")
    names = labels(sources)
    if "Bicubic" in names:
        raise sr_data.DataError(f"{sources[names.index('Bicubic')]!r} would be named Bicubic, as the baseline row: "
                                "rename it.")  # fmt: skip
    return names[: len(args.model)], names[len(args.model) :]


def evaluate(args: argparse.Namespace) -> list[dict[str, object]]:
    """Score every method on every image; returns the summary rows (also written to ``--out``)."""
    from basicsr.data.transforms import mod_crop
    from tqdm import tqdm

    if not (args.model or args.sr_dir or not args.no_bicubic):
        raise sr_data.DataError("Nothing to evaluate: pass --model, --sr-dir, or leave the bicubic baseline on.")
    model_labels, sr_labels = _check_labels(args)
    images = collect_images(args, sr_labels)
    dataset = args.dataset or guess_dataset(args.hr_dir)
    expected = DATASET_SIZES.get(dataset or "")
    if expected not in (None, len(images.hr)):
        images.notes.append(f"Warning: {dataset} has {expected} images but --hr-dir {args.hr_dir!r} holds "
                            f"{len(images.hr)} (the dataset is named by {'--dataset' if args.dataset else 'its path'}"
                            "): "
                            "check that the folder holds exactly the dataset's HR images, or pass the right --dataset. "
                            "The paper's rows are for the full dataset.")  # fmt: skip
        print(images.notes[-1].replace("Warning:", "warning:"), file=sys.stderr)
    if images.crops:
        shown = ", ".join(f"{name} {a} -> {b}" for name, a, b in images.crops[:5])
        more = f", and {len(images.crops) - 5} more" if len(images.crops) > 5 else ""
        print(f"note: {len(images.crops)} HR image(s) cropped at the right / bottom to a multiple of x{args.scale}: "
              f"{shown}{more}.", file=sys.stderr)  # fmt: skip
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise sr_data.DataError(f"Cannot create the output folder --out {str(out)!r}: {err}.") from err

    try:
        device = pick_device(args.device)
    except (RuntimeError, ValueError) as err:
        message = f"--device {args.device!r} cannot be used ({err}). Use auto, cpu, cuda or cuda:N."
        raise sr_data.DataError(message) from err
    models = {label: load_model(m, args.scale, not args.no_ema, args.trust_pickle).to(device).eval()
              for label, m in zip(model_labels, args.model)}  # fmt: skip
    lpips, why = (None, "") if args.no_lpips else load_lpips(device)
    if why:
        print(f"LPIPS skipped: {why}.", file=sys.stderr)

    methods = (["Bicubic"] if not args.no_bicubic else []) + list(models) + list(images.sr)
    per_image: list[dict[str, object]] = []
    bar = tqdm(total=len(images.hr) * len(methods), unit="img", disable=args.no_progress, file=sys.stderr)
    for index, hr_path in enumerate(images.hr):
        hr = sr_data.to_tensor(mod_crop(sr_data.read_image(hr_path), args.scale))
        lr = (sr_data.to_tensor(sr_data.read_image(images.lr[index])) if images.lr is not None
              else sr_data.bicubic_downsample(hr, args.scale, method="matlab"))  # fmt: skip
        for method in methods:
            bar.set_description(f"{hr_path.name} / {method}")
            if method == "Bicubic":
                sr = sr_data.matlab_imresize(lr, tuple(hr.shape[-2:]), quantize=True)
            elif method in models:
                with torch.no_grad():  # scored as the 8-bit images they would be saved as
                    sr = models[method](lr[None].to(device)).float().cpu()[0].clamp(0, 1).mul(255).round().div(255)
            else:
                sr = sr_data.to_tensor(sr_data.read_image(images.sr[method][index]))
            if sr.shape != hr.shape:
                raise sr_data.DataError(f"{method} gives {tuple(sr.shape)} for {hr_path.name}, expected "
                                        f"{tuple(hr.shape)}.")  # fmt: skip
            per_image.append({"image": hr_path.name, "method": method, "psnr_y": psnr_y(sr, hr, args.scale),
                              "ssim_y": ssim_y(sr, hr, args.scale),
                              "lpips": lpips(sr, hr, args.scale) if lpips is not None else None})  # fmt: skip
            if args.save_sr and method in models:
                folder = out / "sr" / method
                folder.mkdir(parents=True, exist_ok=True)
                sr_data.save_image(sr_data.to_uint8(sr), folder / f"{hr_path.stem}.png")
            bar.update(1)
    bar.close()

    summary: list[dict[str, object]] = []
    for method in methods:
        rows = [r for r in per_image if r["method"] == method]
        means = {k: _mean([r[k] for r in rows]) for k in ("lpips", "psnr_y", "ssim_y")}
        summary.append({"method": method, **means, "source": "this evaluation"})
    for method, (lp, ps, ss) in PAPER_TABLE1.get(dataset, {}).items():
        summary.append({"method": method, "lpips": lp, "psnr_y": ps, "ssim_y": ss, "source": "paper, Table 1"})
    _write_outputs(out, summary, per_image, dataset, args, images)
    return summary


def _mean(values: list[object]) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def _cell(value: object, digits: int) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _write_atomic(path: Path, text: str | list[dict[str, object]]) -> None:
    """``text``, or CSV of the rows ``text``, written whole or not at all."""
    if not isinstance(text, str):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(text[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(text)
        text = buffer.getvalue()
    ckpt.atomic_write(path, lambda handle: handle.write(text.encode()))


def _write_outputs(out: Path, summary, per_image, dataset, args, images: ImageSet) -> None:
    lr_source = f"files of {args.lr_dir}" if args.lr_dir else "MATLAB-style bicubic of the HR images"
    cropped = f"{len(images.crops)} of {len(images.hr)} needed it" if images.crops else "none needed it"
    lines = [
        f"# x{args.scale} results on {dataset or Path(args.hr_dir).name} ({len(images.hr)} images)", "",
        f"PSNR / SSIM on the Y channel with {args.scale} px cropped from each border; LPIPS (AlexNet) on RGB "
        f"with the same crop. LR: {lr_source}. HR images cropped at the right / bottom to a multiple of "
        f"{args.scale} ({cropped}).", "", "| method | LPIPS ↓ | PSNR ↑ | SSIM ↑ | source |", "|---|---|---|---|---|",
        *(f"| {r['method']} | {_cell(r['lpips'], 3)} | {_cell(r['psnr_y'], 2)} | {_cell(r['ssim_y'], 3)} "
          f"| {r['source']} |"
          for r in summary),
    ]  # fmt: skip
    if dataset not in PAPER_TABLE1:
        lines += ["", f"The paper's Table 1 has no rows for {dataset or 'this folder'}; pass --dataset to pick one of "
                  f"{', '.join(PAPER_TABLE1)}."]  # fmt: skip
    lines += ["", *images.notes] if images.notes else []
    text = "\n".join(lines) + "\n"
    print(text)  # first, so that a failed write (a full disk) still shows the results
    _write_atomic(out / "results.md", text)
    _write_atomic(out / "results.csv", summary)
    _write_atomic(out / "per_image.csv", per_image)
    print(f"Written: {out / 'results.md'}, {out / 'results.csv'}, {out / 'per_image.csv'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except (sr_data.DataError, ValueError, OSError, ckpt.CheckpointError) as err:  # a file that vanished, a full disk
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted: results.md and the CSV files are written only when every image is scored.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
