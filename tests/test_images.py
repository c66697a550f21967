import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps

import skt.images._decode
from skt.images import (
    ImageDataset,
    Preprocessing,
    as_image_list,
    iter_batches,
    load_image,
    load_image_folder,
    preprocess,
    random_crop_box,
)

from .conftest import require

HALF = Preprocessing(crop_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_uint8_channels_last_array_round_trips(images):
    items = as_image_list(images)
    assert len(items) == 8
    tensor = load_image(items[3], 3)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 40, 48)
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), images[3])


def test_grayscale_stack_becomes_three_equal_channels(rng):
    gray = rng.integers(0, 256, size=(2, 10, 12), dtype=np.uint8)
    tensor = load_image(as_image_list(gray)[1], 1)
    assert tensor.shape == (3, 10, 12)
    for channel in tensor:
        np.testing.assert_array_equal(channel.numpy(), gray[1])


def test_float_array_keeps_values(rng):
    floats = rng.random((3, 9, 9, 1))
    tensor = load_image(as_image_list(floats)[0])
    assert tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor[2].numpy(), floats[0, ..., 0], rtol=1e-6)


def test_uint16_array_is_scaled_to_unit_range():
    pixels = np.full((1, 4, 4), 65535, dtype=np.uint16)
    assert float(load_image(as_image_list(pixels)[0]).max()) == 1.0


def test_nchw_tensor_items_are_channels_first(images):
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    item = load_image(as_image_list(tensor)[5], 5)
    assert torch.equal(item, tensor[5])


def test_rgba_drops_alpha(rng):
    rgba = rng.integers(0, 256, size=(2, 6, 6, 4), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(as_image_list(rgba)[0]).permute(1, 2, 0).numpy(),
                                  rgba[0, ..., :3])


def test_png_file_equals_its_array(image_files, images):
    np.testing.assert_array_equal(load_image(image_files[2], 2).permute(1, 2, 0).numpy(),
                                  images[2])


def test_palette_and_16_bit_files(tmp_path):
    palette = Image.new("P", (5, 5))
    palette.putpalette([255, 0, 0] * 256)
    palette.save(tmp_path / "p.png")
    assert load_image(str(tmp_path / "p.png"))[:, 0, 0].tolist() == [255, 0, 0]

    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    sixteen.save(tmp_path / "16.png")
    loaded = load_image(str(tmp_path / "16.png"))
    assert loaded.dtype == torch.float32 and float(loaded.min()) == 1.0


def test_mixed_list_of_different_sizes_gives_one_batch(images, image_files):
    pil = Image.fromarray(images[0]).resize((70, 20))
    items = as_image_list([image_files[0], pil, images[1][:30], torch.zeros(1, 11, 13)])
    batch = next(iter_batches(items, HALF, batch_size=4, num_workers=0))
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32


def test_preprocess_normalises_by_hand():
    gray = torch.full((3, 20, 30), 128, dtype=torch.uint8)
    out = preprocess(gray, HALF)
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(out.numpy(), (128 / 255 - 0.5) / 0.5, rtol=1e-4)


def test_preprocess_resizes_shorter_side_then_centre_crops():
    config = Preprocessing(crop_size=4, resize_size=8, mean=(0,) * 3, std=(1,) * 3,
                           interpolation="nearest")
    image = torch.zeros(3, 16, 32, dtype=torch.uint8)
    image[:, :, 14:18] = 255  # a vertical bar in the middle survives the crop
    out = preprocess(image, config)
    assert out.shape == (3, 4, 4)
    assert out[0, 0].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_standard_augmentation_is_random_but_shaped():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    first = preprocess(image, HALF, augment="standard")
    second = preprocess(image, HALF, augment="standard")
    assert first.shape == second.shape == (3, 16, 16)
    assert not torch.equal(first, second)


