"""Tests for idm.data: image files, folders, patch sampling, sample images and phantoms."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from idm.data import (
    ImageFolder,
    RandomPatches,
    check_image,
    dihedral,
    load_image,
    load_volume,
    load_volumes,
    random_ellipses,
    sample_images,
    save_image,
    shepp_logan,
)
from idm.errors import IDMError


def gray8(height: int = 20, width: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)


# --- load_image / save_image ---------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff", ".PNG"])
def test_lossless_formats_round_trip_8bit_exactly(tmp_path, suffix):
    pixels = gray8()
    x = torch.from_numpy(pixels.astype(np.float32) / 255)[None]
    path = save_image(tmp_path / f"img{suffix}", x)
    y = load_image(path)
    assert y.shape == (1, 20, 30) and y.dtype == torch.float32
    assert torch.equal(y, x)


def test_jpeg_round_trip_is_close(tmp_path):
    smooth = torch.linspace(0, 1, 64)[None, :].repeat(64, 1)[None]
    y = load_image(save_image(tmp_path / "smooth.jpg", smooth))
    assert y.shape == (1, 64, 64)
    assert (y - smooth).abs().max() < 0.05


def test_rgb_is_reduced_to_bt601_luminance(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((10, 12), 7, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    expected = np.round(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]) / 255
    for name in ("rgb.png", "rgba.png"):
        y = load_image(tmp_path / name)
        np.testing.assert_allclose(y[0].numpy(), expected, atol=1e-6)


def test_pure_colours_give_their_luma_weights(tmp_path):
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 0, 0] = rgb[0, 1, 1] = rgb[0, 2, 2] = 255
    Image.fromarray(rgb, "RGB").save(tmp_path / "primaries.bmp")
    y = load_image(tmp_path / "primaries.bmp")[0, 0]
    np.testing.assert_allclose(y.numpy(), np.round([76.245, 149.685, 29.07]) / 255, atol=1e-6)


@pytest.mark.parametrize("mode", ["1", "P", "LA", "L"])
def test_other_pillow_modes_match_their_rgb_luminance(tmp_path, mode):
    rgb = np.random.default_rng(5).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(rgb, "RGB").convert(mode)
    image.save(tmp_path / "m.png")
    expected = np.asarray(image.convert("RGB")).astype(np.float64) @ [0.299, 0.587, 0.114]
    np.testing.assert_allclose(load_image(tmp_path / "m.png")[0].numpy(), np.round(expected) / 255, atol=1e-6)


def test_16bit_gray_png_and_tif_are_scaled_by_65535(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 65536, size=(9, 11), dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "g16.png")
    tifffile.imwrite(tmp_path / "g16.tif", pixels)
    for name in ("g16.png", "g16.tif"):
        y = load_image(tmp_path / name)
        np.testing.assert_allclose(y[0].numpy(), pixels / 65535, atol=1e-7)


def test_16bit_rgb_tif_keeps_16bit_precision(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 65536, size=(8, 6, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb, photometric="rgb")
    expected = np.round(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]) / 65535
    np.testing.assert_allclose(load_image(tmp_path / "rgb16.tif")[0].numpy(), expected, atol=1e-7)


def test_float_tif_in_unit_range_is_read_as_is(tmp_path):
    values = np.random.default_rng(4).random((5, 7)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", values)
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[0].numpy(), values)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_tif_is_rejected(tmp_path, bad):
    values = np.zeros((5, 7), np.float32)
    values[2, 3] = bad
    tifffile.imwrite(tmp_path / "bad.tif", values)
    with pytest.raises(IDMError, match="bad.tif.*NaN or infinite"):
        load_image(tmp_path / "bad.tif")


def test_float_tif_out_of_range_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "big.tif", np.full((4, 4), 200.0, np.float32))
    with pytest.raises(IDMError, match=r"big.tif.*\[0, 1\]"):
        load_image(tmp_path / "big.tif")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_missing_unsupported_and_corrupt_files(tmp_path):
    with pytest.raises(IDMError, match="image not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    with pytest.raises(IDMError, match="unsupported image format '.gif'"):
        load_image(tmp_path / "anim.gif")
    (tmp_path / "text.png").write_text("this is not an image")
    with pytest.raises(IDMError, match="cannot read image .*text.png"):
        load_image(tmp_path / "text.png")
    save_image(tmp_path / "whole.png", torch.rand(1, 64, 64))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(IDMError, match="cannot read image .*cut.png"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(IDMError, match="cannot read image .*junk.tif"):
        load_image(tmp_path / "junk.tif")


@pytest.mark.filterwarnings("ignore:.*zero-size array")
def test_empty_tif_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros((0, 5), np.uint8))
    with pytest.raises(IDMError, match="image .*empty.tif is empty"):
        load_image(tmp_path / "empty.tif")


def test_save_image_clips_rounds_and_accepts_2d(tmp_path):
    x = torch.tensor([[-0.5, 0.0, 0.6 / 255, 1.6 / 255, 2.0]])
    y = load_image(save_image(tmp_path / "c.png", x))
    np.testing.assert_allclose(y[0, 0].numpy(), np.array([0, 0, 1, 2, 255]) / 255, atol=1e-7)


def test_save_image_rejects_bad_input_and_writes_nothing(tmp_path):
    with pytest.raises(IDMError, match="NaN or inf"):
        save_image(tmp_path / "nan.png", torch.full((1, 4, 4), float("nan")))
    with pytest.raises(IDMError, match="one gray image"):
        save_image(tmp_path / "rgb.png", torch.rand(3, 4, 4))
    with pytest.raises(IDMError, match="unsupported image format"):
        save_image(tmp_path / "x.gif", torch.rand(1, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_save_image_replaces_existing_file_atomically(tmp_path):
    path = tmp_path / "a.png"
    save_image(path, torch.zeros(1, 4, 4))
    save_image(path, torch.ones(1, 4, 4))
    assert torch.equal(load_image(path), torch.ones(1, 4, 4))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


# --- check_image ---------------------------------------------------------------------------
def test_check_image_accepts_valid_images_and_batches():
    x = torch.rand(2, 1, 8, 8)
    assert check_image(x) is x
    check_image(torch.rand(1, 8, 8))
    check_image(torch.full((1, 2, 2), 1.0005))  # within the tolerance


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(8, 8), "shape"),
        (torch.rand(1, 1, 1, 8, 8), "shape"),
        (torch.zeros(1, 8, 8, dtype=torch.uint8), "floating-point"),
        (torch.tensor([[[0.5, float("nan")]]]), "1 NaN"),
        (torch.tensor([[[0.5, float("inf")]]]), "1 inf"),
        (torch.tensor([[[1.5, 0.2]]]), r"\[0, 1\]"),
        (torch.tensor([[[-0.1, 0.2]]]), r"\[0, 1\]"),
        ([[0.5]], "tensor"),
    ],
)
def test_check_image_rejects(x, message):
    with pytest.raises(IDMError, match=message):
        check_image(x)


# --- ImageFolder ---------------------------------------------------------------------------
def test_image_folder_lists_sorted_images_case_insensitively(tmp_path):
    for name in ("b.PNG", "a.png", "c.jpg", "d.TIF"):
        save_image(tmp_path / name, torch.rand(1, 12, 10))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    folder = ImageFolder(tmp_path)
    assert [p.name for p in folder.paths] == ["a.png", "b.PNG", "c.jpg", "d.TIF"]
    assert len(folder) == 4
    name, image = folder[1]
    assert name == "b" and image.shape == (1, 12, 10)
    assert [n for n, _ in folder] == ["a", "b", "c", "d"]
    assert len(ImageFolder(tmp_path, limit=2)) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(IDMError, match="image folder not found"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(IDMError, match="no images"):
        ImageFolder(tmp_path)


# --- RandomPatches -------------------------------------------------------------------------
def test_dihedral_gives_eight_distinct_transforms_and_is_invertible():
    x = torch.arange(9.0).reshape(1, 3, 3)
    outputs = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(outputs) == 8
    for k in range(8):  # each element has an inverse in the group
        assert any(torch.equal(dihedral(dihedral(x, k), j), x) for j in range(8))


def test_random_patches_shape_range_and_determinism():
    images = [torch.rand(1, 20, 24), torch.rand(1, 16, 16)]
    dataset = RandomPatches(images, patch_size=8, length=50, seed=3)
    assert len(dataset) == 50
    patch = dataset[7]
    assert patch.shape == (1, 8, 8) and patch.dtype == torch.float32
    # the same (seed, index) gives the same patch whatever was drawn before, and in a new object
    again = RandomPatches(images, patch_size=8, length=50, seed=3)
    assert torch.equal(again[7], patch)
    assert torch.equal(dataset[7], dataset[-43])
    assert not torch.equal(RandomPatches(images, 8, 50, seed=4)[7], patch)
    with pytest.raises(IndexError):
        dataset[50]


def test_random_patches_are_dihedral_crops_and_use_all_eight_transforms():
    image = torch.rand(1, 12, 12)
    dataset = RandomPatches([image], patch_size=12, length=200, seed=0)  # patch = whole image
    seen = set()
    for index in range(len(dataset)):
        matches = [k for k in range(8) if torch.equal(dataset[index], dihedral(image, k))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))


def test_random_patches_crops_come_from_the_image():
    height, width, p = 30, 40, 5
    image = torch.arange(height * width, dtype=torch.float64).reshape(1, height, width)
    dataset = RandomPatches([image / (height * width)], patch_size=p, length=64, seed=1)
    corners = set()
    for index in range(len(dataset)):
        patch = dataset[index].double() * (height * width)
        found = []
        for k in range(8):  # some transform maps the patch back onto a crop of the image
            candidate = dihedral(patch, k).round()
            top, left = divmod(int(candidate[0, 0, 0]), width)
            if top + p <= height and left + p <= width and torch.equal(candidate, image[:, top : top + p, left : left + p]):
                found.append((top, left))
        assert len(found) == 1
        corners.add(found[0])
    assert len(corners) > 32  # crop positions vary


def test_random_patches_from_folder_and_errors(tmp_path):
    save_image(tmp_path / "a.png", torch.rand(1, 10, 10))
    save_image(tmp_path / "b.png", torch.rand(1, 6, 10))
    with pytest.raises(IDMError, match="b.png of size \\(6, 10\\) is smaller than the patch size 8"):
        RandomPatches(ImageFolder(tmp_path), patch_size=8, length=4)
    assert RandomPatches(ImageFolder(tmp_path), patch_size=6, length=4)[0].shape == (1, 6, 6)
    with pytest.raises(IDMError, match="no images"):
        RandomPatches([], patch_size=4, length=4)
    with pytest.raises(IDMError, match="NaN"):
        RandomPatches([torch.full((1, 8, 8), float("nan"))], patch_size=4, length=4)


def test_random_patches_work_with_a_dataloader():
    dataset = RandomPatches([torch.rand(1, 16, 16)], patch_size=8, length=6, seed=2)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=3))
    assert [b.shape for b in batches] == [(3, 1, 8, 8)] * 2
    assert torch.equal(batches[1][0], dataset[3])


# --- sample images and phantoms ------------------------------------------------------------
def test_sample_images_are_offline_deterministic_8bit_gray():
    images = sample_images(size=64)
    assert len(images) >= 6
    for name, image in images.items():
        assert image.shape == (1, 64, 64) and image.dtype == torch.float32, name
        check_image(image, name)
        assert torch.equal(image, (image * 255).round() / 255)
        assert float(image.std()) > 0.02, name  # a real picture, not a flat field
    again = sample_images(size=64)
    assert all(torch.equal(images[k], again[k]) for k in images)


def test_sample_images_at_native_size_match_the_skimage_luminance():
    import skimage.data

    camera = sample_images(size=512)["camera"]  # camera is 512×512 gray: no resize, no conversion
    assert torch.equal(camera[0], torch.from_numpy(skimage.data.camera()).float() / 255)


def test_phantoms():
    phantom = shepp_logan(64)
    assert phantom.shape == (1, 64, 64)
    check_image(phantom)
    assert float(phantom.max()) > 0.5 and float(phantom[0, 0, 0]) == 0.0
    a, b = random_ellipses(48, n=6, seed=1), random_ellipses(48, n=6, seed=1)
    assert a.shape == (1, 48, 48) and torch.equal(a, b)
    check_image(a)
    assert not torch.equal(a, random_ellipses(48, n=6, seed=2))
    assert len(torch.unique(a)) > 2  # body plus several ellipses


# --- real data (skips without ../shared/data) ----------------------------------------------
def test_real_validation_images_load_as_8bit_gray(shared_data):
    folder = ImageFolder(shared_data / "natural" / "Set12", limit=3)
    for name, image in folder:
        assert image.shape[0] == 1 and image.shape[1] in (256, 512), name
        check_image(image, name)
        assert torch.equal(image, (image * 255).round() / 255), name
    patches = RandomPatches(folder, patch_size=64, length=4, seed=0)
    assert torch.stack([patches[i] for i in range(4)]).shape == (4, 1, 64, 64)


def test_volumes_are_read_from_npy_and_nifti_alike(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    volume = np.linspace(0, 1, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    np.save(tmp_path / "a.npy", volume)
    np.save(tmp_path / "b.npy", volume[::-1].copy())
    x = load_volume(tmp_path / "a.npy")
    assert x.shape == (1, 4, 5, 6) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.from_numpy(volume))
    names, stack = load_volumes(tmp_path)
    assert names == ["a", "b"] and stack.shape == (2, 1, 4, 5, 6)
    assert load_volumes(tmp_path / "a.npy")[1].shape == (1, 1, 4, 5, 6)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "c.nii.gz")
    assert load_volume(tmp_path / "c.nii.gz").shape[0] == 1 and load_volume(tmp_path / "c.nii.gz").ndim == 4


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 5), np.float32), "not a real 3-D volume"),
    (np.full((2, 3, 4), 2.0, np.float32), "values must lie in [0, 1]"),
    (np.full((2, 3, 4), np.nan, np.float32), "NaN"),
    (np.zeros((2, 3, 4), np.complex64), "not a real 3-D volume"),
])
def test_bad_volumes_are_refused_naming_the_file(tmp_path, array, message):
    np.save(tmp_path / "v.npy", array)
    with pytest.raises(IDMError, match=re.escape(message)) as error:
        load_volume(tmp_path / "v.npy", "moving volume")
    assert "moving volume" in str(error.value) and "v.npy" in str(error.value)


def test_volume_folders_errors(tmp_path):
    with pytest.raises(IDMError, match="not found"):
        load_volumes(tmp_path / "none")
    with pytest.raises(IDMError, match="no .npy volumes"):
        load_volumes(tmp_path)
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((2, 3, 5), np.float32))
    with pytest.raises(IDMError, match="differ in shape"):
        load_volumes(tmp_path)
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(IDMError, match=r"read from \.npy or \.nii"):
        load_volume(tmp_path / "c.txt")
