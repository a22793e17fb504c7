#!/usr/bin/env python
"""Evaluate SR generators as the SeD paper does: PSNR / SSIM on Y (border = scale cropped) and LPIPS.

    python examples/evaluate.py --hr-dir Set5/HR --dataset Set5 \\
        --model runs/rrdb_sed_patch/checkpoints/step_00300000.pt --model RRDB_ESRGAN_x4.pth

Each ``--model`` is a training checkpoint of ``retrofit_esrgan.py`` (its EMA weights when it has
them) or a generator file spandrel loads. The LR inputs are the MATLAB bicubic of the HR images
(cropped to a multiple of the scale): the benchmarks' LR files, without reading them. The table
(Markdown and CSV) has a bicubic row, and the paper's Table 1 rows for ``--dataset``. The HR folder
is read one level deep, and every size is checked from the file headers before any work.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from sr_kit import checkpoint as ckpt  # noqa: E402
from sr_kit import data as sr_data  # noqa: E402
from sr_kit.cli import DefaultsHelpFormatter, positive_int  # noqa: E402
from sr_kit.dist import pick_device  # noqa: E402
from sr_kit.metrics import SSIM_WINDOW, load_lpips, psnr_y, ssim_y  # noqa: E402
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


# fmt: off
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--hr-dir", required=True,
                   help="folder of the HR (ground-truth) images, e.g. Set5/HR or Set5/GTmod12 (not its subfolders)")
    p.add_argument("--model", action="append", default=[],
                   help="a training checkpoint or generator weights (repeatable)")
    p.add_argument("--scale", type=positive_int, default=4, help="SR factor; also the border cropped before scoring")
    p.add_argument("--dataset", choices=list(PAPER_TABLE1), help="the benchmark --hr-dir holds: puts the paper's "
                   "Table 1 rows for it beside the results (check that the folder holds all of its images)")
    p.add_argument("--out", default="outputs/eval", help="folder for results.md, results.csv and per_image.csv")
    p.add_argument("--save-sr", action="store_true", help="also write each model's SR images into --out")
    p.add_argument("--no-ema", action="store_true", help="use a checkpoint's raw G weights even when it has an EMA")
    p.add_argument("--trust-pickle", action="store_true", help="read --model files even where a crafted one could run "
                   "code: .pt/.pth on torch < 2.10, TorchScript archives; only files you trust")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p
# fmt: on


def collect_images(args: argparse.Namespace) -> tuple[list[Path], list[str], list[str]]:
    """``(HR files, crops, notes)``: the HR folder's images (one level), each size checked from its header.

    ``crops`` are ``"name WxH -> W'xH'"`` for the images cropped to a multiple of the scale.
    """
    scale = args.scale
    hr_paths = sr_data.list_images(args.hr_dir, "HR folder (--hr-dir)", recursive=False)
    stems = Counter(p.stem.lower() for p in hr_paths)
    twins = [p.name for p in hr_paths if stems[p.stem.lower()] > 1]
    if twins:
        raise sr_data.DataError(f"The HR folder (--hr-dir) {args.hr_dir!r} has files that differ only in their "
                                f"extension: {twins[:10]}. Keep one file per image (a copy would count twice, and "
                                "--save-sr writes NAME.png).")  # fmt: skip
    crops, notes = [], []
    subfolders = sorted(f"{p.name}/" for p in Path(args.hr_dir).iterdir() if p.is_dir() and p.name[0] != ".")
    if subfolders:
        notes.append(f"Subfolders of --hr-dir are not read: {', '.join(subfolders[:4])}.")
        print(f"note: {notes[-1]}", file=sys.stderr)
    smallest = 2 * scale + SSIM_WINDOW
    for hr_path in hr_paths:
        h, w = sr_data.image_size(hr_path)
        hc, wc = h - h % scale, w - w % scale
        if min(hc, wc) < smallest:
            raise sr_data.DataError(
                f"{hr_path} is {w}x{h} px: too small to score at x{scale}. {scale} px are cropped from each "
                f"side and SSIM needs {SSIM_WINDOW}x{SSIM_WINDOW} px left, so an HR image needs at least "
                f"{smallest}x{smallest} px (after cropping to a multiple of {scale}). Remove it or check --scale."
            )
        if (hc, wc) != (h, w):
            crops.append(f"{hr_path.name} {w}x{h} -> {wc}x{hc}")
    return hr_paths, crops, notes


def labels(models: list[str]) -> list[str]:
    """Short distinct row names: the file stem, with parent folders added where stems collide."""
    resolved = [Path(m).resolve() for m in models]
    repeated = sorted({m for m, r in zip(models, resolved) if resolved.count(r) > 1})
    if repeated:
        raise sr_data.DataError(f"{repeated} given more than once: pass each --model once.")
    parts = [r.with_suffix("").parts for r in resolved]
    depths = [d for d in range(1, max(map(len, parts), default=1) + 1) if len({p[-d:] for p in parts}) == len(parts)]
    if not depths:
        raise sr_data.DataError(f"Two of {models} differ only in their extension: rename one (rows are named by it).")
    names = ["/".join(p[-depths[0] :]) for p in parts]
    if "Bicubic" in names:
        raise sr_data.DataError(f"{models[names.index('Bicubic')]!r} would be named Bicubic, as the baseline row: "
                                "rename it.")  # fmt: skip
    return names


def evaluate(args: argparse.Namespace) -> list[dict[str, object]]:
    """Score every method on every image; returns the summary rows (also written to ``--out``)."""
    from basicsr.data.transforms import mod_crop
    from tqdm import tqdm

    model_labels = labels(args.model)
    hr_paths, crops, notes = collect_images(args)
    if crops:
        more = f", and {len(crops) - 5} more" if len(crops) > 5 else ""
        print(f"note: {len(crops)} HR image(s) cropped at the right / bottom to a multiple of x{args.scale}: "
              f"{', '.join(crops[:5])}{more}.", file=sys.stderr)  # fmt: skip
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

    methods = ["Bicubic", *models]
    per_image: list[dict[str, object]] = []
    bar = tqdm(total=len(hr_paths) * len(methods), unit="img", disable=args.no_progress, file=sys.stderr)
    for hr_path in hr_paths:
        hr = sr_data.to_tensor(mod_crop(sr_data.read_image(hr_path), args.scale))
        lr = sr_data.bicubic_downsample(hr, args.scale)
        for method in methods:
            bar.set_description(f"{hr_path.name} / {method}")
            if method == "Bicubic":
                sr = sr_data.matlab_imresize(lr, tuple(hr.shape[-2:]), quantize=True)
            else:
                with torch.no_grad():  # scored as the 8-bit images they would be saved as
                    sr = models[method](lr[None].to(device)).float().cpu()[0].clamp(0, 1).mul(255).round().div(255)
            if sr.shape != hr.shape:
                raise sr_data.DataError(f"{method} gives {tuple(sr.shape)} for {hr_path.name}, expected "
                                        f"{tuple(hr.shape)}.")  # fmt: skip
            per_image.append({"image": hr_path.name, "method": method, "psnr_y": psnr_y(sr, hr, args.scale),
                              "ssim_y": ssim_y(sr, hr, args.scale),
                              "lpips": lpips(sr, hr, args.scale) if lpips is not None else None})  # fmt: skip
            if args.save_sr and method != "Bicubic":
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
    for method, (lp, ps, ss) in PAPER_TABLE1.get(args.dataset, {}).items():
        summary.append({"method": method, "lpips": lp, "psnr_y": ps, "ssim_y": ss, "source": "paper, Table 1"})
    _write_outputs(out, summary, per_image, args, len(hr_paths), crops, notes)
    return summary


def _mean(values: list[object]) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def _cell(value: object, digits: int) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"  # inf prints as "inf"


def _write_outputs(out: Path, summary, per_image, args, count: int, crops: list[str], notes: list[str]) -> None:
    cropped = f"{len(crops)} of {count} needed it" if crops else "none needed it"
    lines = [
        f"# x{args.scale} results on {args.dataset or Path(args.hr_dir).name} ({count} images)", "",
        f"PSNR / SSIM on the Y channel with {args.scale} px cropped from each border; LPIPS (AlexNet) on RGB "
        f"with the same crop. LR: MATLAB bicubic of the HR images. HR images cropped at the right / bottom to a "
        f"multiple of {args.scale} ({cropped}).", "", "| method | LPIPS ↓ | PSNR ↑ | SSIM ↑ | source |",
        "|---|---|---|---|---|",
        *(f"| {r['method']} | {_cell(r['lpips'], 3)} | {_cell(r['psnr_y'], 2)} | {_cell(r['ssim_y'], 3)} "
          f"| {r['source']} |"
          for r in summary),
    ]  # fmt: skip
    if args.dataset is None:
        lines += ["", f"The paper's Table 1 has no rows for this folder; pass --dataset to pick one of "
                  f"{', '.join(PAPER_TABLE1)}."]  # fmt: skip
    lines += ["", *notes] if notes else []
    text = "\n".join(lines) + "\n"
    print(text)  # first, so that a failed write (a full disk) still shows the results
    ckpt.atomic_write(out / "results.md", lambda handle: handle.write(text.encode()))
    ckpt.atomic_write_csv(out / "results.csv", summary, list(summary[0]))
    ckpt.atomic_write_csv(out / "per_image.csv", per_image, list(per_image[0]))
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
