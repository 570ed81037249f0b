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
        lx, ly = load_npz(tmp_path / f"{name}.npz")
        assert np.allclose(lx.numpy(), x) and np.array_equal(ly.numpy(), y)
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
    with pytest.raises(DataError, match="integer class labels"):
        load_npz(tmp_path / "soft.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(tmp_path / "junk.npz")


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


@pytest.mark.skipif(importlib.util.find_spec("PIL") is not None, reason="Pillow is installed")
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
    np.savez(tmp_path / "c.npz", x=x.astype(np.float32), y=np.zeros(200, int))
    chan = load_dataset(_cfg(dataset="npz", path=str(tmp_path / "c.npz"), preprocess="per_channel"), 0)
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
