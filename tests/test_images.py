import numpy as np
import pytest
import torch
from PIL import Image

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
