# Long module: one loader per data set (moons, digits, MNIST, CIFAR-10), each with its file checks, official digests and fingerprint, read side by side.
"""Load and prepare the data sets a case trains on (digits, moons, mnist, cifar10).

`load_dataset(spec)` returns a `Dataset` of float32 inputs (images NHWC, vectors (N, D))
and int64 labels with a content fingerprint. Raw files are parsed by hand and checked
(magic numbers, sizes, label ranges); anything unexpected raises a one-line `DataError`
naming the file. Nothing is downloaded and nothing is cached here: the driver loads once
and shares the result through Ray's object store. No TensorFlow here.

Fixed splits:
- digits: scikit-learn's bundled 8x8 digits, pixels / 16. A permutation of all 1797
  examples by the legacy np.random.RandomState(0) (its stream is frozen across NumPy
  versions); the last 20 % (359) of that order are the test set, the rest train.
- moons: make_moons(samples, noise, random_state=0); the first 80 % train, the rest test.
- mnist, cifar10: the official train/test files.

Post-processing, in this order: class filter, train_size/test_size (first N), resize,
standardize; then the fingerprint is taken over the final arrays.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workers.errors import UserError, one_line as _one_line
from workers.settings import DataSpec


class DataError(UserError):
    """One-line, user-facing: names the file and what was expected."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A prepared data set; its arrays are read-only (as they are after a trip through Ray)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    fingerprint: str
    source: str
    identity: dict = field(default_factory=dict)  # see identify(): official or not, file digests

    def summary(self) -> dict:
        """Name, shapes, class count, fingerprint, source and identity: a JSON-able description."""
        return {
            "official": self.identity.get("official"),
            "files_digest": self.identity.get("digest"),
            "identity": self.identity,
            "name": self.name,
            "x_train": list(self.x_train.shape),
            "y_train": list(self.y_train.shape),
            "x_test": list(self.x_test.shape),
            "y_test": list(self.y_test.shape),
            "num_classes": self.num_classes,
            "fingerprint": self.fingerprint,
            "source": self.source,
        }


def fingerprint_arrays(*arrays, extra: str = "") -> str:
    """SHA-256 hex of `extra` and each array's dtype, shape and bytes (C order)."""
    digest = hashlib.sha256(extra.encode())
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"|{array.dtype.str}{array.shape}|".encode())
        digest.update(array.reshape(-1).view(np.uint8))  # a view: no copy of large arrays
    return digest.hexdigest()


def load_dataset(spec: DataSpec) -> Dataset:
    """Load spec.name from its source, apply the spec's post-processing, fingerprint it."""
    loaders = {"digits": _load_digits, "moons": _load_moons, "mnist": _load_mnist, "cifar10": _load_cifar10}
    if spec.name not in loaders:
        raise DataError(f"unknown data set {spec.name!r}; expected one of {', '.join(loaders)}")
    x_train, y_train, x_test, y_test, num_classes, source = loaders[spec.name](spec)
    x_train, y_train, x_test, y_test, num_classes = _prepare(spec, x_train, y_train, x_test, y_test, num_classes)
    arrays = []
    for array in (x_train, y_train, x_test, y_test):
        array = np.ascontiguousarray(array)
        array.flags.writeable = False
        arrays.append(array)
    # The final arrays say everything about the preparation; name and class count complete it.
    fingerprint = fingerprint_arrays(*arrays, extra=f"{spec.name}|{num_classes}")
    return Dataset(spec.name, *arrays, num_classes=num_classes, fingerprint=fingerprint, source=source,
                   identity=identify(spec.name, source))


# ---- post-processing --------------------------------------------------------------------


