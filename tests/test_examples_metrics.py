"""examples/sr_kit/metrics.py and examples/evaluate.py: known answers and an end-to-end table."""

from __future__ import annotations

import csv
import math
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from examples_helpers import one_thread, photo_crops, write_images  # noqa: F401  (autouse fixture)
from safetensors.torch import save_file
from sr_kit import data as D
from sr_kit.metrics import load_lpips, psnr_y, ssim_y


def test_identical_images():
    img = D.to_tensor(photo_crops(1, 64)[0])
    assert psnr_y(img, img) == math.inf
    assert ssim_y(img, img) == pytest.approx(1.0, abs=1e-12)


def rgb_to_y(img):
    # MATLAB's rgb2ycbcr luma in [16, 235], written out here as the independent reference.
    return 16.0 + (img.double() * torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64).view(3, 1, 1)).sum(0)


def test_uint8_and_float_images_score_alike():
    hr = D.to_tensor(photo_crops(1, 48)[0])
    sr = (hr + 0.03).clamp(0, 1)
    as_uint8 = lambda x: x.mul(255).round().byte()  # noqa: E731
    exact = psnr_y(as_uint8(sr).double() / 255, as_uint8(hr).double() / 255)
    assert psnr_y(as_uint8(sr), as_uint8(hr)) == exact and ssim_y(as_uint8(sr), as_uint8(hr)) < 1


def test_psnr_equals_basicsrs_up_to_its_epsilon():
    from basicsr.metrics.psnr_ssim import calculate_psnr_pt

    hr = D.to_tensor(photo_crops(1, 64)[0]).double()
    for noise in (0.1, 0.01, 0.002):
        sr = hr + noise * torch.randn(hr.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        theirs = calculate_psnr_pt(sr[None], hr[None], 4, test_y_channel=True).item()
        mse = 10 ** (-psnr_y(sr, hr) / 10)
        assert theirs == pytest.approx(-10 * math.log10(mse + 1e-8), abs=1e-6)  # ours, but for their +1e-8 in the MSE
    assert calculate_psnr_pt(hr[None], hr[None], 4, test_y_channel=True).item() == pytest.approx(80.0)  # not inf


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


def _ssim_full_2d(sr, hr, crop_border):
    # SSIM as 0.1 computed it: one 11x11 float64 convolution per statistic (the reference for BasicSR's).
    b = crop_border
    y_sr, y_hr = rgb_to_y(sr)[b:-b, b:-b], rgb_to_y(hr)[b:-b, b:-b]
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = torch.outer(g / g.sum(), g / g.sum()).view(1, 1, 11, 11)
    x, y = y_sr[None, None], y_hr[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x, var_y = F.conv2d(x * x, window) - mu_x**2, F.conv2d(y * y, window) - mu_y**2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    return (((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))).mean().item()


@pytest.mark.parametrize("size", [(64, 64), (45, 70)])
def test_basicsrs_ssim_equals_the_full_2d_convolution(size):
    gen = torch.Generator().manual_seed(1)
    photo = D.to_tensor(photo_crops(1, max(size))[0])[:, : size[0], : size[1]]
    cases = [
        (photo, (photo + 0.05 * torch.randn(photo.shape, generator=gen)).clamp(0, 1)),  # noise
        (photo, photo.flip(-1)),  # unrelated structure
        (torch.rand(3, *size, generator=gen), torch.rand(3, *size, generator=gen)),
        (photo, (photo * 0.7 + 0.1).round_(decimals=2)),  # contrast and levels
    ]
    for sr, hr in cases:
        reference = _ssim_full_2d(sr, hr, 4)
        assert ssim_y(sr, hr, 4) == pytest.approx(reference, rel=0, abs=1e-13)
    assert len({round(_ssim_full_2d(sr, hr, 4), 6) for sr, hr in cases}) == len(cases)  # the cases differ


def test_shape_mismatch_and_tiny_images_are_errors():
    with pytest.raises(ValueError, match="of one shape"):
        psnr_y(torch.rand(3, 16, 16), torch.rand(3, 16, 18))
    with pytest.raises(ValueError, match="too small"):
        psnr_y(torch.rand(3, 8, 8), torch.rand(3, 8, 8), crop_border=4)


def test_lpips_reports_why_it_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # the package is not installed
    assert load_lpips() == (None, "the lpips package is not installed (pip install lpips)")
    broken = types.SimpleNamespace(LPIPS=lambda **kwargs: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setitem(sys.modules, "lpips", broken)  # installed, but its AlexNet weights cannot be downloaded
    assert load_lpips() == (None, "its AlexNet weights could not be loaded (OSError: offline)")


def test_evaluate_writes_the_table_beside_the_papers(tmp_path):
    import evaluate
    from sr_kit.models import build_generator

    hr_dir = tmp_path / "Set5" / "HR"
    write_images(hr_dir, photo_crops(2, 64), names=["baby", "bird"])
    model = tmp_path / "tiny_rrdb.safetensors"
    save_file(build_generator(num_feat=8, num_blocks=1).state_dict(), model)
    code = evaluate.main(["--hr-dir", str(hr_dir), "--model", str(model), "--out", str(tmp_path / "eval"),
                          "--no-lpips", "--no-progress"])  # fmt: skip
    assert code == 0
    assert "Table 1 has no rows for this folder; pass --dataset" in (tmp_path / "eval" / "results.md").read_text()
    code = evaluate.main(["--hr-dir", str(hr_dir), "--model", str(model), "--out", str(tmp_path / "eval"),
                          "--dataset", "Set5", "--no-lpips", "--no-progress"])  # fmt: skip
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


def _evaluate(tmp_path, *args):
    import evaluate

    return evaluate.main([*args, "--out", str(tmp_path / "eval"), "--no-lpips", "--no-progress"])


def test_evaluate_reads_model_files_under_the_trust_rule(tmp_path, capsys, old_torch):
    from sr_kit.models import build_generator

    hr = str(write_images(tmp_path / "HR", photo_crops(1, 48), names=["a"])[0].parent)
    torch.save({"params": build_generator(num_feat=8, num_blocks=1).state_dict()}, tmp_path / "g.pth")
    assert _evaluate(tmp_path, "--hr-dir", hr, "--model", str(tmp_path / "g.pth")) == 2
    err = capsys.readouterr().err
    assert "g.pth'" in err and "torch 2.5.1" in err and "On this command line: add --trust-pickle." in err
    assert _evaluate(tmp_path, "--hr-dir", hr, "--model", str(tmp_path / "g.pth"), "--trust-pickle") == 0
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")  # not a state dict: an error naming it, no traceback
    assert _evaluate(tmp_path, "--hr-dir", hr, "--model", str(tmp_path / "tensor.pth"), "--trust-pickle") == 2
    assert "tensor.pth holds a Tensor, not a generator's weights" in capsys.readouterr().err
    with warnings.catch_warnings():  # torch.jit is deprecated; such archives are still out there
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 1)), tmp_path / "g.pt")
    assert _evaluate(tmp_path, "--hr-dir", hr, "--model", str(tmp_path / "g.pt")) == 2  # spandrel would run its code
    assert "TorchScript" in capsys.readouterr().err


