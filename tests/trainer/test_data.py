"""Built-in data: shapes, seeded determinism, user files with clear errors, mean
subtraction from the training split, and batching from pure SGD to full batch."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from layerscope.trainer.data import (
    MAX_CLASSES,
    Batches,
    DataError,
    add_input_noise,
    load_dataset,
    load_digits,
    load_folder,
    load_npz,
    make_blobs,
    make_spirals,
    split_indices,
)


def _cfg(**over: object) -> dict:
    return {"dataset": "digits", "path": None, "preprocess": "none", "input_noise": 0.0,
            "val_fraction": 0.2, "subset": None, **over}  # fmt: skip


def test_digits_are_1797_images_of_64_pixels_in_10_classes() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.flatten(1).shape == (1797, 64)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()  # the file read directly is exactly scikit-learn's data set
    assert np.array_equal(x.flatten(1).numpy() * 16, bunch.data)
    assert np.array_equal(y.numpy(), bunch.target)
    data = load_dataset(_cfg(), seed=0)
    assert data.num_classes == 10 and data.input_shape == (1, 8, 8)
    assert len(data.x_train) + len(data.x_val) == 1797
    assert len(data.x_val) == round(1797 * 0.2)


@pytest.mark.parametrize("make", [make_spirals, make_blobs])
def test_generated_sets_are_deterministic_by_seed(
    make: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
) -> None:
    x1, y1 = make(3)
    x2, y2 = make(3)
    x3, _ = make(4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.shape[1] == 2 and len(x1) == len(y1)


def test_spirals_have_k_arms_as_classes() -> None:
    x, y = make_spirals(0, arms=5, points_per_arm=40)
    assert x.shape == (200, 2) and sorted(y.unique().tolist()) == [0, 1, 2, 3, 4]


def test_split_is_seeded_disjoint_and_subset_takes_the_first_n() -> None:
    a_train, a_val = split_indices(100, 0.3, seed=1)
    b_train, b_val = split_indices(100, 0.3, seed=1)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert len(a_val) == 30 and not set(a_train.tolist()) & set(a_val.tolist())
    assert not torch.equal(split_indices(100, 0.3, seed=2)[1], a_val)
    data = load_dataset(_cfg(subset=100), seed=0)
    assert len(data.x_train) == 100 and len(data.x_val) == round(1797 * 0.2)


def test_npz_roundtrip_with_lower_or_upper_x(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=30)
    np.savez(tmp_path / "lower.npz", x=x, y=y)
    np.savez(tmp_path / "upper.npz", X=x, y=y)
    for name in ("lower", "upper"):
        lx, ly, labels = load_npz(tmp_path / f"{name}.npz")
        assert np.allclose(lx.numpy(), x) and np.array_equal(ly.numpy(), y)
        assert labels == [0, 1, 2]
    np.savez(tmp_path / "hw.npz", x=x[:, 0], y=y)
    data = load_dataset(_cfg(dataset="npz", path=str(tmp_path / "hw.npz")), seed=0)
    assert data.input_shape == (1, 4, 4) and data.num_classes == int(y.max()) + 1


def test_npz_errors_name_the_missing_key_or_bad_shape(tmp_path: Path) -> None:
    np.savez(tmp_path / "nox.npz", data=np.zeros((4, 2)), y=np.zeros(4, int))
    with pytest.raises(DataError, match=r"no array 'x' \(or 'X'\); found keys: \['data', 'y'\]"):
        load_npz(tmp_path / "nox.npz")
    np.savez(tmp_path / "noy.npz", x=np.zeros((4, 2)))
    with pytest.raises(DataError, match="no array 'y'"):
        load_npz(tmp_path / "noy.npz")
    np.savez(tmp_path / "short.npz", x=np.zeros((4, 2)), y=np.zeros(3, int))
    with pytest.raises(DataError, match="3 labels but x has 4 samples"):
        load_npz(tmp_path / "short.npz")
    np.savez(tmp_path / "flat.npz", x=np.zeros(4), y=np.zeros(4, int))
    with pytest.raises(DataError, match=r"shape \(4,\); expected"):
        load_npz(tmp_path / "flat.npz")
    np.savez(tmp_path / "soft.npz", x=np.zeros((4, 2)), y=np.full(4, 0.5))
    with pytest.raises(DataError, match=r"soft\.npz\['y'\] has non-integer labels \(e\.g\. 0\.5\)"):
        load_npz(tmp_path / "soft.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz") as err:
        load_npz(tmp_path / "junk.npz")
    # numpy takes a non-zip file for a pickle and advises loading it unsafely: not ours to give
    assert "allow_pickle" not in str(err.value) and "pickled data is not loaded" in str(err.value)


def test_npz_path_holding_a_npy_array_or_object_arrays_is_an_error_naming_the_file(
    tmp_path: Path,
) -> None:
    np.save(tmp_path / "plain.npy", np.zeros((4, 2)))
    with pytest.raises(DataError, match=r"plain\.npy .*x and y must be arrays in a \.npz archive"):
        load_npz(tmp_path / "plain.npy")
    ragged = np.array([np.zeros(2), np.zeros(3)], dtype=object)
    np.savez(tmp_path / "obj.npz", x=ragged, y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"obj\.npz\['x'\] is an object array") as err:
        load_npz(tmp_path / "obj.npz")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 1, -1], r"negative labels \(min -1\); expected labels >= 0"),
        ([0.0, 1.0, -3.0], r"negative labels \(min -3\)"),
        ([0.0, 1.0, 2.5], r"non-integer labels \(e\.g\. 2\.5\)"),
        ([0.0, 1.0, np.nan], r"non-integer labels \(e\.g\. nan\)"),
        ([0.0, 1.0, np.inf], r"non-integer labels \(e\.g\. inf\)"),
        (["a", "b", "c"], "dtype <U1; expected integer class labels"),
    ],
)
def test_negative_or_non_integer_labels_are_errors_naming_the_file(
    tmp_path: Path, labels: list, message: str
) -> None:
    np.savez(tmp_path / "y.npz", x=np.zeros((3, 2)), y=np.asarray(labels))
    with pytest.raises(DataError, match=rf"y\.npz\['y'\] has {message}"):
        load_npz(tmp_path / "y.npz")


@pytest.mark.parametrize(
    "labels, original",
    [
        ([0, 255, 255, 0, 0, 255], [0, 255]),  # a mask's 0/255
        ([7, 3, 3, 7, 7, 3], [3, 7]),
        ([2**40, 1, 0, 1, 0, 2**40], [0, 1, 2**40]),
        (np.array([2**63, 5, 5, 2**63], dtype=np.uint64), [5, 2**63]),  # no int64 wrap
        ([1e30, 2.0, 2.0, 1e30], [2, int(1e30)]),
    ],
)
def test_labels_are_mapped_to_class_indices_in_sorted_order(
    tmp_path: Path, labels: list, original: list[int]
) -> None:
    """Labels need not be 0..K-1: {0, 255} are 2 classes (not a 256-way output layer),
    class i is the i-th smallest label, and the labels are kept for the run's config."""
    y = np.asarray(labels)
    np.savez(tmp_path / "y.npz", x=np.arange(2 * len(y), dtype=np.float32).reshape(-1, 2), y=y)
    _, classes, kept = load_npz(tmp_path / "y.npz")
    assert kept == original
    assert [original[i] for i in classes.tolist()] == [int(v) for v in y]
    data = load_dataset(_cfg(dataset="npz", path=str(tmp_path / "y.npz"), val_fraction=0.5), 0)
    assert data.num_classes == len(original) and data.labels == original
    # train and validation use the one mapping, made over the whole file before the split
    x = torch.cat([data.x_train, data.x_val])
    mapped = torch.cat([data.y_train, data.y_val])
    for row, cls in zip(x.tolist(), mapped.tolist(), strict=True):
        assert original[cls] == int(y[int(row[0]) // 2])


def test_a_label_found_only_in_the_validation_split_has_its_class(tmp_path: Path) -> None:
    y = np.array([10] * 20 + [20] * 20 + [99])
    np.savez(tmp_path / "y.npz", x=np.arange(len(y), dtype=np.float32)[:, None], y=y)
    seed = next(s for s in range(100) if 40 in split_indices(len(y), 0.2, s)[1].tolist())
    data = load_dataset(_cfg(dataset="npz", path=str(tmp_path / "y.npz")), seed=seed)
    assert data.num_classes == 3 and data.labels == [10, 20, 99]
    assert 2 in data.y_val.tolist() and 2 not in data.y_train.tolist()


def test_labels_already_0_to_k_minus_1_are_not_recorded_as_a_mapping(tmp_path: Path) -> None:
    np.savez(tmp_path / "y.npz", x=np.zeros((6, 2)), y=np.array([0, 1, 2] * 2))
    data = load_dataset(_cfg(dataset="npz", path=str(tmp_path / "y.npz")), seed=0)
    assert data.num_classes == 3 and data.labels is None


def test_more_distinct_labels_than_max_classes_is_an_error(tmp_path: Path) -> None:
    y = np.arange(MAX_CLASSES + 1) * 3
    np.savez(tmp_path / "y.npz", x=np.zeros((len(y), 1)), y=y)
    with pytest.raises(DataError, match=rf"has {MAX_CLASSES + 1} distinct labels; at most"):
        load_npz(tmp_path / "y.npz")
    np.savez(tmp_path / "ok.npz", x=np.zeros((MAX_CLASSES, 1)), y=y[:-1])
    assert load_npz(tmp_path / "ok.npz")[1].max() == MAX_CLASSES - 1


def test_single_class_data_is_an_error_for_npz_and_folder(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", x=np.zeros((5, 2)), y=np.full(5, 3))
    with pytest.raises(
        DataError, match=r"one\.npz\['y'\] has 1 class; a classifier needs at least 2"
    ):
        load_dataset(_cfg(dataset="npz", path=str(tmp_path / "one.npz")), seed=0)
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "dog").mkdir()  # a class folder with no images
    for i in range(3):
        np.save(tmp_path / "imgs" / "cat" / f"{i}.npy", np.full((2, 2), i, np.float32))
    with pytest.raises(DataError, match=r"imgs has 1 class; .*only 'cat' holds images"):
        load_folder(tmp_path / "imgs")


def _write_pgm(path: Path, pixels: np.ndarray, binary: bool) -> None:
    h, w = pixels.shape
    if binary:
        path.write_bytes(f"P5\n# made by a test\n{w} {h}\n255\n".encode() + pixels.tobytes())
    else:
        body = "\n".join(" ".join(str(v) for v in row) for row in pixels)
        path.write_text(f"P2\n{w} {h}\n255\n{body}\n")


def test_image_folder_reads_npy_and_pgm_with_class_per_subfolder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    cat = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
    _write_pgm(tmp_path / "cat" / "a.pgm", cat, binary=True)
    _write_pgm(tmp_path / "cat" / "b.pgm", cat, binary=False)
    np.save(tmp_path / "dog" / "c.npy", np.ones((6, 5), np.float32))
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    x, y, classes = load_folder(tmp_path)
    assert classes == ["cat", "dog"] and y.tolist() == [0, 0, 1]
    assert x.shape == (3, 1, 6, 5)
    assert np.allclose(x[0, 0].numpy(), cat / 255.0) and torch.equal(x[0], x[1])
    np.save(tmp_path / "dog" / "d.npy", np.ones((4, 4), np.float32))
    with pytest.raises(DataError, match=r"d.npy has shape \(4, 4\); the first image had \(6, 5\)"):
        load_folder(tmp_path)


def test_a_folder_mixing_greyscale_and_colour_images_gives_greys_three_equal_channels(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    grey = np.arange(20, dtype=np.float32).reshape(4, 5) / 20
    colour = np.stack([grey, 1 - grey, np.full((4, 5), 0.5, np.float32)])
    np.save(tmp_path / "a" / "0.npy", grey)  # (H, W) first, colour after it
    np.save(tmp_path / "b" / "1.npy", colour)
    np.save(tmp_path / "b" / "2.npy", grey[None])  # (1, H, W) after the colour one
    x, y, _ = load_folder(tmp_path)
    assert x.shape == (3, 3, 4, 5) and y.tolist() == [0, 1, 1]
    for i in (0, 2):
        assert all(np.array_equal(x[i, c].numpy(), grey) for c in range(3))
    assert np.array_equal(x[1].numpy(), colour)
    np.save(tmp_path / "b" / "3.npy", np.zeros((3, 4, 4), np.float32))  # another size: refused
    with pytest.raises(
        DataError, match=r"3\.npy has shape \(3, 4, 4\); the first image had \(4, 5\)"
    ):
        load_folder(tmp_path)


_HAS_PIL = importlib.util.find_spec("PIL") is not None
_BAD_IMAGES = {  # file name -> (bytes, what the error says)
    "trunc.pgm": (b"P5\n8 8\n255\n" + bytes(10), "PGM holds 10 pixels, header says 8x8"),
    "junk.npy": (b"junk\n", "not a .npy array of numbers"),
    "corrupt.png": (b"\x89PNG\r\n\x1a\n not really", "not a readable image"),
}


def _two_class_folder(root: Path) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        np.save(root / cls / "0.npy", np.zeros((8, 8), np.float32))
    return root


@pytest.mark.parametrize("name", sorted(_BAD_IMAGES))
def test_unreadable_image_files_are_errors_naming_the_file(tmp_path: Path, name: str) -> None:
    if name.endswith(".png") and not _HAS_PIL:
        pytest.skip("Pillow is not installed")
    root = _two_class_folder(tmp_path)
    content, reason = _BAD_IMAGES[name]
    (root / "b" / name).write_bytes(content)
    with pytest.raises(DataError) as err:
        load_folder(root)
    assert str(err.value).startswith(f"{root / 'b' / name}: {reason}")
    assert "\n" not in str(err.value)


def test_string_npy_is_an_error_and_a_folder_named_like_an_image_is_skipped(tmp_path: Path) -> None:
    root = _two_class_folder(tmp_path)
    (root / "a" / "extra.png").mkdir()  # not a file: skipped, not read
    (root / "a" / "extra.png" / "inside.npy").write_bytes(b"never read")
    x, y, _ = load_folder(root)
    assert x.shape == (2, 1, 8, 8) and y.tolist() == [0, 1]
    np.save(root / "b" / "text.npy", np.full((8, 8), "x"))
    with pytest.raises(DataError, match=r"text\.npy has dtype <U1; expected real numbers"):
        load_folder(root)


@pytest.mark.skipif(not _HAS_PIL, reason="needs Pillow")
def test_greyscale_images_deeper_than_8_bits_stay_one_channel_scaled_by_their_range(
    tmp_path: Path,
) -> None:
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "deep").mkdir(parents=True)
    (root / "grey").mkdir()
    values = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(root / "deep" / "a.png")
    Image.frombytes("I;16B", (2, 2), values.astype(">u2").tobytes()).save(root / "deep" / "b.tif")
    for name, mode in (("a.png", "I;16"), ("b.tif", "I;16B")):
        with Image.open(root / "deep" / name) as img:
            assert img.mode == mode
    Image.fromarray(np.array([[0, 51], [102, 255]], dtype=np.uint8)).save(root / "grey" / "c.png")
    x, y, _ = load_folder(root)
    assert x.shape == (3, 1, 2, 2) and y.tolist() == [0, 0, 1]
    assert np.allclose(x[0, 0].numpy(), values / 65535.0)  # all four levels survive
    assert torch.equal(x[0], x[1])
    assert np.allclose(x[2, 0].numpy(), [[0.0, 0.2], [0.4, 1.0]])  # 8-bit: / 255
    # 32-bit int and float images (TIFF) keep their values: they have no fixed range
    Image.fromarray(np.array([[0, 7], [70000, -3]], dtype=np.int32)).save(root / "deep" / "i.tif")
    Image.fromarray(np.array([[0, 1.5], [3, -2]], dtype=np.float32)).save(root / "grey" / "f.tif")
    x, _, _ = load_folder(root)
    assert x[2, 0].tolist() == [[0, 7], [70000, -3]]
    assert x[4, 0].tolist() == [[0, 1.5], [3, -2]]


@pytest.mark.skipif(not _HAS_PIL, reason="needs Pillow")
def test_palette_images_keep_their_colours_and_grey_palettes_stay_one_channel(
    tmp_path: Path,
) -> None:
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "colour").mkdir(parents=True)
    (root / "grey").mkdir()
    index = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    red_green = Image.fromarray(index, mode="P")
    red_green.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    red_green.save(root / "colour" / "a.png")
    greys = Image.fromarray(index, mode="P")
    greys.putpalette([0, 0, 0, 51, 51, 51] + [0] * 762)
    greys.save(root / "grey" / "b.png")
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("LA").save(
        root / "grey" / "c.png"
    )
    with Image.open(root / "colour" / "a.png") as img:
        assert img.mode == "P"
    x, y, _ = load_folder(root)
    assert x.shape == (3, 3, 2, 2) and y.tolist() == [0, 1, 1]
    assert x[0].tolist() == [[[1, 0], [0, 1]], [[0, 1], [1, 0]], [[0, 0], [0, 0]]]  # red, green
    assert all(np.allclose(x[1, c].numpy(), [[0, 0.2], [0.2, 0]]) for c in range(3))  # 51/255
    assert all(x[2, c].tolist() == [[0, 1], [1, 0]] for c in range(3))  # LA: alpha dropped
    # with no colour image in the folder, the grey palette and LA images stay one channel
    (root / "colour" / "a.png").unlink()
    (root / "colour" / "d.png").write_bytes((root / "grey" / "b.png").read_bytes())
    x, _, _ = load_folder(root)
    assert x.shape == (3, 1, 2, 2) and np.allclose(x[1, 0].numpy(), [[0, 0.2], [0.2, 0]])


@pytest.mark.skipif(_HAS_PIL, reason="Pillow is installed")
def test_image_folder_without_pillow_says_which_formats_work(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=r"needs Pillow.*use .npy or .pgm"):
        load_folder(tmp_path)


def test_per_pixel_and_per_channel_means_come_from_the_training_split(tmp_path: Path) -> None:
    pixel = load_dataset(_cfg(preprocess="per_pixel"), seed=0)
    assert pixel.x_train.mean(dim=0).abs().max() < 1e-5
    assert pixel.x_val.mean(dim=0).abs().max() > 1e-3  # val is shifted by train's means
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[5.0, -3.0], size=(200, 4, 4, 2)).transpose(0, 3, 1, 2)
    np.savez(tmp_path / "c.npz", x=x.astype(np.float32), y=np.arange(200) % 2)
    chan = load_dataset(
        _cfg(dataset="npz", path=str(tmp_path / "c.npz"), preprocess="per_channel"), 0
    )
    per_channel = chan.x_train.mean(dim=(0, 2, 3))
    assert per_channel.abs().max() < 1e-5
    # one mean per channel, not per pixel: individual pixels keep their spread
    assert chan.x_train.mean(dim=0).abs().max() > 1e-3