def _prepare(spec: DataSpec, x_train, y_train, x_test, y_test, num_classes: int):
    """Class filter, first-N sizes, resize, standardize (in that order)."""
    name = spec.name
    if spec.classes is not None:
        for label in spec.classes:
            if not 0 <= label < num_classes:
                raise DataError(f"{name}: classes: label {label} does not exist (labels are 0..{num_classes - 1})")
        lookup = np.full(num_classes, -1, dtype=np.int64)
        lookup[list(spec.classes)] = np.arange(len(spec.classes))
        keep_train, keep_test = lookup[y_train] >= 0, lookup[y_test] >= 0
        x_train, y_train = x_train[keep_train], lookup[y_train[keep_train]]
        x_test, y_test = x_test[keep_test], lookup[y_test[keep_test]]
        num_classes = len(spec.classes)
    for which, size, count in (("train_size", spec.train_size, len(y_train)), ("test_size", spec.test_size, len(y_test))):
        if size is not None and size > count:
            raise DataError(f"{name}: {which} {size} is more than the {count} examples available")
    if spec.train_size is not None:
        x_train, y_train = x_train[: spec.train_size], y_train[: spec.train_size]
    if spec.test_size is not None:
        x_test, y_test = x_test[: spec.test_size], y_test[: spec.test_size]
    if spec.resize is not None:
        if x_train.ndim != 4:
            raise DataError(f"{name}: resize applies to images only, but {name} examples have shape {x_train.shape[1:]}")
        x_train, x_test = _resize(x_train, spec.resize), _resize(x_test, spec.resize)
    if spec.standardize != "none":
        x_train, x_test = _standardize(x_train, x_test, spec.standardize)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), num_classes


def apply_input_quirks(settings, x_train: np.ndarray, x_test: np.ndarray):
    """The source studies' input mistakes, named in settings.quirks (applied per case, after
    load_dataset; the arrays are returned as they are when no such quirk is on).

    pixels_0_255: pixels * 255, rounded: AdversarialGrad/a.py resized MNIST with
      `imresize` (uint8, 0-255) and fed it without rescaling (needs data.standardize none).
    test_set_own_statistics: the test set standardised with its own statistics, as
      AdversarialGrad/b.py and c.py did. A standardised set re-standardised with its own
      statistics equals the raw set standardised with them (per pixel or global, up to the
      1e-7 guard), so this re-standardises the prepared test set.
    """
    quirks = settings.quirks
    if "pixels_0_255" in quirks:
        x_train = np.clip(np.round(x_train.astype(np.float64) * 255.0), 0, 255).astype(np.float32)
        x_test = np.clip(np.round(x_test.astype(np.float64) * 255.0), 0, 255).astype(np.float32)
    if "test_set_own_statistics" in quirks:
        x_test, _ = _standardize(x_test, x_test, settings.data.standardize)
    return x_train, x_test


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, H, W, C) float32 images to (N, size, size, C), one image at a time."""
    import cv2

    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, images.shape[3]), dtype=np.float32)
    for i, image in enumerate(images):
        # cv2 drops a trailing channel axis of length 1; reshape restores it.
        out[i] = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR).reshape(size, size, -1)
    return out


def _standardize(x_train: np.ndarray, x_test: np.ndarray, how: str):
    """Subtract the training mean and divide by its std (+1e-7), per pixel or global."""
    axis = 0 if how == "per_pixel" else None
    # float64 statistics, computed and applied in chunks: a float64 copy of all of CIFAR-10
    # would need 1.2 GB.
    mean = x_train.mean(axis=axis, dtype=np.float64)
    squares = sum(((chunk.astype(np.float64) - mean) ** 2).sum(axis=axis) for chunk in _chunks(x_train))
    count = len(x_train) if axis == 0 else x_train.size
    scale = np.sqrt(squares / count) + 1e-7
    return _apply_standardize(x_train, mean, scale), _apply_standardize(x_test, mean, scale)


def _apply_standardize(x: np.ndarray, mean, scale) -> np.ndarray:
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, len(x), _CHUNK):
        out[start: start + _CHUNK] = (x[start: start + _CHUNK].astype(np.float64) - mean) / scale
    return out


_CHUNK = 4096


def _chunks(x: np.ndarray):
    return (x[start: start + _CHUNK] for start in range(0, len(x), _CHUNK))


# ---- digits and moons (scikit-learn, offline) -------------------------------------------


def _load_digits(spec: DataSpec):
    x, y = _digits_arrays()
    x = (x / 16.0).astype(np.float32)[..., None]
    y = y.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(y))
    n_test = int(round(0.2 * len(y)))
    train, test = order[:-n_test], order[-n_test:]
    return x[train], y[train], x[test], y[test], 10, "sklearn load_digits"


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1797 8x8 images, 0..16, and their labels), read from the
    file `sklearn.datasets.load_digits` reads, without importing scikit-learn (about 2 s of
    imports a driver would pay before every study); the same numbers (tests/test_data.py)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data 'digits' is scikit-learn's bundled set: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",")
    except (OSError, ValueError) as error:
        raise DataError(f"data 'digits': cannot read {path}: {error}") from None
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _load_moons(spec: DataSpec):
    x, y = make_moons(spec.samples, spec.noise, seed=0)
    x, y = x.astype(np.float32), y.astype(np.int64)
    n_train = int(0.8 * spec.samples)
    source = f"sklearn make_moons(n_samples={spec.samples}, noise={spec.noise}, random_state=0)"
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], 2, source


def make_moons(samples: int, noise: float | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's `make_moons(n_samples=samples, noise=noise, random_state=seed)`, the same
    draws in the same order (checked against scikit-learn in tests/test_data.py) without
    importing scikit-learn: two interleaved half circles, shuffled, plus Gaussian noise."""
    generator = np.random.RandomState(seed)
    n_out = samples // 2
    n_in = samples - n_out
    outer_x, outer_y = np.cos(np.linspace(0, np.pi, n_out)), np.sin(np.linspace(0, np.pi, n_out))
    inner_x, inner_y = 1 - np.cos(np.linspace(0, np.pi, n_in)), 1 - np.sin(np.linspace(0, np.pi, n_in)) - 0.5
    x = np.vstack([np.append(outer_x, inner_x), np.append(outer_y, inner_y)]).T
    y = np.hstack([np.zeros(n_out, dtype=np.intp), np.ones(n_in, dtype=np.intp)])
    order = np.arange(samples)
    generator.shuffle(order)
    x, y = x[order], y[order]
    if noise is not None:
        x += generator.normal(scale=noise, size=x.shape)
    return x, y