def test_evaluate_crops_hr_to_a_multiple_of_the_scale_and_says_so(tmp_path, capsys):
    write_images(tmp_path / "HR", [photo_crops(1, 70)[0][:66], photo_crops(1, 48)[0]], names=["odd", "even"])
    assert _evaluate(tmp_path, "--hr-dir", str(tmp_path / "HR")) == 0
    err = capsys.readouterr().err
    assert "1 HR image(s) cropped at the right / bottom to a multiple of x4: odd.png 70x66 -> 68x64" in err
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "HR images cropped at the right / bottom to a multiple of 4 (1 of 2 needed it)" in table
    # The bicubic row is the MATLAB round trip of the cropped image.
    hr = D.to_tensor(D.read_image(tmp_path / "HR" / "odd.png"))[:, :64, :68]
    sr = D.matlab_imresize(D.bicubic_downsample(hr, 4), (64, 68), quantize=True)
    row = next(r for r in csv.DictReader(open(tmp_path / "eval" / "per_image.csv")) if r["image"] == "odd.png")
    assert float(row["psnr_y"]) == pytest.approx(psnr_y(sr, hr, 4), abs=1e-9)


def test_evaluate_reads_one_folder_level_of_the_authors_layout(tmp_path, capsys):
    root = tmp_path / "Set5"
    images = photo_crops(2, 64)
    write_images(root / "HR", images, names=["baby", "bird"])
    lr = [D.to_uint8(D.bicubic_downsample(D.to_tensor(im), 4)) for im in images]
    write_images(root / "LR_bicubic" / "X4", lr, names=["babyx4", "birdx4"])
    assert _evaluate(tmp_path, "--hr-dir", str(root)) == 2  # never the LR images as ground truth
    err = capsys.readouterr().err
    assert "contains no image" in err and "at its top level (subfolders are not read" in err
    assert "['HR/baby.png', 'HR/bird.png', 'LR_bicubic/X4/babyx4.png'" in err
    assert _evaluate(tmp_path, "--hr-dir", str(root / "HR")) == 0
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_image.csv")))
    assert [r["image"] for r in rows] == ["baby.png", "bird.png"]
    # A top-level image with subfolders beside it: the subfolders are named in the table, not read.
    write_images(root, images[:1], names=["stray"])
    assert _evaluate(tmp_path, "--hr-dir", str(root)) == 0
    assert len(list(csv.DictReader(open(tmp_path / "eval" / "per_image.csv")))) == 1
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "Subfolders of --hr-dir are not read: HR/, LR_bicubic/." in table