def test_augmentation_follows_its_generator_alone():
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)

    def view(seed):
        return preprocess(image, HALF, "standard", torch.Generator().manual_seed(seed))

    torch.manual_seed(1)
    first = view(7)
    torch.manual_seed(2)  # the global generator plays no part
    torch.testing.assert_close(view(7), first, rtol=0, atol=0)
    assert not torch.equal(view(8), first)


@pytest.mark.parametrize(("height", "width"), [(40, 40), (30, 90), (90, 30)])
def test_random_crop_box_fits_scale_and_ratio(height, width):
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = random_crop_box(height, width, generator)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert 0.25 * height * width * 0.9 <= h * w <= height * width
    # Nothing fits when the scale is impossible: the largest centred crop within the ratio.
    assert random_crop_box(30, 90, generator, scale=(2.0, 2.0)) == (0, 25, 30, 40)
    assert random_crop_box(90, 30, generator, scale=(2.0, 2.0)) == (25, 0, 40, 30)


def test_seeded_augmented_batches_do_not_depend_on_threads(image_files):
    items = as_image_list(image_files)
    seeds = list(range(100, 108))
    runs = [torch.cat(list(iter_batches(items, HALF, 3, workers, augment="standard",
                                        seeds=seeds))) for workers in (0, 2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    plain = torch.cat(list(iter_batches(items, HALF, 3, 0)))
    assert runs[0].shape == plain.shape == (8, 3, 16, 16)
    assert not torch.equal(runs[0], plain)


def test_jpeg_decodes_at_reduced_size(tmp_path, rng):
    path = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (800, 1000, 3), dtype=np.uint8)).save(path)
    assert load_image(str(path), draft=256).shape == (3, 400, 500)
    assert load_image(str(path)).shape == (3, 800, 1000)


@pytest.mark.parametrize(
    ("X", "error", "message"),
    [
        ([], ValueError, "X is empty"),
        (np.zeros((0, 4, 4), np.uint8), ValueError, "X is empty"),
        (np.zeros((3, 16), np.uint8), ValueError, r"X has shape \(3, 16\).*reshape it"),
        (np.zeros((3, 4, 4, 2), np.uint8), ValueError, "1, 3 or 4 channels"),
        (np.zeros((3, 4, 4), np.int64), TypeError, "pixel dtype int64 is not supported"),
        (np.zeros((3, 4, 4), bool), TypeError, "pixel dtype bool"),
        ("img.png", TypeError, "single image or path"),
        (42, TypeError, "X is a int"),
        ([np.zeros((4, 4), np.uint8), 7], TypeError, "Image 1 is a int"),
        ([np.zeros((4, 4), np.uint8), np.zeros((4,), np.uint8)], ValueError,
         r"Image 1 has shape \(4,\)"),
    ],
)
def test_bad_input_errors(X, error, message):
    with pytest.raises(error, match=message):
        as_image_list(X)


def test_nan_and_range_errors_name_the_image():
    floats = np.zeros((4, 3, 3), np.float32)
    floats[2, 1, 1] = np.nan
    with pytest.raises(ValueError, match="Image 2 contains NaN"):
        as_image_list(floats)
    floats[2, 1, 1] = 0
    floats[3, 0, 0] = 255.0
    with pytest.raises(ValueError, match=r"Image 3 has float values outside \[0, 1\]"):
        as_image_list(floats)
    with pytest.raises(ValueError, match="Image 1 contains NaN"):
        as_image_list([np.zeros((2, 2)), np.full((2, 2), np.nan)])


