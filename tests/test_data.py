"""workers.data: built-in sets, hand-written raw files (IDX, npz, CIFAR), post-processing."""

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from workers import data
from workers.data import DataError, fingerprint_arrays, load_dataset
from workers.settings import DataSpec


@pytest.fixture(autouse=True)
def no_real_data(tmp_path, monkeypatch):
    """Never find the machine's real ./data or ~/.keras: run in an empty folder and home."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)


def assert_one_line_naming(error: DataError, name: str):
    message = str(error.value)
    assert "\n" not in message
    assert name in message, message


# ---- digits and moons -------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataSpec(name="digits"))


def test_digits_shapes_dtypes_labels(digits):
    assert digits.x_train.shape == (1438, 8, 8, 1) and digits.x_test.shape == (359, 8, 8, 1)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.y_test.dtype == np.int64 and digits.num_classes == 10
    assert set(np.unique(digits.y_train)) == set(range(10)) and set(np.unique(digits.y_test)) <= set(range(10))
    assert 0.0 == digits.x_train.min() and digits.x_train.max() == 1.0
    assert not digits.x_train.flags.writeable
    summary = digits.summary()
    assert summary["x_train"] == [1438, 8, 8, 1] and summary["fingerprint"] == digits.fingerprint
    assert summary["name"] == "digits" and summary["source"] and summary["num_classes"] == 10


def test_digits_split_is_the_documented_permutation(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    order = np.random.RandomState(0).permutation(1797)
    np.testing.assert_array_equal(digits.y_test, raw.target[order[-359:]])
    np.testing.assert_array_equal(digits.x_train[:, :, :, 0], (raw.images[order[:1438]] / 16).astype(np.float32))


def test_fingerprint_stable_and_sensitive(digits):
    again = load_dataset(DataSpec(name="digits"))
    assert again.fingerprint == digits.fingerprint and len(digits.fingerprint) == 64
    smaller = load_dataset(DataSpec(name="digits", train_size=100))
    assert smaller.fingerprint != digits.fingerprint
    a = np.arange(6, dtype=np.float32)
    assert fingerprint_arrays(a) == fingerprint_arrays(a.copy())
    assert fingerprint_arrays(a) != fingerprint_arrays(a.reshape(2, 3))
    assert fingerprint_arrays(a) != fingerprint_arrays(a.astype(np.float64))
    assert fingerprint_arrays(a) != fingerprint_arrays(a, extra="x")


@pytest.mark.parametrize("samples,noise,seed", [(200, 0.2, 0), (1000, 0.1, 0), (7, None, 3), (1, 0.5, 0)])
def test_make_moons_draws_what_scikit_learn_draws(samples, noise, seed):
    """workers.data.make_moons skips scikit-learn's imports; scikit-learn is the oracle."""
    from sklearn.datasets import make_moons as sklearn_moons

    from workers.data import make_moons

    x, y = make_moons(samples, noise, seed)
    want_x, want_y = sklearn_moons(n_samples=samples, noise=noise, random_state=seed)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)


def test_digits_read_without_importing_scikit_learn():
    import subprocess
    import sys

    code = ("import sys; from workers.data import load_dataset, DataSpec; d = load_dataset(DataSpec(name='digits')); "
            "assert 'sklearn' not in sys.modules, 'scikit-learn was imported'; print(d.x_train.shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "(1438, 8, 8, 1)" in done.stdout, done.stderr[-2000:]


def test_moons():
    moons = load_dataset(DataSpec(name="moons", samples=50, noise=0.2))
    assert moons.x_train.shape == (40, 2) and moons.x_test.shape == (10, 2)
    assert moons.x_train.dtype == np.float32 and moons.y_train.dtype == np.int64
    assert moons.num_classes == 2 and set(np.unique(moons.y_train)) == {0, 1}
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=50, noise=0.2, random_state=0)
    np.testing.assert_array_equal(moons.x_test, x[40:].astype(np.float32))
    np.testing.assert_array_equal(moons.y_train, y[:40])
    assert load_dataset(DataSpec(name="moons", samples=50, noise=0.2)).fingerprint == moons.fingerprint
    with pytest.raises(DataError, match="images only"):
        load_dataset(DataSpec(name="moons", resize=4))


# ---- post-processing --------------------------------------------------------------------