def test_evaluate_refuses_two_hr_files_with_one_name(tmp_path, capsys):
    paths = write_images(tmp_path / "HR", photo_crops(2, 48), names=["baby", "bird"])
    (tmp_path / "HR" / "Baby.bmp").write_bytes(paths[0].read_bytes())
    assert _evaluate(tmp_path, "--hr-dir", str(tmp_path / "HR")) == 2
    assert "differ only in their extension: ['Baby.bmp', 'baby.png']" in capsys.readouterr().err


def test_help_shows_each_default_once():
    import evaluate

    parser = evaluate.build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    assert "(default: 4)" in " ".join(text.split())
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            assert formatter._expand_help(action).count("default") <= 1, action.option_strings


@pytest.mark.parametrize("value", ["0", "-4", "x4", "2.5"])
def test_bad_scale_is_a_clear_error(value, capsys):
    import evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--hr-dir", ".", "--scale", value])
    assert exit_info.value.code == 2
    assert "argument --scale: expected a positive integer" in capsys.readouterr().err


def test_bad_arguments_are_clear_errors(tmp_path, capsys):

    write_images(tmp_path / "HR", photo_crops(1, 48), names=["a"])
    hr = str(tmp_path / "HR")
    assert _evaluate(tmp_path, "--hr-dir", hr, "--scale", "20") == 2
    assert "a.png is 48x48 px: too small to score at x20" in capsys.readouterr().err
    assert _evaluate(tmp_path, "--hr-dir", hr, "--device", "gpu") == 2
    assert "--device 'gpu' cannot be used" in capsys.readouterr().err
    model = tmp_path / "m.pth"
    model.write_bytes(b"x")
    assert _evaluate(tmp_path, "--hr-dir", hr, "--model", str(model), "--model", str(model)) == 2
    assert f"[{str(model)!r}] given more than once" in capsys.readouterr().err
    (tmp_path / "Bicubic.pth").write_bytes(b"x")
    assert _evaluate(tmp_path, "--hr-dir", hr, "--model", str(tmp_path / "Bicubic.pth")) == 2
    assert "would be named Bicubic, as the baseline row" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    code = evaluate_main(["--hr-dir", hr, "--out", str(tmp_path / "file"), "--no-lpips", "--no-progress"])
    assert code == 2 and "Cannot create the output folder --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(["--hr-dir", hr, "--dataset", "Set6"])
    assert _evaluate(tmp_path, "--hr-dir", str(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err
    assert "The HR folder (--hr-dir)" in err and "does not exist" in err


def test_a_failed_write_still_shows_the_results_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    import errno
    import os

    write_images(tmp_path / "HR", photo_crops(1, 48), names=["a"])
    assert _evaluate(tmp_path, "--hr-dir", str(tmp_path / "HR")) == 0
    before = (tmp_path / "eval" / "results.md").read_text()
    capsys.readouterr()

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    (tmp_path / "HR" / "a.png").unlink()
    write_images(tmp_path / "HR", photo_crops(2, 48)[1:], names=["a"])  # other results, which cannot be written
    assert _evaluate(tmp_path, "--hr-dir", str(tmp_path / "HR")) == 2
    captured = capsys.readouterr()
    assert "No space left on device" in captured.err and "| Bicubic | n/a |" in captured.out
    assert captured.out.split("| Bicubic |")[1].split("\n")[0] not in before  # the new scores were shown
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["per_image.csv", "results.csv", "results.md"]
    assert (tmp_path / "eval" / "results.md").read_text() == before  # the previous results, whole


def evaluate_main(argv):
    import evaluate

    return evaluate.main(argv)


def test_evaluate_row_names_stay_distinct():
    import evaluate

    assert evaluate.labels(["runs/a/generator_final.pth", "runs/b/generator_final.pth"]) == [
        "a/generator_final",
        "b/generator_final",
    ]
    assert evaluate.labels(["RRDB_ESRGAN_x4.pth"]) == ["RRDB_ESRGAN_x4"]
    assert evaluate.labels(["a/m.pth", "b/c/m.pth"]) == ["a/m", "c/m"]
    with pytest.raises(evaluate.sr_data.DataError, match=r"differ only in their extension"):
        evaluate.labels(["runs/m.pth", "runs/m.safetensors"])  # one file name each, not "given more than once"
