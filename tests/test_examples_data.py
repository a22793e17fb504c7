"""examples/sr_kit/data.py: folders and their errors, degradation, crops, augmentation and the resumable order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from examples_helpers import one_thread, photo_crops, write_images  # noqa: F401  (autouse fixture)
from sr_kit import data as D

# ----------------------------------------------------------------------------------- folders


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(D.DataError, match=r"does not exist.*Check the path"):
        D.list_images(tmp_path / "nope")


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(D.DataError, match=r"contains no image.*notes\.txt"):
        D.list_images(tmp_path)
    (tmp_path / "notes.txt").unlink()
    with pytest.raises(D.DataError, match="It is empty"):
        D.list_images(tmp_path)


def test_file_instead_of_folder(tmp_path):
    path = write_images(tmp_path, photo_crops(1))[0]
    with pytest.raises(D.DataError, match="is a file, not a folder"):
        D.list_images(path)


def test_one_level_listing_shows_where_the_images_are(tmp_path):
    # The authors' layout: Set5/HR/baby.png and Set5/LR_bicubic/X4/babyx4.png.
    root = tmp_path / "Set5"
    write_images(root / "HR", photo_crops(2, 32), names=["baby", "bird"])
    write_images(root / "LR_bicubic" / "X4", photo_crops(2, 8), names=["babyx4", "birdx4"])
    (root / "HR" / "._baby.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    where = r"\['HR/baby\.png', 'HR/bird\.png', 'LR_bicubic/X4/babyx4\.png'"  # not the hidden ._baby.png
    with pytest.raises(D.DataError, match=r"no image .* at its top level \(subfolders are not read.*" + where):
        D.list_images(root, recursive=False)
    assert [p.name for p in D.list_images(root / "HR", recursive=False)] == ["baby.png", "bird.png"]  # no ._baby
    assert len(D.list_images(root)) == 4  # training folders are still read recursively


def _dataset_folder(tmp_path, sizes=(48, 48)):
    images = [photo_crops(1, s)[0] for s in sizes]
    return write_images(tmp_path / "hr", images)


def test_unreadable_and_too_small_images_are_named_before_training(tmp_path):
    good = _dataset_folder(tmp_path)
    assert sorted(D.SRTrainDataset(D.list_images(tmp_path / "hr"), patch_size=32, scale=4).hr_paths) == sorted(good)
    (tmp_path / "hr" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_images(tmp_path / "hr", [photo_crops(1, 16)[0]], names=["tiny"])
    expected = (
        r"(?s)2 unusable training image\(s\): fix or remove them \(or lower --patch-size, now 32 px\).*"
        r"broken\.png: unreadable \(UnidentifiedImageError\).*tiny\.png: 16x16 px, smaller than the patch"
    )
    with pytest.raises(D.DataError, match=expected):
        D.SRTrainDataset(D.list_images(tmp_path / "hr"), patch_size=32, scale=4)


def test_image_that_breaks_at_decode_time_is_named(tmp_path):
    path = write_images(tmp_path, photo_crops(1, 48))[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data truncated
    with pytest.raises(D.DataError, match=str(path.name)):
        D.read_image(path)


def test_grey_and_rgba_images_become_rgb(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.full((40, 40, 4), 9, np.uint8)).save(tmp_path / "rgba.png")
    assert D.read_image(tmp_path / "grey.png").shape == (40, 40, 3)
    assert D.read_image(tmp_path / "rgba.png")[0, 0].tolist() == [9, 9, 9]


# ------------------------------------------------------------------------------- degradation


def test_on_the_fly_crop_equals_the_crop_of_the_whole_lr_image(tmp_path):
    # The crop is downsampled with a margin, so its LR is exactly that part of the full image's LR.
    path = write_images(tmp_path, photo_crops(1, 120))[0]
    ds = D.SRTrainDataset([path], patch_size=32, scale=4, augment=False)
    full_hr = D.to_tensor(D.read_image(path))
    full_lr = D.bicubic_downsample(full_hr, 4)
    for position in range(12):
        lr, hr = ds[(0, 0, position)]
        assert lr.shape == (3, 8, 8) and hr.shape == (3, 32, 32)
        top, left = _locate(full_hr, hr, step=4)
        expected = full_lr[:, top // 4 : top // 4 + 8, left // 4 : left // 4 + 8]
        torch.testing.assert_close(lr, expected, atol=1 / 255 + 1e-6, rtol=0)  # at most a rounding flip
        assert (lr - expected).abs().gt(1e-6).float().mean() < 0.01


def _locate(image, crop, step):
    size = crop.shape[-1]
    for top in range(0, image.shape[-2] - size + 1, step):
        for left in range(0, image.shape[-1] - size + 1, step):
            if torch.equal(image[:, top : top + size, left : left + size], crop):
                return top, left
    raise AssertionError("crop not found on the scale grid")


def test_matlab_weights_keep_constants_and_match_torch_inside_the_image():
    for in_len, out_len in ((64, 16), (16, 64), (30, 10)):
        m = D.matlab_resize_weights(in_len, out_len)
        torch.testing.assert_close(m.sum(1), torch.ones(out_len, dtype=torch.float64))
    # Same kernel (Keys a = -0.5 widened by the scale): identical away from the border.
    x = torch.rand(3, 64, 64)
    ours = D.bicubic_downsample(x, 4, quantize=False)
    torch_aa = F.interpolate(x[None], size=(16, 16), mode="bicubic", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(ours[:, 2:-2, 2:-2], torch_aa[:, 2:-2, 2:-2], atol=1e-5, rtol=0)
    assert (ours - torch_aa).abs().max() > 1e-3  # the border handling differs


def test_matlab_resize_equals_basicsrs_imresize_to_float32_precision():
    from basicsr.utils.matlab_functions import imresize

    x = D.to_tensor(photo_crops(1, 64)[0])
    for size, factor in (((16, 16), 1 / 4), ((128, 128), 2)):
        theirs = imresize(x, factor)
        torch.testing.assert_close(D.matlab_imresize(x, size), theirs, atol=2e-6, rtol=0)


def test_lr_is_quantised_to_8_bits_by_default():
    lr = D.bicubic_downsample(torch.rand(3, 32, 32), 4)
    torch.testing.assert_close(lr * 255, (lr * 255).round())


def _float32_rounding(x, size):
    # The LR of 0.1: MATLAB's weights in float64, then rounded to 8 bits in float32.
    rows, cols = D.matlab_resize_weights(x.shape[-2], size[0]), D.matlab_resize_weights(x.shape[-1], size[1])
    lr = torch.einsum("ih,...hw,jw->...ij", rows, x.double(), cols).float().clamp(0, 1)
    return lr.mul(255).round().div(255)


def test_matlab_downsampler_rounds_in_float64_where_float32_gets_a_level_wrong():
    from fractions import Fraction

    # Seeded 8-bit images until one has an LR value that float32 rounds to the wrong level. At x4 the
    # weights are dyadic (multiples of 2^-12), so float64 on integer levels is exact (checked below).
    gen, side = torch.Generator().manual_seed(0), 64
    rows = D.matlab_resize_weights(side, 16)
    for _ in range(60):
        levels = torch.randint(0, 256, (256, side, side), generator=gen, dtype=torch.uint8)
        correct_all = torch.floor(torch.einsum("ih,bhw,jw->bij", rows, levels.double(), rows).clamp(0, 255) + 0.5)
        old = (_float32_rounding(levels.float() / 255, (16, 16)) * 255).round().double()
        differ = (old != correct_all).nonzero()
        if len(differ):
            break
    else:
        raise AssertionError("no image found where float32 rounding gets a level wrong")
    b, i, j = differ[0].tolist()
    image = levels[b].numpy()
    rgb = D.to_tensor(np.repeat(image[..., None], 3, axis=2))  # the image as a file would give it

    # The exact value with these float64 weights, in rational arithmetic: within float32 precision of k + 0.5.
    exact = sum(Fraction(rows[i, h].item()) * Fraction(rows[j, w].item()) * int(image[h, w])
                for h in range(side) for w in range(side) if rows[i, h] and rows[j, w])  # fmt: skip
    half = math.floor(exact) + Fraction(1, 2)
    assert 0 < abs(exact - half) < 255 * 2.0**-24
    correct = math.floor(exact + Fraction(1, 2))  # MATLAB: round half away from zero, in float64
    lr = D.bicubic_downsample(rgb, 4)
    assert (lr[:, i, j] * 255).round().tolist() == [correct] * 3
    assert (_float32_rounding(rgb, (16, 16))[:, i, j] * 255).round().tolist() != [correct] * 3
    assert correct == correct_all[b, i, j]
    assert torch.equal((lr[0] * 255).round().double(), correct_all[b])  # every other value is right too


def test_downsampler_refuses_bad_scales_and_tiny_images():
    for scale in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="scale must be a positive integer"):
            D.bicubic_downsample(torch.rand(3, 16, 16), scale)
    with pytest.raises(ValueError, match=r"3x5 px is smaller than the scale x4"):
        D.bicubic_downsample(torch.rand(3, 5, 3), 4)


def test_augmentation_is_the_same_on_lr_and_hr():
    rng = np.random.default_rng(3)
    hr = torch.rand(3, 32, 32)
    lr = D.bicubic_downsample(hr, 4, quantize=False)
    for _ in range(8):
        lr_a, hr_a = D.augment((lr, hr), rng)
        torch.testing.assert_close(D.bicubic_downsample(hr_a, 4, quantize=False), lr_a, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- order


def test_stream_is_resumable_and_shards_without_overlap():
    full = D.SampleStream(10, seed=1)
    it = iter(full)
    first = [next(it) for _ in range(25)]
    resumed = iter(D.SampleStream(10, seed=1, start=13))
    assert [next(resumed) for _ in range(12)] == first[13:]
    epoch0 = sorted(k[0] for k in first[:10])
    assert epoch0 == list(range(10)) and [k[0] for k in first[:10]] != [k[0] for k in first[10:20]]
    shards = [iter(D.SampleStream(7, seed=1, rank=r, world_size=2)) for r in range(2)]
    taken = [[next(s) for _ in range(4)] for s in shards]  # 7 items padded to 8: one epoch
    positions = sorted(k[2] for shard in taken for k in shard)
    assert positions == list(range(8))


def test_samples_do_not_depend_on_worker_processes(tmp_path):
    paths = write_images(tmp_path, photo_crops(3, 48))
    ds = D.SRTrainDataset(paths, patch_size=32, scale=4)
    batches = []
    for workers in (0, 2):
        loader = D.make_loader(ds, D.SampleStream(len(ds), seed=5, start=4), batch_size=2, workers=workers)
        it = iter(loader)
        batches.append([next(it) for _ in range(3)])
        del it
    for (lr0, hr0), (lr1, hr1) in zip(*batches):
        assert torch.equal(lr0, lr1) and torch.equal(hr0, hr1)


def test_demo_photos_are_exported_once(tmp_path):
    train, val = D.export_demo_photos(tmp_path)
    names = sorted(p.stem for p in D.list_images(train))
    assert names == sorted(D.DEMO_TRAIN) and [p.stem for p in D.list_images(val)] == ["chelsea", "rocket"]
    stamp = (train / "astronaut.png").stat().st_mtime_ns
    (train / "chelsea.png").write_bytes((val / "chelsea.png").read_bytes())  # e.g. left by an older demo
    D.export_demo_photos(tmp_path)
    assert (train / "astronaut.png").stat().st_mtime_ns == stamp
    assert not (train / "chelsea.png").exists()