# ---- shared helpers ---------------------------------------------------------------------


def _search_dirs(spec: DataSpec, folder: str) -> list[Path]:
    """spec.path, or the usual places: ./data/NAME, ~/data/NAME (what cluster.yaml prepares on
    every node) and ~/.keras/datasets."""
    if spec.path is not None:
        return [Path(spec.path).expanduser()]
    return [Path("data", folder).absolute(), Path.home() / "data" / folder, Path.home() / ".keras" / "datasets"]


def _where(paths: list[Path]) -> str:
    return " or ".join(str(p) for p in paths)


def _node() -> str:
    """The machine that looked (the data may live on a cluster's head, not on the laptop)."""
    import platform

    return f"looked on node {platform.node()}"


def _pixels(data: np.ndarray) -> np.ndarray:
    """uint8 pixels -> C-contiguous float32 in [0, 1] (converting in C order is much faster
    than a later copy of a transposed float array)."""
    out = data.astype(np.float32, order="C")
    out /= np.float32(255)
    return out


def _check_labels(labels: np.ndarray, what: str, dataset: str = "mnist") -> None:
    if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        bad = int(labels.max()) if int(labels.max()) > 9 else int(labels.min())
        raise DataError(f"{dataset}: {what}: expected labels 0..9, found {bad}")


# ---- MNIST ------------------------------------------------------------------------------

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # unsigned bytes, 3 dims / 1 dim
_MNIST_EXPECTED = "expected train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally .gz) or mnist.npz"


def _load_mnist(spec: DataSpec):
    places = _search_dirs(spec, "mnist")
    for place in places:
        if place.is_file():
            if place.suffix != ".npz":
                raise DataError(f"mnist: {place}: expected a folder with the IDX files or a mnist.npz file")
            return _mnist_npz(place)
        if not place.is_dir():
            continue
        found = {key: _idx_file(place, base) for key, base in _IDX_FILES.items()}
        if any(found.values()):
            missing = [_IDX_FILES[key] for key, path in found.items() if path is None]
            if missing:
                raise DataError(f"mnist: {place}: missing {', '.join(missing)} (or .gz) next to the other IDX files")
            return _mnist_idx(found)
        if (place / "mnist.npz").is_file():
            return _mnist_npz(place / "mnist.npz")
    raise DataError(f"mnist: no data found at {_where(places)} ({_MNIST_EXPECTED}); {_node()}")


def _idx_file(folder: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"mnist: {path}: not a readable gzip file ({_one_line(error)})") from None