def test_missing_file_names_index_and_path(image_files, tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(ValueError, match=r"Image 2 \('.*nope\.png'\): the file does not exist"):
        as_image_list([image_files[0], image_files[1], missing])
    with pytest.raises(ValueError, match="is a directory"):
        as_image_list([str(tmp_path)])


def test_truncated_file_fails_in_the_batch_that_reads_it(image_files, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(open(image_files[0], "rb").read()[:100])
    items = as_image_list([*image_files[:3], str(broken)])
    batches = iter_batches(items, HALF, batch_size=2, num_workers=0)
    assert next(batches).shape[0] == 2
    with pytest.raises(ValueError, match=r"Image 3 \('.*broken\.png'\) cannot be read"):
        next(batches)


def test_decoding_error_in_a_thread_names_the_item(image_files, tmp_path):
    broken = tmp_path / "text.png"
    broken.write_text("not an image")
    items = as_image_list([*image_files, str(broken)])
    with pytest.raises(ValueError, match=r"Image 8 \('.*text\.png'\) cannot be read"):
        list(iter_batches(items, HALF, batch_size=2, num_workers=2))


def test_dataset_indices_keep_original_numbers(images):
    dataset = ImageDataset(as_image_list(images), HALF, indices=[5, 1])
    assert len(dataset) == 2
    torch.testing.assert_close(dataset[0], preprocess(load_image(images[5]), HALF))


def test_pandas_column_of_paths(image_files):
    pd = require("pandas", "pip install pandas")
    frame = pd.DataFrame({"path": image_files})
    assert as_image_list(frame) == image_files
    with pytest.raises(ValueError, match="DataFrame with 2 columns"):
        as_image_list(frame.assign(other=1))


def test_load_image_folder(image_folder):
    paths, labels = load_image_folder(image_folder)
    assert labels.tolist() == ["bright"] * 6 + ["dark"] * 6
    assert all(p.endswith(".png") for p in paths)
    with pytest.raises(ValueError, match="is not a directory"):
        load_image_folder(image_folder / "nothing")


# ------------------------------------------------------------ bad inputs --

def _png_claiming(path, width, height):
    """A real PNG whose header is patched to claim ``width`` x ``height`` pixels."""
    Image.new("RGB", (4, 3)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return str(path)


def test_decompression_bomb_names_the_file_and_the_limit(tmp_path):
    bomb = _png_claiming(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ValueError, match=r"^Image 5 \('.*bomb\.png'\) is too large to decode "
                                         r"safely \(Image size \(10000000000 pixels\).*"
                                         r"PIL\.Image\.MAX_IMAGE_PIXELS = <pixels>"):
        load_image(bomb, 5)


def _pixels_as(kind, values):
    """The same pixel values as a float array item, a mode F or I PIL image, or a TIFF file."""
    array = np.asarray(values)
    return array if kind == "array" else Image.fromarray(array)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.float32([[0.5, np.nan]]), "contains NaN or infinite values; replace them"),
        (np.float32([[0.5, -np.inf]]), "contains NaN or infinite values; replace them"),
        (np.float32([[0.5, 1.5]]), r"has float values outside \[0, 1\]; divide 0-255"),
        (np.float32([[0.5, -0.1]]), r"has float values outside \[0, 1\]; divide 0-255"),
        (np.int32([[7, 70_000]]), r"has 32-bit integer values outside \[0, 65535\]; skt reads "
                                  "PIL mode 'I' images as 16-bit"),
        (np.int32([[7, -1]]), r"has 32-bit integer values outside \[0, 65535\]"),
    ],
)
def test_bad_values_in_pil_images_and_files_are_refused_like_arrays(tmp_path, values, message):
    path = tmp_path / "bad.tif"
    Image.fromarray(values).save(path)
    items = [np.zeros((2, 2), np.uint8)] * 3
    with pytest.raises(ValueError, match=rf"^Image 3 {message}") as from_pil:
        load_image(as_image_list([*items, Image.fromarray(values)])[3], 3)
    with pytest.raises(ValueError, match=rf"^Image 3 \('.*bad\.tif'\) {message}"):
        load_image(as_image_list([*items, str(path)])[3], 3)
    if values.dtype.kind == "f":  # the same check, word for word, as for an array
        with pytest.raises(ValueError) as from_array:
            as_image_list([*items, values])
        assert str(from_array.value) == str(from_pil.value)