def test_classes_and_sizes(digits):
    got = load_dataset(DataSpec(name="digits", classes=(7, 2), train_size=30, test_size=5))
    keep = np.isin(digits.y_train, [7, 2])
    np.testing.assert_array_equal(got.x_train, digits.x_train[keep][:30])
    np.testing.assert_array_equal(got.y_train, np.where(digits.y_train[keep] == 7, 0, 1)[:30])
    keep_test = np.isin(digits.y_test, [7, 2])
    np.testing.assert_array_equal(got.y_test, np.where(digits.y_test[keep_test] == 7, 0, 1)[:5])
    assert got.num_classes == 2 and got.y_train.dtype == np.int64
    with pytest.raises(DataError, match="label 12"):
        load_dataset(DataSpec(name="digits", classes=(1, 12)))
    with pytest.raises(DataError, match="train_size 5000"):
        load_dataset(DataSpec(name="digits", train_size=5000))


def bilinear_oracle(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear with half-pixel centres and edge clamping (OpenCV's INTER_LINEAR), in numpy."""

    def taps(n_in):
        src = (np.arange(size) + 0.5) * n_in / size - 0.5
        src = np.clip(src, 0, n_in - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, src - low

    r0, r1, fr = taps(image.shape[0])
    c0, c1, fc = taps(image.shape[1])
    img = image.astype(np.float64)
    top = img[r0][:, c0] * (1 - fc)[None, :, None] + img[r0][:, c1] * fc[None, :, None]
    bottom = img[r1][:, c0] * (1 - fc)[None, :, None] + img[r1][:, c1] * fc[None, :, None]
    return top * (1 - fr)[:, None, None] + bottom * fr[:, None, None]


@pytest.mark.parametrize("size", [16, 5])
def test_resize(digits, size):
    got = load_dataset(DataSpec(name="digits", train_size=4, test_size=2, resize=size))
    assert got.x_train.shape == (4, size, size, 1) and got.x_test.shape == (2, size, size, 1)
    for i in range(4):
        np.testing.assert_allclose(got.x_train[i], bilinear_oracle(digits.x_train[i], size), atol=1e-5)


def test_resize_keeps_three_channels(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    write_cifar_folder(tmp_path / "cifar-10-batches-bin", images, np.arange(8) % 10)
    got = load_dataset(DataSpec(name="cifar10", path=str(tmp_path), resize=20))
    assert got.x_train.shape == (6, 20, 20, 3)
    np.testing.assert_allclose(got.x_train[3], bilinear_oracle(images[3] / 255, 20), atol=1e-5)


@pytest.mark.parametrize("chunk", [4096, 7])
def test_standardize_per_pixel_and_global(monkeypatch, chunk):
    monkeypatch.setattr(data, "_CHUNK", chunk)  # statistics are accumulated in chunks
    base = load_dataset(DataSpec(name="digits", classes=(0, 1), resize=6))
    train, test = base.x_train.astype(np.float64), base.x_test.astype(np.float64)
    got = load_dataset(DataSpec(name="digits", classes=(0, 1), resize=6, standardize="per_pixel"))
    mean, std = train.mean(axis=0), train.std(axis=0)
    np.testing.assert_allclose(got.x_train, (train - mean) / (std + 1e-7), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.x_test, (test - mean) / (std + 1e-7), rtol=1e-5, atol=1e-5)
    got = load_dataset(DataSpec(name="digits", classes=(0, 1), resize=6, standardize="global"))
    mean, std = train.mean(), train.std()
    np.testing.assert_allclose(got.x_test, (test - mean) / (std + 1e-7), rtol=1e-5, atol=1e-6)
    assert abs(float(got.x_train.mean())) < 1e-5 and abs(float(got.x_train.std()) - 1) < 1e-4
    assert got.x_train.dtype == np.float32


# ---- MNIST ------------------------------------------------------------------------------


def idx_images(images: np.ndarray, magic: int = 0x803) -> bytes:
    return struct.pack(">IIII", magic, *images.shape) + images.tobytes()


def idx_labels(labels: np.ndarray, magic: int = 0x801) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


@pytest.fixture
def mnist_arrays():
    rng = np.random.default_rng(5)
    return {
        "x_train": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 7).astype(np.uint8),
        "x_test": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 3).astype(np.uint8),
    }


def write_idx(folder, arrays, gz=False, overrides=None):
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {
        "train-images-idx3-ubyte": idx_images(arrays["x_train"]),
        "train-labels-idx1-ubyte": idx_labels(arrays["y_train"]),
        "t10k-images-idx3-ubyte": idx_images(arrays["x_test"]),
        "t10k-labels-idx1-ubyte": idx_labels(arrays["y_test"]),
    }
    blobs.update(overrides or {})
    for name, blob in blobs.items():
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)
    return folder


def assert_mnist_matches(got, arrays):
    assert got.x_train.shape == (7, 28, 28, 1) and got.x_test.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(got.x_train[..., 0], arrays["x_train"].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(got.x_test[..., 0], arrays["x_test"].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(got.y_train, arrays["y_train"])
    np.testing.assert_array_equal(got.y_test, arrays["y_test"])
    assert got.y_train.dtype == np.int64 and got.num_classes == 10


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, mnist_arrays, gz):
    folder = write_idx(tmp_path / "raw", mnist_arrays, gz=gz)
    got = load_dataset(DataSpec(name="mnist", path=str(folder)))
    assert_mnist_matches(got, mnist_arrays)
    assert got.x_train[0, 3, 4, 0] == np.float32(mnist_arrays["x_train"][0, 3, 4]) / np.float32(255)


def test_mnist_default_location(tmp_path, mnist_arrays):
    write_idx(tmp_path / "data" / "mnist", mnist_arrays)
    assert_mnist_matches(load_dataset(DataSpec(name="mnist")), mnist_arrays)


def test_mnist_npz(tmp_path, mnist_arrays):
    keras = tmp_path / "home" / ".keras" / "datasets"
    keras.mkdir(parents=True)
    np.savez(keras / "mnist.npz", **mnist_arrays)
    assert_mnist_matches(load_dataset(DataSpec(name="mnist")), mnist_arrays)
    assert_mnist_matches(load_dataset(DataSpec(name="mnist", path=str(keras / "mnist.npz"))), mnist_arrays)


def test_mnist_npz_errors(tmp_path, mnist_arrays):
    bad = dict(mnist_arrays, y_test=np.array([object(), 1, 2], dtype=object))
    np.savez(tmp_path / "objects.npz", **bad)
    with pytest.raises(DataError) as error:
        load_dataset(DataSpec(name="mnist", path=str(tmp_path / "objects.npz")))
    assert_one_line_naming(error, "objects.npz")
    np.savez(tmp_path / "short.npz", x_train=mnist_arrays["x_train"])
    with pytest.raises(DataError, match="missing arrays") as error:
        load_dataset(DataSpec(name="mnist", path=str(tmp_path / "short.npz")))
    assert_one_line_naming(error, "short.npz")


@pytest.mark.parametrize(
    "broken, override, needle",
    [
        ("train-images-idx3-ubyte", lambda a: idx_images(a["x_train"])[:-1], "expected 5504 bytes"),
        ("t10k-labels-idx1-ubyte", lambda a: idx_labels(a["y_test"], magic=0x803), "magic number 0x00000801"),
        ("t10k-images-idx3-ubyte", lambda a: idx_images(a["x_test"], magic=0x801), "magic number 0x00000803"),
        ("train-labels-idx1-ubyte", lambda a: idx_labels(a["y_train"][:6]), "expected 7 labels"),
        ("train-images-idx3-ubyte", lambda a: idx_images(a["x_train"][:, :27, :27].copy()), "28x28"),
        ("train-labels-idx1-ubyte", lambda a: idx_labels(np.full(7, 12)), "labels 0..9"),
        ("t10k-labels-idx1-ubyte", lambda a: b"\x00\x00", "header"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_bad_idx(tmp_path, mnist_arrays, broken, override, needle, gz):
    folder = write_idx(tmp_path / "raw", mnist_arrays, gz=gz, overrides={broken: override(mnist_arrays)})
    with pytest.raises(DataError, match=needle) as error:
        load_dataset(DataSpec(name="mnist", path=str(folder)))
    assert_one_line_naming(error, broken)


def test_mnist_truncated_gzip_and_missing_file(tmp_path, mnist_arrays):
    folder = write_idx(tmp_path / "raw", mnist_arrays, gz=True)
    blob = (folder / "train-images-idx3-ubyte.gz").read_bytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="gzip") as error:
        load_dataset(DataSpec(name="mnist", path=str(folder)))
    assert_one_line_naming(error, "train-images-idx3-ubyte.gz")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing") as error:
        load_dataset(DataSpec(name="mnist", path=str(folder)))
    assert_one_line_naming(error, "t10k-labels-idx1-ubyte")


def test_mnist_nothing_found(tmp_path):
    with pytest.raises(DataError, match="mnist: no data found at") as error:
        load_dataset(DataSpec(name="mnist", path=str(tmp_path / "nowhere")))
    assert_one_line_naming(error, str(tmp_path / "nowhere"))


# ---- CIFAR-10 ---------------------------------------------------------------------------

BIN_NAMES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
PY_NAMES = [name[:-4] for name in BIN_NAMES]
# images per file: 6 training images spread over the five batches, 2 test images
BATCH_SIZES = [2, 1, 1, 1, 1, 2]


def cifar_records(images: np.ndarray, labels) -> bytes:
    """The binary format: per image, a label byte then the R, G and B 32x32 planes."""
    return b"".join(bytes([int(label)]) + image.transpose(2, 0, 1).tobytes() for image, label in zip(images, labels))


def cifar_blobs(images, labels) -> dict:
    bounds = np.cumsum([0] + BATCH_SIZES)
    return {name: cifar_records(images[a:b], labels[a:b]) for name, a, b in zip(BIN_NAMES, bounds, bounds[1:])}


def write_cifar_folder(folder, images, labels, overrides=None):
    folder.mkdir(parents=True, exist_ok=True)
    blobs = cifar_blobs(images, labels)
    blobs.update(overrides or {})
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    return folder


def write_tar(path, members: dict):
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def cifar_arrays():
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    images[0, 5, 7] = (10, 20, 30)  # a known (r, g, b) at row 5, column 7
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    return images, labels


def assert_cifar_matches(got, images, labels):
    assert got.x_train.shape == (6, 32, 32, 3) and got.x_test.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(got.x_train[0, 5, 7], np.array([10, 20, 30], np.float32) / np.float32(255))
    np.testing.assert_array_equal(got.x_train, images[:6].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(got.x_test, images[6:].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(got.y_train, labels[:6])
    np.testing.assert_array_equal(got.y_test, labels[6:])
    assert got.y_train.dtype == np.int64 and got.num_classes == 10


def test_cifar_binary_folder(tmp_path, cifar_arrays):
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-bin", *cifar_arrays)
    assert_cifar_matches(load_dataset(DataSpec(name="cifar10", path=str(tmp_path))), *cifar_arrays)
    assert_cifar_matches(load_dataset(DataSpec(name="cifar10", path=str(folder))), *cifar_arrays)


def test_cifar_binary_archive(tmp_path, cifar_arrays):
    blobs = cifar_blobs(*cifar_arrays)
    archive = write_tar(tmp_path / "cifar-10-binary.tar.gz", {f"cifar-10-batches-bin/{n}": b for n, b in blobs.items()})
    assert_cifar_matches(load_dataset(DataSpec(name="cifar10", path=str(archive))), *cifar_arrays)
    got = load_dataset(DataSpec(name="cifar10", path=str(tmp_path)))
    assert_cifar_matches(got, *cifar_arrays)
    assert got.source == str(archive)


def test_cifar_default_location(tmp_path, cifar_arrays):
    write_cifar_folder(tmp_path / "data" / "cifar10" / "cifar-10-batches-bin", *cifar_arrays)
    assert_cifar_matches(load_dataset(DataSpec(name="cifar10")), *cifar_arrays)


def test_cifar_truncated_record(tmp_path, cifar_arrays):
    blob = cifar_blobs(*cifar_arrays)["data_batch_3.bin"]
    folder = write_cifar_folder(tmp_path / "bin", *cifar_arrays, overrides={"data_batch_3.bin": blob[:-5]})
    with pytest.raises(DataError, match="3073-byte records") as error:
        load_dataset(DataSpec(name="cifar10", path=str(folder)))
    assert_one_line_naming(error, "data_batch_3.bin")
    archive = write_tar(tmp_path / "cut.tar.gz", {"cifar-10-batches-bin/data_batch_3.bin": blob[:-5],
                                                   **{f"cifar-10-batches-bin/{n}": b"\x01" * 3073 for n in BIN_NAMES if n != "data_batch_3.bin"}})
    with pytest.raises(DataError, match="3073-byte records") as error:
        load_dataset(DataSpec(name="cifar10", path=str(archive)))
    assert_one_line_naming(error, "data_batch_3.bin")


def test_cifar_bad_label_and_missing_batch(tmp_path, cifar_arrays):
    images, labels = cifar_arrays
    folder = write_cifar_folder(tmp_path / "bin", images, np.where(np.arange(8) == 7, 10, labels))
    with pytest.raises(DataError, match="labels 0..9") as error:
        load_dataset(DataSpec(name="cifar10", path=str(folder)))
    assert_one_line_naming(error, "test_batch.bin")
    (folder / "data_batch_4.bin").unlink()
    with pytest.raises(DataError, match="missing") as error:
        load_dataset(DataSpec(name="cifar10", path=str(folder)))
    assert_one_line_naming(error, "data_batch_4.bin")


def test_cifar_nothing_found(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset(DataSpec(name="cifar10", path=str(tmp_path / "x" / "y")))
    message = str(error.value)
    assert message.startswith(f"cifar10: no data found at {tmp_path / 'x' / 'y'} (expected cifar-10-batches-bin/")
    assert "cifar-10-binary.tar.gz" in message and "\n" not in message


def trap_pickle(marker) -> bytes:
    """A pickle whose unpickling creates the folder `marker` (so we can tell it ran)."""

    class Trap:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    return pickle.dumps({"data": Trap(), "labels": [0]}, protocol=2)


def test_cifar_python_folder_is_never_unpickled_unverified(tmp_path):
    marker = tmp_path / "unpickled"
    payload = trap_pickle(marker)
    pickle.loads(payload)  # the trap is armed: loading it does create the marker
    assert marker.is_dir()
    marker.rmdir()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in PY_NAMES:
        (folder / name).write_bytes(payload)
    with pytest.raises(DataError, match="refusing to unpickle") as error:
        load_dataset(DataSpec(name="cifar10", path=str(tmp_path)))
    assert_one_line_naming(error, "data_batch_1")
    assert "binary" in str(error.value)
    # the python archive, by path and by the Keras cache name
    archive = write_tar(tmp_path / "cifar-10-python.tar.gz", {f"cifar-10-batches-py/{n}": payload for n in PY_NAMES})
    with pytest.raises(DataError, match="refusing to unpickle") as error:
        load_dataset(DataSpec(name="cifar10", path=str(archive)))
    assert_one_line_naming(error, "cifar-10-python.tar.gz")
    keras = tmp_path / "home" / ".keras" / "datasets"
    keras.mkdir(parents=True)
    archive.rename(keras / "cifar-10-batches-py.tar.gz")
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset(DataSpec(name="cifar10"))
    assert not marker.exists()


def python_batches(images, labels) -> dict:
    bounds = np.cumsum([0] + BATCH_SIZES)
    return {
        name: pickle.dumps({"data": images[a:b].transpose(0, 3, 1, 2).reshape(b - a, 3072), "labels": list(labels[a:b])})
        for name, a, b in zip(PY_NAMES, bounds, bounds[1:])
    }


def test_cifar_python_version_when_digests_match(tmp_path, cifar_arrays, monkeypatch):
    """The verified path works: pretend our hand-made batches are the official ones."""
    batches = python_batches(*cifar_arrays)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, blob in batches.items():
        (folder / name).write_bytes(blob)
    monkeypatch.setattr(data, "_CIFAR_PY_MD5", {n: hashlib.md5(b).hexdigest() for n, b in batches.items()})
    assert_cifar_matches(load_dataset(DataSpec(name="cifar10", path=str(folder))), *cifar_arrays)
    archive = write_tar(tmp_path / "py.tar.gz", {f"cifar-10-batches-py/{n}": b for n, b in batches.items()})
    monkeypatch.setattr(data, "_CIFAR_PY_ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    assert_cifar_matches(load_dataset(DataSpec(name="cifar10", path=str(archive))), *cifar_arrays)


def test_cifar_not_an_archive(tmp_path):
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DataError) as error:
        load_dataset(DataSpec(name="cifar10", path=str(tmp_path / "junk.tar.gz")))
    assert_one_line_naming(error, "junk.tar.gz")