def _parse_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes, checking its magic number, dimensions and length."""
    data = _read_maybe_gzip(path)
    kind = "images" if ndim == 3 else "labels"
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"mnist: {path}: {len(data)} bytes is shorter than the {header}-byte IDX {kind} header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"mnist: {path}: expected magic number 0x{magic:08x} (IDX {kind}), found 0x{found:08x}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and dims[1:] != (28, 28):
        raise DataError(f"mnist: {path}: expected 28x28 images, found {dims[1]}x{dims[2]}")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"mnist: {path}: expected {expected} bytes for dimensions {list(dims)}, found {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _mnist_idx(files: dict):
    images = {key: _parse_idx(files[key], _IDX_IMAGES, 3) for key in ("x_train", "x_test")}
    labels = {key: _parse_idx(files[key], _IDX_LABELS, 1) for key in ("y_train", "y_test")}
    for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test")):
        if len(images[x_key]) != len(labels[y_key]):
            raise DataError(
                f"mnist: {files[y_key]}: expected {len(images[x_key])} labels to match {files[x_key].name}, found {len(labels[y_key])}"
            )
        _check_labels(labels[y_key], str(files[y_key]))
    source = str(files["x_train"].parent)
    return (_pixels(images["x_train"])[..., None], labels["y_train"].astype(np.int64),
            _pixels(images["x_test"])[..., None], labels["y_test"].astype(np.int64), 10, source)


def _mnist_npz(path: Path):
    """Keras's cached mnist.npz (x_train, y_train, x_test, y_test), read without pickle."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in _IDX_FILES if key not in npz.files]
            if missing:
                raise DataError(f"mnist: {path}: missing arrays {', '.join(missing)} (expected x_train, y_train, x_test, y_test)")
            arrays = {key: npz[key] for key in _IDX_FILES}
    except DataError:
        raise
    except Exception as error:  # bad zip, object arrays refused by allow_pickle=False, ...
        raise DataError(f"mnist: {path}: not a readable mnist.npz ({_one_line(error)})") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"mnist: {path}: expected x_{split} as uint8 (N, 28, 28), found {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
            raise DataError(f"mnist: {path}: expected y_{split} as {len(x)} integer labels, found {y.dtype} {y.shape}")
        _check_labels(y, f"{path} y_{split}")
    return (_pixels(arrays["x_train"])[..., None], arrays["y_train"].astype(np.int64),
            _pixels(arrays["x_test"])[..., None], arrays["y_test"].astype(np.int64), 10, str(path))


# ---- CIFAR-10 ---------------------------------------------------------------------------

_CIFAR_BIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
_CIFAR_PY_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte + channel-major 3x32x32 pixels
# The python version is pickled, and unpickling runs arbitrary code, so its files are
# unpickled only after their MD5 matches these official digests (as listed by
# torchvision's CIFAR10 dataset) or, for the archive, the digest published on the CIFAR page.
_CIFAR_PY_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
_CIFAR_PY_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # cifar-10-python.tar.gz
_CIFAR_EXPECTED = "expected cifar-10-batches-bin/ with data_batch_1.bin ... test_batch.bin or cifar-10-binary.tar.gz; the python version cifar-10-batches-py/ or cifar-10-python.tar.gz is read only if it matches the official digests"


def _load_cifar10(spec: DataSpec):
    places = _search_dirs(spec, "cifar10")
    for place in places:
        if place.is_file():
            return _cifar_archive(place)
        if not place.is_dir():
            continue
        # Prefer the binary version: it needs no unpickling.
        for folder in (place, place / "cifar-10-batches-bin"):
            if any((folder / name).is_file() for name in _CIFAR_BIN_FILES):
                return _cifar_binary(_FolderReader(folder))
        if (place / "cifar-10-binary.tar.gz").is_file():
            return _cifar_archive(place / "cifar-10-binary.tar.gz")
        for folder in (place, place / "cifar-10-batches-py"):
            if any((folder / name).is_file() for name in _CIFAR_PY_FILES):
                return _cifar_python_folder(folder)
        # cifar-10-batches-py.tar.gz is the name Keras gives the same archive in its cache.
        for name in ("cifar-10-python.tar.gz", "cifar-10-batches-py.tar.gz"):
            if (place / name).is_file():
                return _cifar_archive(place / name)
    raise DataError(f"cifar10: no data found at {_where(places)} ({_CIFAR_EXPECTED}); {_node()}")