def test_good_float_and_32_bit_pil_images_keep_their_values(tmp_path):
    floats = np.float32([[0.0, 0.25], [0.5, 1.0]])
    Image.fromarray(floats).save(tmp_path / "f.tif")
    for item in (Image.fromarray(floats), str(tmp_path / "f.tif")):
        np.testing.assert_array_equal(load_image(item)[1].numpy(), floats)
    wide = Image.fromarray(np.int32([[0, 65535]]))
    assert wide.mode == "I"
    assert load_image(wide)[0].tolist() == [[0.0, 1.0]]


def test_images_with_no_pixels_are_refused_before_they_divide_by_zero(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"X has shape \(2, 0, 5\): its images have no pixels"):
        as_image_list(np.zeros((2, 0, 5), np.uint8))
    with pytest.raises(ValueError, match=r"X has shape \(2, 3, 5, 0\): its images have no pixels"):
        as_image_list(torch.zeros(2, 3, 5, 0))
    with pytest.raises(ValueError, match=r"Image 1 is an empty PIL image \(size \(0, 4\)\)"):
        as_image_list([np.zeros((2, 2), np.uint8), Image.new("RGB", (0, 4))])
    # No PIL plugin writes or opens an empty file, but a decoder that did would be caught.
    path = tmp_path / "empty.png"
    Image.new("RGB", (3, 3)).save(path)
    monkeypatch.setattr(skt.images._decode.Image, "open", lambda item: Image.new("RGB", (0, 4)))
    with pytest.raises(ValueError, match=r"Image 2 \('.*empty\.png'\) decodes to an image with "
                                         r"no pixels \(shape \(4, 0, 3\)\)"):
        load_image(str(path), 2)


def test_closed_and_lazily_opened_damaged_pil_images_name_the_item(image_files, tmp_path):
    closed = Image.open(image_files[0])
    closed.load()
    closed.close()
    with pytest.raises(ValueError, match=r"^Image 1 \(a PIL image opened from '.*img0\.png'\) "
                                         r"cannot be read as an image \(Operation on closed "
                                         r"image\)\. Pass PIL images that are open and loaded"):
        load_image(as_image_list([closed, closed])[1], 1)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(image_files[0], "rb").read()[:200])
    lazy = Image.open(truncated)  # not loaded: the damage shows when the pixels are read
    with pytest.raises(ValueError, match=r"^Image 4 \(a PIL image opened from "
                                         r"'.*truncated\.png'\) cannot be read as an image"):
        load_image(as_image_list([lazy])[0], 4)


PIL_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
             "LAB", "HSV", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@pytest.mark.parametrize("mode", PIL_MODES)
def test_every_pil_mode_becomes_rgb(mode, rng):
    rgb = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    gray = np.asarray(rgb.convert("L"))
    if mode == "F":  # floats must be in [0, 1]
        image, expected = Image.fromarray(gray / np.float32(255)), gray / np.float32(255)
    elif mode == "I" or mode.startswith("I;16"):  # read as 16-bit
        image, expected = rgb.convert(mode), gray / np.float32(65535)
    else:
        image = rgb.convert(mode)
        expected = np.asarray(image.convert("LA" if mode == "La" else mode).convert("RGB"))
    tensor = load_image(as_image_list([image])[0])
    assert tensor.shape == (3, 4, 5)
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(),
                               np.broadcast_to(expected[..., None], (4, 5, 3))
                               if expected.ndim == 2 else expected, rtol=1e-6)


def test_premultiplied_modes_give_their_unpremultiplied_colour():
    # 50 premultiplied by alpha 128/255 is 99 once divided out, as LA and RGBA store it.
    assert load_image(Image.new("La", (2, 2), (50, 128)))[:, 0, 0].tolist() == [99] * 3
    assert load_image(Image.new("RGBa", (2, 2), (50, 50, 50, 128)))[:, 0, 0].tolist() == [99] * 3


