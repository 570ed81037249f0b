"""data — the built-in experiments' data: loading, splitting, preprocessing, batching.

Owns: digits (``sklearn.datasets.load_digits``, shipped inside scikit-learn, no
download), generated spirals and Gaussian blobs (seeded), a user's local ``.npz``
(arrays ``x`` or ``X`` plus ``y``), an image folder (one subfolder per class;
``.npy`` and ``.pgm`` always, PNG/JPEG/BMP/GIF only when Pillow is installed),
the seeded train/val split, mean subtraction with means from the training split
only, training-only input noise, and the batch iterator (batch size 1 = pure SGD,
0 or the full set = full-batch GD).

Never: downloads anything, adds a dependency, or lets validation data leak into
the statistics used to preprocess training data.

Shapes: images are ``(N, C, H, W)`` float32 (digits ``(1797, 1, 8, 8)``, values
scaled to [0, 1]); point data ``(N, D)``; labels ``(N,)`` int64 in ``0..K-1``. A
``.npz``'s labels are the class indices of its distinct labels in sorted order
({0, 255} -> 0, 1), kept in ``Dataset.labels`` for the run's config; a folder's
classes are its subfolders sorted by name.
"""

from __future__ import annotations

import importlib.util
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SPIRAL_ARMS = 3
SPIRAL_POINTS_PER_ARM = 300
SPIRAL_NOISE = 0.2  # radians of angular jitter; arms still separable
BLOB_CENTRES = 4
BLOB_POINTS_PER_CENTRE = 250
BLOB_STD = 1.0
BLOB_BOX = 5.0  # centres drawn uniformly in [-BOX, BOX]^2
IMAGE_SUFFIXES_PIL = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"})
IMAGE_SUFFIXES = frozenset({".npy", ".pgm"}) | IMAGE_SUFFIXES_PIL
# The most distinct labels (classes) a user's data may hold: the output layer gets one
# unit per class.
MAX_CLASSES = 10_000
# What decoding a damaged or unexpected file raises (numpy, zipfile, zlib, Pillow).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
)


class DataError(ValueError):
    """Data that cannot be used as given; the message names the file, key or shape."""


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    name: str
    classes: list[str] = field(default_factory=list)
    # A .npz's original label of each class index, when they were not already 0..K-1
    # (labels {0, 255} train as classes 0, 1: [0, 255]); None otherwise.
    labels: list[int] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        """The same data on ``device`` (small data sets live there whole: no per-step copy)."""
        return Dataset(
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_val.to(device),
            self.y_val.to(device),
            self.num_classes,
            self.name,
            self.classes,
            self.labels,
        )