def test_input_noise_has_the_asked_std_and_zero_is_identity() -> None:
    torch.manual_seed(0)
    x = torch.zeros(10_000, 4)
    assert add_input_noise(x, 0.0) is x
    assert add_input_noise(x, 0.5).std().item() == pytest.approx(0.5, rel=0.03)


def test_batches_cover_every_example_once_per_epoch_from_sgd_to_full_batch() -> None:
    stream = iter(Batches(10, 4, seed=0))
    epoch = torch.cat([next(stream) for _ in range(3)])
    assert sorted(epoch.tolist()) == list(range(10))  # 4 + 4 + 2
    single = Batches(7, 1, seed=0)
    assert single.steps_per_epoch == 7 and len(next(iter(single))) == 1
    for full in (Batches(7, 0, seed=0), Batches(7, 100, seed=0)):
        assert full.size == 7 and full.steps_per_epoch == 1
        assert next(iter(full)).tolist() == list(range(7))
    odd = Batches(9, 4, seed=0)  # a trailing batch of one is dropped (batch norm)
    assert odd.steps_per_epoch == 2
    a = [b.tolist() for b, _ in zip(Batches(10, 3, seed=5), range(6), strict=False)]
    b = [b.tolist() for b, _ in zip(Batches(10, 3, seed=5), range(6), strict=False)]
    assert a == b