def test_16_bit_modes_agree_whatever_their_byte_order():
    values = np.uint16([[0, 257, 65535]])
    native = load_image(Image.fromarray(values))
    np.testing.assert_allclose(native[0].numpy(), [[0.0, 257 / 65535, 1.0]], rtol=1e-6)
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2"), ("I", "<i4")):
        image = Image.frombytes(mode, (3, 1), values.astype(dtype).tobytes())
        torch.testing.assert_close(load_image(image), native)
    big = values.astype(">u2")[None]
    torch.testing.assert_close(load_image(as_image_list(big)[0]), native)


@pytest.mark.parametrize("make", [lambda: np.array(7, np.uint8),
                                  lambda: torch.tensor(7, dtype=torch.uint8),
                                  lambda: np.array("img.png")])
def test_zero_dimensional_items_and_x(make):
    with pytest.raises(ValueError, match=r"^X has shape \(\), a single value; expected a list"):
        as_image_list(make())
    with pytest.raises(ValueError, match=r"^Image 1 has shape \(\); expected \(H, W\)"):
        as_image_list([np.zeros((2, 2), np.uint8), make()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.bool, torch.complex64, torch.int8,
                                   torch.int16, torch.int32, torch.int64, torch.uint32,
                                   np.bool_, np.complex64, np.int8, np.int32, np.uint32,
                                   np.longdouble])
def test_unsupported_dtypes_as_items_and_as_x(dtype):
    if isinstance(dtype, torch.dtype):
        stack = torch.zeros(2, 3, 4, 4, dtype=dtype)
    else:
        stack = np.zeros((2, 4, 4, 3), dtype=dtype)
    supported = r"is not supported\. Use uint8 \(0-255\), uint16 \(0-65535\) or floats in \[0, 1\]"
    with pytest.raises(TypeError, match=rf"^X: pixel dtype .* {supported}"):
        as_image_list(stack)
    with pytest.raises(TypeError, match=rf"^Image 1: pixel dtype .* {supported}"):
        as_image_list([np.zeros((2, 2), np.uint8), stack[1]])


def test_bytes_are_not_a_list_of_images():
    with pytest.raises(TypeError, match=r"X is bytes; pass a list of images"):
        as_image_list(b"\x89PNG\r\n")


# ----------------------------------------------------------- orientation --

def _save_with_orientation(image, path, orientation):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    image.save(path, exif=exif)
    return str(path)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_exif_orientation_is_applied_to_files_and_pil_images(tmp_path, rng, suffix):
    pixels = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    tagged = _save_with_orientation(Image.fromarray(pixels), tmp_path / f"six.{suffix}", 6)
    plain = _save_with_orientation(Image.fromarray(pixels), tmp_path / f"one.{suffix}", 1)
    # Orientation 6: the stored pixels are shown turned a quarter clockwise.
    by_hand = np.rot90(load_image(plain).permute(1, 2, 0).numpy(), k=-1)
    assert by_hand.shape == (6, 4, 3)
    np.testing.assert_array_equal(load_image(tagged).permute(1, 2, 0).numpy(), by_hand)
    given = Image.open(tagged)
    np.testing.assert_array_equal(load_image(given).permute(1, 2, 0).numpy(), by_hand)
    assert given.size == (6, 4) and given.getexif()[ExifTags.Base.Orientation] == 6
    turned = ImageOps.exif_transpose(given)  # the tag goes with the turn: not turned twice
    np.testing.assert_array_equal(load_image(turned).permute(1, 2, 0).numpy(), by_hand)


def test_jpeg_draft_then_turn_keeps_both_sides_above_the_target(tmp_path, rng):
    pixels = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
    tagged = _save_with_orientation(Image.fromarray(pixels), tmp_path / "six.jpg", 6)
    plain = _save_with_orientation(Image.fromarray(pixels), tmp_path / "one.jpg", 1)
    reduced = load_image(tagged, draft=100)
    assert reduced.shape == (3, 150, 100)  # decoded at 1/4 (150 x 100), then turned
    torch.testing.assert_close(reduced, load_image(plain, draft=100).rot90(-1, (1, 2)),
                               rtol=0, atol=0)