# ---- sources ----


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """1797 8x8 grey digits as ``(N, 1, 8, 8)`` in [0, 1], labels 0..9."""
    table = _digits_table()
    x = torch.as_tensor(table[:, :64], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.as_tensor(table[:, 64], dtype=torch.int64)


def _digits_table() -> np.ndarray:
    """The (1797, 65) pixels+label table behind ``sklearn.datasets.load_digits``.

    Read straight from scikit-learn's package data when the file is where it has
    always been: importing sklearn costs ~1.5 s per process (scipy), which every
    launched run would pay before its first step. Otherwise ask sklearn.
    """
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return np.column_stack([bunch.data, bunch.target])


def make_spirals(
    seed: int, arms: int = SPIRAL_ARMS, points_per_arm: int = SPIRAL_POINTS_PER_ARM
) -> tuple[torch.Tensor, torch.Tensor]:
    """``arms`` interleaved 2-D spiral arms (class = arm), jittered by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    radius = torch.linspace(0.0, 1.0, points_per_arm)
    for arm in range(arms):
        start = arm * 2 * math.pi / arms
        theta = start + radius * 4.0 + SPIRAL_NOISE * torch.randn(points_per_arm, generator=gen)
        xs.append(torch.stack([radius * torch.sin(theta), radius * torch.cos(theta)], dim=1))
        ys.append(torch.full((points_per_arm,), arm, dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys)


def make_blobs(
    seed: int, centres: int = BLOB_CENTRES, points_per_centre: int = BLOB_POINTS_PER_CENTRE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Isotropic 2-D Gaussian clusters (std ``BLOB_STD``) around seeded centres."""
    gen = torch.Generator().manual_seed(seed)
    means = (torch.rand(centres, 2, generator=gen) * 2 - 1) * BLOB_BOX
    x = means.repeat_interleave(points_per_centre, dim=0)
    x = x + BLOB_STD * torch.randn(x.shape, generator=gen)
    y = torch.arange(centres).repeat_interleave(points_per_centre)
    return x, y


def _as_samples(x: np.ndarray, where: str) -> torch.Tensor:
    """(N, D) stays, (N, H, W) gains a channel, (N, C, H, W) stays; anything else is an error."""
    if x.ndim not in (2, 3, 4):
        raise DataError(
            f"{where} has shape {x.shape}; expected (N, features), (N, H, W) or (N, C, H, W)"
        )
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{where} has dtype {x.dtype}; expected real numbers")
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if not torch.isfinite(t).all():
        raise DataError(f"{where} contains NaN or Inf values")
    return t.unsqueeze(1) if t.dim() == 3 else t


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _as_labels(y: np.ndarray, n: int, where: str) -> tuple[torch.Tensor, list[int]]:
    """Class indices ``0..K-1`` (int64) for the labels ``y``, and the distinct labels they
    stand for (sorted: index i is the i-th smallest label). Labels must be whole numbers
    >= 0, at most ``MAX_CLASSES`` distinct; they need not be 0..K-1 ({0, 255} or {3, 7}
    are two classes, not 256 or 8). Checked before any cast, so a float or uint64 label
    too big for int64 is a label like any other rather than wrapping around.
    """
    if y.ndim != 1:
        raise DataError(f"{where} has shape {y.shape}; expected (N,) class labels")
    if len(y) != n:
        raise DataError(f"{where} has {len(y)} labels but x has {n} samples")
    if np.issubdtype(y.dtype, np.floating):
        fractional = ~np.isfinite(y) | (np.floor(y) != y)
        if fractional.any():
            bad = y[fractional][0]
            raise DataError(
                f"{where} has non-integer labels (e.g. {bad.item()}); expected whole-number "
                "class labels"
            )
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where} has dtype {y.dtype}; expected integer class labels")
    distinct, index = np.unique(y, return_inverse=True)
    if len(distinct) and distinct[0] < 0:
        raise DataError(
            f"{where} has negative labels (min {int(distinct[0])}); expected labels >= 0"
        )
    if len(distinct) > MAX_CLASSES:
        raise DataError(
            f"{where} has {len(distinct)} distinct labels; at most {MAX_CLASSES} classes "
            "are supported"
        )
    return torch.as_tensor(index.reshape(-1).astype(np.int64)), [int(v) for v in distinct]


def _check_class_count(
    y: torch.Tensor, where: str, names: list[str] | None = None, labels: list[int] | None = None
) -> None:
    """At least two distinct labels: with one class there is nothing to classify.
    ``names``: a folder's class names; ``labels``: the label each class index stands for."""
    present = torch.unique(y).tolist()
    if len(present) == 1:
        label = present[0]
        if names:
            which = f"only {names[label]!r} holds images"
        else:
            which = f"every label is {labels[label] if labels else label}"
        raise DataError(f"{where} has 1 class; a classifier needs at least 2 ({which})")


