"""examples/sr_kit/data.py: folders and their errors, degradation, crops, augmentation and the resumable order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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


def _dataset_folder(tmp_path, sizes=(48, 48)):
    images = [photo_crops(1, s)[0] for s in sizes]
    return write_images(tmp_path / "hr", images)


def test_unreadable_and_too_small_images_are_named_and_skipped(tmp_path):
    good = _dataset_folder(tmp_path)
    broken = tmp_path / "hr" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    small = write_images(tmp_path / "hr", [photo_crops(1, 16)[0]], names=["tiny"])[0]
    paths = D.list_images(tmp_path / "hr")
    with pytest.warns(UserWarning) as record:
        ds = D.SRTrainDataset(paths, patch_size=32, scale=4)
    message = str(record[0].message)
    assert "broken.png" in message and "tiny.png" in message and "16x16" in message
    assert sorted(ds.hr_paths) == sorted(good)
    with pytest.raises(D.DataError, match="broken.png"):
        D.SRTrainDataset(paths, patch_size=32, scale=4, strict=True)
    expected = r"(?s)No usable training image.*broken\.png \(UnidentifiedImageError\).*tiny\.png \(16x16 px\)"
    with pytest.raises(D.DataError, match=expected):
        D.SRTrainDataset([small, broken], patch_size=32, scale=4)


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


@pytest.mark.parametrize("method", D.DOWNSAMPLERS)
def test_on_the_fly_crop_equals_the_crop_of_the_whole_lr_image(tmp_path, method):
    # The crop is downsampled with a margin, so its LR is exactly that part of the full image's LR.
    path = write_images(tmp_path, photo_crops(1, 120))[0]
    ds = D.SRTrainDataset([path], patch_size=32, scale=4, augment=False, downsample=method)
    full_hr = D.to_tensor(D.read_image(path))
    full_lr = D.bicubic_downsample(full_hr, 4, method=method)
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
    ours = D.bicubic_downsample(x, 4, quantize=False, method="matlab")
    torch_aa = D.bicubic_downsample(x, 4, quantize=False, method="torch")
    torch.testing.assert_close(ours[:, 2:-2, 2:-2], torch_aa[:, 2:-2, 2:-2], atol=1e-5, rtol=0)
    assert (ours - torch_aa).abs().max() > 1e-3  # the border handling differs


def test_lr_is_quantised_to_8_bits_by_default():
    lr = D.bicubic_downsample(torch.rand(3, 32, 32), 4)
    torch.testing.assert_close(lr * 255, (lr * 255).round())


def test_paired_folders_give_aligned_crops(tmp_path):
    hr_images = photo_crops(2, 64)
    hr_paths = write_images(tmp_path / "HR", hr_images, names=["0001", "0002"])
    lr_images = [D.to_uint8(D.bicubic_downsample(D.to_tensor(im), 4)) for im in hr_images]
    write_images(tmp_path / "LR", lr_images, names=["0001x4", "0002x4"])
    lr_paths = D.pair_lr_files(hr_paths, tmp_path / "LR", 4)
    ds = D.SRTrainDataset(hr_paths, patch_size=32, scale=4, lr_paths=lr_paths, augment=False)
    for position in range(6):
        lr, hr = ds[(position % 2, 0, position)]
        inner = (slice(None), slice(2, -2), slice(2, -2))  # away from the crop border
        torch.testing.assert_close(D.bicubic_downsample(hr, 4)[inner], lr[inner], atol=1 / 255 + 1e-6, rtol=0)


def test_missing_lr_partner_and_size_mismatch_are_named(tmp_path):
    hr_paths = write_images(tmp_path / "HR", photo_crops(2, 64), names=["a", "b"])
    write_images(tmp_path / "LR", [photo_crops(1, 16)[0]], names=["a"])
    with pytest.raises(D.DataError, match=r"no LR partner.*'b.png'"):
        D.pair_lr_files(hr_paths, tmp_path / "LR", 4)
    write_images(tmp_path / "LR", [photo_crops(1, 20)[0]], names=["b"])
    lr_paths = D.pair_lr_files(hr_paths, tmp_path / "LR", 4)
    with pytest.warns(UserWarning, match="b.png is 64x64.*is 20x20"):
        D.SRTrainDataset(hr_paths, patch_size=32, scale=4, lr_paths=lr_paths)


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