class _FolderReader:
    """Batch files of an extracted folder, by file name."""

    def __init__(self, folder: Path):
        self.folder, self.source = folder, str(folder)

    def label(self, name: str) -> str:
        return str(self.folder / name)

    def read(self, name: str) -> bytes:
        path = self.folder / name
        if not path.is_file():
            raise DataError(f"cifar10: {self.folder}: missing {name} (expected {', '.join(_CIFAR_BIN_FILES)})")
        return path.read_bytes()


class _ArchiveReader:
    """Batch files inside a .tar.gz, by file name; read in memory (nothing is extracted)."""

    def __init__(self, path: Path, tar: tarfile.TarFile):
        self.path, self.tar, self.source = path, tar, str(path)
        self.members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

    def label(self, name: str) -> str:
        member = self.members.get(name)
        return f"{self.path}:{member.name if member else name}"

    def read(self, name: str) -> bytes:
        if name not in self.members:
            raise DataError(f"cifar10: {self.path}: missing {name} in the archive")
        try:
            return self.tar.extractfile(self.members[name]).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise DataError(f"cifar10: {self.label(name)}: cannot read it from the archive ({_one_line(error)})") from None


def _cifar_archive(path: Path):
    """cifar-10-binary.tar.gz (read directly) or cifar-10-python.tar.gz (MD5-verified first)."""
    if not path.name.endswith((".tar.gz", ".tgz")):
        raise DataError(f"cifar10: {path}: expected a folder or a .tar.gz archive ({_CIFAR_EXPECTED})")
    # Listing a tar runs no code; the python version's MD5 is checked before any unpickling.
    try:
        with tarfile.open(path, "r:gz") as tar:
            reader = _ArchiveReader(path, tar)
            if any(name in reader.members for name in _CIFAR_BIN_FILES):
                return _cifar_binary(reader)
            if any(name in reader.members for name in _CIFAR_PY_FILES):
                digest = _md5(path)
                if digest != _CIFAR_PY_ARCHIVE_MD5:
                    raise DataError(
                        f"cifar10: {path}: MD5 {digest} is not the official cifar-10-python.tar.gz digest "
                        f"{_CIFAR_PY_ARCHIVE_MD5}; refusing to unpickle it (use the binary version cifar-10-binary.tar.gz)"
                    )
                return _cifar_python(reader)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DataError(f"cifar10: {path}: not a readable .tar.gz archive ({_one_line(error)})") from None
    raise DataError(f"cifar10: {path}: no CIFAR-10 batch files in the archive ({_CIFAR_EXPECTED})")


def _cifar_binary(reader):
    """The binary version: fixed-size records, label byte then R, G, B planes of 32x32."""
    parts = {}
    for name in _CIFAR_BIN_FILES:
        data = reader.read(name)
        if len(data) == 0 or len(data) % _CIFAR_RECORD:
            raise DataError(
                f"cifar10: {reader.label(name)}: {len(data)} bytes is not a whole number of {_CIFAR_RECORD}-byte "
                f"records (1 label byte + 3072 pixel bytes)"
            )
        records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
        _check_labels(records[:, 0], reader.label(name), "cifar10")
        parts[name] = records
    train = np.concatenate([parts[name] for name in _CIFAR_BIN_FILES[:5]])
    test = parts["test_batch.bin"]
    return (*_cifar_split(train[:, 1:], train[:, 0]), *_cifar_split(test[:, 1:], test[:, 0]), 10, reader.source)


