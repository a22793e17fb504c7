"""examples/sr_kit/metrics.py and examples/evaluate.py: known answers and an end-to-end table."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from examples_helpers import one_thread, photo_crops, write_images  # noqa: F401  (autouse fixture)
from sr_kit import data as D
from sr_kit.metrics import LPIPSMetric, psnr_y, rgb_to_y, ssim_y


def test_identical_images():
    img = D.to_tensor(photo_crops(1, 64)[0])
    assert psnr_y(img, img) == math.inf
    assert ssim_y(img, img) == pytest.approx(1.0, abs=1e-12)


def test_y_channel_is_bt601_in_16_235():
    black, white = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    assert rgb_to_y(black).unique().item() == pytest.approx(16.0)
    assert rgb_to_y(white).unique().item() == pytest.approx(235.0)
    assert rgb_to_y(torch.full((3, 2, 2), 255, dtype=torch.uint8)).unique().item() == pytest.approx(235.0)


def test_known_offset_gives_the_exact_psnr():
    hr = torch.full((3, 40, 40), 0.5, dtype=torch.float64)
    hr[:, :, :20] = 0.25
    sr = hr + 10 / 255  # every channel +10 levels -> Y moves by 10 * 219 / 255
    expected = 20 * math.log10(255 / (10 * 219 / 255))
    assert psnr_y(sr, hr) == pytest.approx(expected, abs=1e-9)


def test_known_noise_level():
    torch.manual_seed(0)
    hr = torch.full((3, 260, 260), 0.5, dtype=torch.float64)
    sigma_y = 2.0  # Y units; the same noise in R, G, B scales Y by 219 / 255
    noise = torch.randn(1, 260, 260, dtype=torch.float64) * sigma_y / 219
    psnr = psnr_y(hr + noise, hr, crop_border=4)
    assert psnr == pytest.approx(20 * math.log10(255 / sigma_y), abs=0.05)


def test_crop_border_is_ignored():
    hr = torch.rand(3, 32, 32)
    sr = hr.clone()
    sr[:, :4], sr[:, -4:], sr[:, :, :4], sr[:, :, -4:] = 0, 1, 0, 1
    assert psnr_y(sr, hr, crop_border=4) == math.inf
    assert psnr_y(sr, hr, crop_border=0) < 20


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    hr = D.to_tensor(photo_crops(1, 96)[0])
    sr = (hr + 0.05 * torch.randn_like(hr)).clamp(0, 1)
    y_sr, y_hr = rgb_to_y(sr)[4:-4, 4:-4].numpy(), rgb_to_y(hr)[4:-4, 4:-4].numpy()
    reference = structural_similarity(y_sr, y_hr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=255)  # fmt: skip
    assert ssim_y(sr, hr, 4) == pytest.approx(reference, abs=2e-3)  # skimage pads, we keep the valid part


def test_shape_mismatch_and_tiny_images_are_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_y(torch.rand(3, 16, 16), torch.rand(3, 16, 18))
    with pytest.raises(ValueError, match="too small"):
        psnr_y(torch.rand(3, 8, 8), torch.rand(3, 8, 8), crop_border=4)


def test_lpips_reports_why_it_is_missing():
    metric = LPIPSMetric()
    assert metric.available or metric.reason


def test_evaluate_writes_the_table_beside_the_papers(tmp_path):
    import evaluate
    from sr_kit.models import build_generator

    hr_dir = tmp_path / "Set5" / "HR"
    write_images(hr_dir, photo_crops(2, 64), names=["baby", "bird"])
    model = tmp_path / "tiny_rrdb.pth"
    torch.save(build_generator(num_feat=8, num_blocks=1).state_dict(), model)
    code = evaluate.main(["--hr-dir", str(hr_dir), "--model", str(model), "--out", str(tmp_path / "eval"),
                          "--no-lpips", "--no-progress"])  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "eval" / "results.csv")))
    methods = [r["method"] for r in rows]
    assert methods[:2] == ["Bicubic", "tiny_rrdb"] and "RRDB+P+SeD" in methods
    assert next(r for r in rows if r["method"] == "RRDB+P+SeD")["psnr_y"] == "31.22"  # Set5 column of Table 1
    bicubic = next(r for r in rows if r["method"] == "Bicubic")
    assert 20 < float(bicubic["psnr_y"]) < 40 and 0 < float(bicubic["ssim_y"]) <= 1
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| RRDB+U+SeD | 0.069 | 31.73 | 0.880 | paper, Table 1 |" in table
    assert len(list(csv.DictReader(open(tmp_path / "eval" / "per_image.csv")))) == 4


def test_evaluate_checks_lr_sizes(tmp_path, capsys):
    import evaluate

    write_images(tmp_path / "HR", photo_crops(1, 64), names=["a"])
    write_images(tmp_path / "LR", photo_crops(1, 20), names=["a"])
    code = evaluate.main(["--hr-dir", str(tmp_path / "HR"), "--lr-dir", str(tmp_path / "LR"), "--out",
                          str(tmp_path / "eval"), "--no-lpips", "--no-progress"])  # fmt: skip
    assert code == 2 and "a.png is 20x20" in capsys.readouterr().err


def test_evaluate_row_names_stay_distinct():
    import evaluate

    assert evaluate.labels(["runs/a/generator_final.pth", "runs/b/generator_final.pth"]) == [
        "a/generator_final",
        "b/generator_final",
    ]
    assert evaluate.labels(["RRDB_ESRGAN_x4.pth"]) == ["RRDB_ESRGAN_x4"]