# --------------------------------------------------------- skipping items --

def test_failures_dict_records_items_and_keeps_their_places(image_files, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    X = [*image_files[:3], str(broken), image_files[3], str(tmp_path / "missing.png"),
         *image_files[4:]]
    failures = {}
    items = as_image_list(X, failures=failures)
    assert len(items) == 10 and list(failures) == [5]
    assert failures[5].startswith(f"Image 5 ({X[5]!r}): the file does not exist")
    expected = torch.cat(list(iter_batches(as_image_list(image_files), HALF, 3, 0)))
    for workers in (0, 2):
        found = dict(failures)
        batches = torch.cat(list(iter_batches(items, HALF, 3, workers, failures=found)))
        assert batches.shape == (10, 3, 16, 16)
        assert sorted(found) == [3, 5] and found[5] == failures[5]
        assert found[3].startswith(f"Image 3 ({X[3]!r}) cannot be read as an image")
        assert not batches[[3, 5]].any()
        torch.testing.assert_close(batches[[0, 1, 2, 4, 6, 7, 8, 9]], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Image 3 \('.*broken\.png'\) cannot be read"):
        list(iter_batches(items, HALF, 3, 2))


def _decoding_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("skt-decode")]


def test_no_decoding_thread_outlives_a_failure_or_an_abandoned_iterator(image_files, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    items = as_image_list([*image_files, str(broken), *image_files])
    with pytest.raises(ValueError, match="Image 8"):
        list(iter_batches(items, HALF, 2, 2))
    assert _decoding_threads() == []
    batches = iter_batches(items, HALF, 2, 2)
    next(batches)
    assert _decoding_threads()  # decoding ahead
    batches.close()
    assert _decoding_threads() == []


@pytest.mark.parametrize("shape", [(3, 2, 100_000), (3, 60_000, 3)])
def test_an_extremely_elongated_image_is_cut_before_resizing(shape):
    # Resizing the whole 2 x 100,000 strip to a shorter side of 37 would hold
    # 37 x 1,850,000 pixels; the centre crop only ever sees its middle.
    image = torch.zeros(shape, dtype=torch.uint8)
    middle = [slice(None)] + [slice(n // 2 - 1, n // 2 + 1) if n > 10 else slice(None)
                              for n in shape[1:]]
    image[tuple(middle)] = 255
    out = preprocess(image, Preprocessing(crop_size=32, resize_size=37))
    assert out.shape == (3, 32, 32)
    assert float(out.max()) > float(out.min())  # the bright middle is what the crop shows


def test_an_image_within_the_aspect_bound_is_resized_whole():
    import torchvision.transforms.v2.functional as TF

    from skt.images._preprocess import MAX_ASPECT, _finish

    config = Preprocessing(crop_size=32, resize_size=37)
    image = torch.randint(0, 256, (3, 5, 5 * MAX_ASPECT), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    whole = _finish(TF.center_crop(TF.resize(image, 37, antialias=True), 32), config)
    assert torch.equal(preprocess(image, config), whole)


# ---------------------------------------------------------------- threads --

@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_image_is_preprocessed_on_one_thread_and_torch_keeps_its_setting(
        image_files, monkeypatch, num_workers):
    import skt.images._batching as batching
    seen = []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return preprocess(*args, **kwargs)

    config = Preprocessing(crop_size=16, resize_size=18)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(batching, "preprocess", recording)
        monkeypatch.setattr(batching, "PREPROCESS_THREADS", None)  # torch's setting
        plain = torch.cat(list(iter_batches(image_files, config, 3, num_workers)))
        assert seen == [2] * len(image_files)
        seen.clear()
        monkeypatch.setattr(batching, "PREPROCESS_THREADS", 1)
        single = torch.cat(list(iter_batches(image_files, config, 3, num_workers)))
        assert seen == [1] * len(image_files)
        assert torch.get_num_threads() == 2  # the network's threads are untouched
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(single, plain, rtol=0, atol=0)