def _cifar_split(pixels: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """Channel-major rows of 3072 bytes -> float32 NHWC in [0, 1]; labels int64."""
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _pixels(images), np.asarray(labels, dtype=np.int64)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cifar_python_folder(folder: Path):
    """An extracted python version (or Keras's cache): every file is verified before unpickling."""
    for name in _CIFAR_PY_FILES:
        path = folder / name
        if not path.is_file():
            raise DataError(f"cifar10: {folder}: missing {name} (expected {', '.join(_CIFAR_PY_FILES)})")
        digest = _md5(path)
        if digest != _CIFAR_PY_MD5[name]:
            raise DataError(
                f"cifar10: {path}: MD5 {digest} is not the official digest {_CIFAR_PY_MD5[name]}; refusing to "
                f"unpickle it (use the binary version: cifar-10-binary.tar.gz or cifar-10-batches-bin/)"
            )
    return _cifar_python(_FolderReader(folder))


def _cifar_python(reader):
    """Unpickle the (already verified) python-version batches: dicts of 'data' and 'labels'."""
    splits = []
    for names in (_CIFAR_PY_FILES[:5], _CIFAR_PY_FILES[5:]):
        pixels, labels = [], []
        for name in names:
            # latin1: the batches were pickled by Python 2 with numpy arrays inside.
            batch = pickle.load(io.BytesIO(reader.read(name)), encoding="latin1")
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072 or len(batch["labels"]) != len(data):
                raise DataError(f"cifar10: {reader.label(name)}: expected 'data' (N, 3072) and N 'labels', found {data.shape}")
            pixels.append(data)
            labels.extend(batch["labels"])
        splits.extend(_cifar_split(np.concatenate(pixels), labels))
    _check_labels(splits[1], reader.source, "cifar10")
    _check_labels(splits[3], reader.source, "cifar10")
    return (*splits, 10, reader.source)


# ---- identity: is this the official data set? --------------------------------------------

# Published digests of the files as distributed. MNIST: the MD5s of the four gzipped IDX files
# (as listed by torchvision and the MNIST mirrors) and the SHA-256 of Keras's mnist.npz (its
# get_file hash). CIFAR-10: the archives' MD5s from the CIFAR page and the python batches'
# MD5s (as listed by torchvision). Uncompressed IDX files and the extracted binary batches have
# no published digest: they are recorded by digest but not called official.
OFFICIAL_DIGESTS = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
        "mnist.npz": "sha256:731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    },
    "cifar10": {
        "cifar-10-binary.tar.gz": "md5:c32a1d4ab5d03f1284b67883e8d87530",
        "cifar-10-python.tar.gz": f"md5:{_CIFAR_PY_ARCHIVE_MD5}",
        "cifar-10-batches-py.tar.gz": f"md5:{_CIFAR_PY_ARCHIVE_MD5}",  # Keras's name for the same archive
        **{name: f"md5:{digest}" for name, digest in _CIFAR_PY_MD5.items()},
    },
}
_EMBEDDED = {"digits": "scikit-learn's bundled digits (packaged with the library)",
             "moons": "generated by scikit-learn's make_moons (packaged generator)"}


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"{algorithm}:{digest.hexdigest()}"


def _files_read(name: str, source: str) -> list[Path]:
    """The raw files a loader read for `source` (a folder or an archive/npz file)."""
    place = Path(source)
    if place.is_file():
        return [place]
    if name == "mnist":
        return [path for base in _IDX_FILES.values() if (path := _idx_file(place, base)) is not None]
    for names in (_CIFAR_BIN_FILES, _CIFAR_PY_FILES):
        found = [place / n for n in names if (place / n).is_file()]
        if found:
            return found
    return []


def identify(name: str, source: str) -> dict:
    """Which data this is: {"name", "official", "files": {file: digest}, "digest", "reason"}.

    official is True when every raw file read has a published digest and matches it; the
    embedded sets (digits, moons) are trivially the packaged ones. digest is a short hash of
    the file digests (one value to compare runs by)."""
    if name in _EMBEDDED:
        return {"name": name, "official": True, "files": {}, "digest": name, "reason": _EMBEDDED[name]}
    published = OFFICIAL_DIGESTS.get(name, {})
    files, problems = {}, []
    for path in _files_read(name, source):
        expected = published.get(path.name)
        algorithm = expected.split(":", 1)[0] if expected else "sha256"
        files[path.name] = _file_digest(path, algorithm)
        if expected is None:
            problems.append(f"{path.name} has no published digest")
        elif files[path.name] != expected:
            problems.append(f"{path.name} {files[path.name]} is not the official {expected}")
    if not files:
        problems.append(f"no raw files found at {source}")
    combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    reason = "; ".join(problems) if problems else "every file matches its published digest"
    return {"name": name, "official": not problems, "files": files, "digest": combined, "reason": reason}