def _npz_member(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except _READ_ERRORS as exc:
        if "allow_pickle" in str(exc):
            raise DataError(
                f"{path}['{key}'] is an object array (Python objects, e.g. ragged lists or "
                "strings), which is not loaded for safety; save a numeric array"
            ) from None
        raise DataError(f"{path}['{key}'] cannot be read ({_one_line(exc)})") from None


def load_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``x`` (or ``X``), ``y`` as class indices 0..K-1 and the label each index stands for
    (sorted), from a local .npz; clear errors for missing keys, bad shapes or labels."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except _READ_ERRORS as exc:
        if "pickle" in str(exc):  # numpy's message suggests allow_pickle, not ours to give
            raise DataError(
                f"{path}: not a readable .npz file (not a zip archive of arrays: pickled "
                "Python objects, or not a .npz file at all); pickled data is not loaded, "
                "for safety"
            ) from None
        raise DataError(f"{path}: not a readable .npz file ({_one_line(exc)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a .npy: one bare array
        raise DataError(
            f"{path} is a single .npy array; x and y must be arrays in a .npz archive "
            "(np.savez(path, x=x, y=y))"
        )
    with archive:
        keys = list(archive.files)
        x_key = "x" if "x" in keys else "X" if "X" in keys else None
        if x_key is None:
            raise DataError(f"{path} has no array 'x' (or 'X'); found keys: {keys}")
        if "y" not in keys:
            raise DataError(f"{path} has no array 'y' (class labels); found keys: {keys}")
        x = _as_samples(_npz_member(archive, x_key, path), f"{path}['{x_key}']")
        y, labels = _as_labels(_npz_member(archive, "y", path), len(x), f"{path}['y']")
    if len(x) == 0:
        raise DataError(f"{path} holds no samples")
    _check_class_count(y, f"{path}['y']", labels=labels)
    return x, y, labels


def _read_pgm(path: Path) -> np.ndarray:
    """Netpbm greyscale (P2 ascii, P5 binary), scaled to [0, 1]."""
    data = path.read_bytes()
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        end = pos
        while end < len(data) and not data[end : end + 1].isspace():
            end += 1
        if end == pos:
            raise DataError(f"{path}: truncated PGM header")
        tokens.append(data[pos:end])
        pos = end
    magic = tokens[0]
    if magic not in (b"P2", b"P5"):
        raise DataError(f"{path}: not a greyscale PGM (magic {magic!r}; expected P2 or P5)")
    try:
        width, height, maxval = int(tokens[1]), int(tokens[2]), int(tokens[3])
    except ValueError:
        raise DataError(f"{path}: PGM header has a non-number in {tokens[1:]}") from None
    if width < 1 or height < 1 or not 1 <= maxval <= 65535:
        raise DataError(
            f"{path}: PGM header says {width}x{height}, maxval {maxval}; "
            "expected a positive size and maxval 1..65535"
        )
    if magic == b"P5":
        dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
        body = data[pos + 1 : pos + 1 + width * height * dtype.itemsize]
        raw = np.frombuffer(body[: len(body) - len(body) % dtype.itemsize], dtype=dtype)
    else:
        raw = np.array(data[pos:].split()[: width * height], dtype=np.float64)
    if raw.size != width * height:
        raise DataError(f"{path}: PGM holds {raw.size} pixels, header says {width}x{height}")
    return raw.reshape(height, width).astype(np.float32) / maxval


def _read_image(path: Path) -> np.ndarray:
    """One image as (H, W) or (C, H, W) float32; a file that cannot be read is a DataError.

    Scaling: ``.npy`` values are kept as stored; PGM is divided by its maxval.
    Through Pillow, 8-bit images (modes 1, L, LA and palette images whose colours
    are all grey as one channel; converted to RGB, everything else) are divided by
    255. Greyscale images with more than 8 bits stay one
    channel, scaled by the mode's real range: I;16 (16-bit unsigned) by 65535,
    and mode I (32-bit signed) by 65535 when the file is a PNG (older Pillow opens
    16-bit PNGs as I; PNG holds at most 16 bits), otherwise kept as stored, like
    mode F (32-bit float), whose values have no fixed range.
    """
    try:
        return _decode_image(path)
    except DataError:
        raise
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an image file") from None
    except _READ_ERRORS as exc:
        if type(exc).__name__ == "UnidentifiedImageError":  # Pillow's; its message repeats the path
            raise DataError(f"{path}: not a readable image (Pillow cannot identify it)") from None
        raise DataError(f"{path}: {_one_line(exc)}") from None
    except Exception as exc:  # Pillow's DecompressionBombError and other decoder failures
        if type(exc).__module__.startswith("PIL"):
            raise DataError(f"{path}: {_one_line(exc)}") from None
        raise


def _decode_image(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc):  # numpy's message suggests allow_pickle, not ours to give
                raise DataError(
                    f"{path}: not a .npy array of numbers (pickled Python objects, or not a "
                    ".npy file at all); pickled data is not loaded, for safety"
                ) from None
            raise DataError(f"{path}: not a readable .npy file ({_one_line(exc)})") from None
        if not isinstance(arr, np.ndarray):  # a .npz archive saved under a .npy name
            arr.close()
            raise DataError(f"{path}: a .npz archive, not a single .npy array")
        if arr.ndim not in (2, 3):
            raise DataError(f"{path} has shape {arr.shape}; expected (H, W) or (C, H, W)")
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{path} has dtype {arr.dtype}; expected real numbers")
        return arr.astype(np.float32)
    if suffix == ".pgm":
        return _read_pgm(path)
    try:
        from PIL import Image
    except ImportError:
        raise DataError(
            f"{path}: reading {suffix} images needs Pillow, which is not installed; "
            "use .npy or .pgm files, or install pillow"
        ) from None
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            return np.asarray(img).astype(np.float32) / 65535.0
        if img.mode == "I":
            arr = np.asarray(img).astype(np.float32)
            return arr / 65535.0 if img.format == "PNG" else arr
        if img.mode == "F":
            return np.asarray(img).astype(np.float32)
        if img.mode in ("1", "L", "LA"):
            arr = np.asarray(img.convert("L"))  # alpha dropped, as for colour images
        else:
            arr = np.asarray(img.convert("RGB"))
            if img.mode in ("P", "PA") and (arr == arr[..., :1]).all():
                arr = arr[..., 0]  # a palette of greys: one channel, like mode L
    arr = arr.astype(np.float32) / 255.0
    return arr if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_folder(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images under ``path/<class>/``; classes sorted by name. All images must share one
    size; greyscale ones among colour ones get three equal channels."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders (expected {root}/<class>/<image>)")
    if len(classes) > MAX_CLASSES:
        raise DataError(
            f"{root} has {len(classes)} class subfolders; at most {MAX_CLASSES} are supported"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    shape: tuple[int, ...] | None = None
    for label, cls in enumerate(classes):
        try:
            entries = sorted((root / cls).iterdir())
        except OSError as exc:
            raise DataError(f"{root / cls}: cannot list the folder ({_one_line(exc)})") from None
        for file in entries:
            if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
                continue  # other files, and folders (or broken links) named like images
            arr = _read_image(file)
            if shape is None:
                first = shape = arr.shape
            elif arr.shape != shape:
                merged = _colour_shape(shape, arr.shape)
                if merged is None:
                    raise DataError(f"{file} has shape {arr.shape}; the first image had {first}")
                shape = merged
            images.append(arr)
            labels.append(label)
    if not images:
        supported = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"{root}: no images found in class subfolders (supported: {supported})")
    if shape is not None and any(a.shape != shape for a in images):
        # greyscale images among colour ones: each grey value in all three channels
        images = [
            a if a.shape == shape else np.broadcast_to(a.reshape(1, *shape[1:]), shape)
            for a in images
        ]
    x = _as_samples(np.stack(images), f"{root}")
    y = torch.tensor(labels, dtype=torch.int64)
    _check_class_count(y, f"{root}", classes)
    return x, y, classes


def _colour_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The colour shape (3, H, W) when one of two image shapes is greyscale, (H, W) or
    (1, H, W), and the other is colour of the same size: a folder may mix them (photos
    often do), the greys becoming three equal channels. None for any other mismatch."""
    for grey, colour in ((a, b), (b, a)):
        size = grey if len(grey) == 2 else grey[1:] if len(grey) == 3 and grey[0] == 1 else None
        if size is not None and len(colour) == 3 and colour[0] == 3 and colour[1:] == size:
            return colour
    return None


# ---- split, preprocessing, noise ----


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) index tensors; at least one training example is always kept."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(round(n * val_fraction), n - 1) if val_fraction > 0 else 0
    return perm[n_val:], perm[:n_val]


def feature_means(x: torch.Tensor, mode: str) -> torch.Tensor | None:
    """Means to subtract: per pixel (one per input position) or per channel.

    Point data ``(N, D)`` has no spatial axes, so each feature is its own channel.
    """
    if mode == "none":
        return None
    if mode == "per_pixel" or x.dim() == 2:
        return x.mean(dim=0, keepdim=True)
    if mode == "per_channel":
        dims = [0, *range(2, x.dim())]
        return x.mean(dim=dims, keepdim=True)
    raise ValueError(f"unknown preprocess {mode!r}; expected none, per_pixel or per_channel")


def add_input_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    """Training inputs plus N(0, std^2) noise, drawn on x's device from the seeded global RNG."""
    return x if std <= 0 else x + std * torch.randn_like(x)


def load_dataset(data_cfg: dict, seed: int) -> Dataset:
    """The data a validated ``data`` config section describes, split and preprocessed."""
    name = data_cfg["dataset"]
    classes: list[str] = []
    labels: list[int] | None = None
    if name == "digits":
        x, y = load_digits()
    elif name == "spirals":
        x, y = make_spirals(seed)
    elif name == "blobs":
        x, y = make_blobs(seed)
    elif name == "npz":
        x, y, labels = load_npz(data_cfg["path"])
        if labels == list(range(len(labels))):
            labels = None  # already 0..K-1: nothing to record
    elif name == "folder":
        x, y, classes = load_folder(data_cfg["path"])
    else:
        raise DataError(f"unknown dataset {name!r}")
    if len(x) < 2:
        raise DataError(f"{name} has {len(x)} sample(s); need at least 2")
    train_idx, val_idx = split_indices(len(x), data_cfg["val_fraction"], seed)
    if data_cfg.get("subset") is not None:
        train_idx = train_idx[: data_cfg["subset"]]
    x_train, y_train = x[train_idx], y[train_idx]
    x_val, y_val = x[val_idx], y[val_idx]
    means = feature_means(x_train, data_cfg["preprocess"])
    if means is not None:
        x_train, x_val = x_train - means, x_val - means
    # Labels were mapped to class indices over the whole file, before the split: a label
    # found only in the validation split has its class (and its output unit) too.
    num_classes = max(int(y.max()) + 1, len(classes))
    return Dataset(x_train, y_train, x_val, y_val, num_classes, name, classes, labels)


# ---- batching ----


class Batches:
    """Endless seeded mini-batch index stream over ``n`` examples, reshuffled each epoch.

    ``batch_size`` 0 or >= n gives full-batch GD (the same indices every step).
    A trailing batch of one is dropped when the batch size is larger, because
    batch norm cannot train on a single example.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str = "cpu"):
        if n < 1:
            raise ValueError("no training examples")
        self.n = n
        self.size = n if batch_size <= 0 or batch_size >= n else batch_size
        self.device = torch.device(device)
        # The shuffle runs where the data lives: a CPU permutation copied to a GPU would be
        # a pageable host->device copy, which waits for the queued training work once an epoch.
        self._gen = torch.Generator(device=self.device).manual_seed(seed)
        self.epoch = 0
        full, rest = divmod(n, self.size)
        self.steps_per_epoch = full + (1 if rest > 1 else 0)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.size == self.n:
            everything = torch.arange(self.n, device=self.device)
            while True:
                self.epoch += 1
                yield everything
        while True:
            self.epoch += 1
            perm = torch.randperm(self.n, generator=self._gen, device=self.device)
            for i in range(self.steps_per_epoch):
                yield perm[i * self.size : (i + 1) * self.size]
