"""workers.imgaug_compat and workers.augment: imgaug under NumPy 2, reproducible batches."""

import numpy as np
import pytest

from workers.augment import augment_batch, make_augmenter
from workers.imgaug_compat import import_imgaug


@pytest.fixture(scope="module")
def iaa():
    return import_imgaug()[1]


def test_import_imgaug_twice():
    first, second = import_imgaug(), import_imgaug()
    assert first[0] is second[0] and first[1] is second[1]
    assert first[1].__name__ == "imgaug.augmenters"
    assert np.uint8 in np.sctypes["uint"]


def test_augmenters_run_on_uint8(iaa):
    x = np.random.default_rng(0).integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)
    out = make_augmenter()(images=x)
    assert out.dtype == np.uint8 and out.shape == x.shape
    np.testing.assert_array_equal(iaa.Fliplr(1.0)(images=x), x[:, :, ::-1])
    np.testing.assert_array_equal(iaa.Flipud(1.0)(images=x), x[:, ::-1])
    affine = iaa.Affine(translate_percent={"x": (-0.2, 0.2), "y": (-0.2, 0.2)}, rotate=(-25, 25), seed=1)
    assert affine(images=x).shape == x.shape


@pytest.fixture
def batch():
    rng = np.random.default_rng(3)
    # random floats are (almost surely) never k/255, so augmented copies can't equal originals
    x = rng.random((12, 16, 16, 3), dtype=np.float32)
    y = rng.integers(0, 10, 12)
    return x, y


def rows_equal(a, b):
    """Boolean matrix: out[i, j] is True when image a[i] equals image b[j] exactly."""
    return (a.reshape(len(a), 1, -1) == b.reshape(1, len(b), -1)).all(axis=2)


def test_augment_batch_contents(batch):
    x, y = batch
    x2, y2 = augment_batch(x, y, seed=678, epoch=0, step=0)
    assert x2.shape == (24, 16, 16, 3) and x2.dtype == np.float32 and y2.shape == (24,)
    assert sorted(y2.tolist()) == sorted(y.tolist() * 2)
    matches = rows_equal(x2, x)
    assert matches.sum(axis=0).tolist() == [1] * 12  # each original present exactly once...
    assert matches.sum() == 12  # ...and nothing else equals an original
    originals = matches.any(axis=1)
    np.testing.assert_array_equal(y2[originals], y[matches[originals].argmax(axis=1)])
    # Most copies are just Fliplr (each Sometimes fires with p = 0.1) of a uint8-quantised original.
    quantised_flipped = np.round(x * 255).astype(np.uint8)[:, :, ::-1].astype(np.float32) / np.float32(255)
    flips = rows_equal(x2[~originals], quantised_flipped)
    assert flips.any(axis=1).sum() >= 6
    np.testing.assert_array_equal(y2[~originals][flips.any(axis=1)], y[flips.argmax(axis=1)][flips.any(axis=1)])


def test_augment_batch_is_deterministic(batch):
    x, y = batch
    a = augment_batch(x, y, seed=678, epoch=2, step=5)
    b = augment_batch(x, y, seed=678, epoch=2, step=5)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    for other in (augment_batch(x, y, seed=678, epoch=2, step=6), augment_batch(x, y, seed=678, epoch=3, step=5)):
        assert not np.array_equal(a[1], other[1]) or not np.array_equal(a[0], other[0])


def test_augment_changes_between_steps_beyond_order(batch):
    """Different steps draw different augmentations, not only a different shuffle."""
    x, y = batch
    sort = lambda images: images[np.lexsort(images.reshape(len(images), -1).T)]
    outputs = [sort(augment_batch(x, y, seed=1, epoch=0, step=s)[0]) for s in range(6)]
    assert any(not np.array_equal(outputs[0], other) for other in outputs[1:])


def test_float_images_quirk(batch):
    x, y = batch
    x2, y2 = augment_batch(x, y, seed=678, epoch=0, step=0, float_images_quirk=True)
    assert x2.shape == (24, 16, 16, 3) and x2.dtype == np.float32
    assert rows_equal(x2, x).sum() == 12
    # float straight into imgaug: the plain flips are exact, with no uint8 quantisation
    assert rows_equal(x2, np.ascontiguousarray(x[:, :, ::-1])).any(axis=1).sum() >= 6
    again = augment_batch(x, y, seed=678, epoch=0, step=0, float_images_quirk=True)
    assert again[0].tobytes() == x2.tobytes()


def test_standardized_images_are_rescaled(batch):
    x, y = batch
    z = (x - 0.5) * 4  # values in about [-2, 2]
    z2, _ = augment_batch(z, y, seed=678, epoch=0, step=0)
    matches = rows_equal(z2, z)
    assert matches.sum() == 12
    copies = z2[~matches.any(axis=1)]
    step = (z.max() - z.min()) / 255
    flipped = z[:, :, ::-1]
    # each pure-Fliplr copy is within half a quantisation step of a flipped original
    close = np.abs(copies[:, None] - flipped[None]).max(axis=(2, 3, 4)) <= step / 2 + 1e-6
    assert close.any(axis=1).sum() >= 6
    assert copies.min() >= z.min() - 1e-6 and copies.max() <= z.max() + 1e-6


def test_pixel_data_round_trips_exactly():
    """Loader-style pixels (k/255) come back bit-identical after the uint8 round trip."""
    u = np.random.default_rng(4).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    x = u.astype(np.float32) / np.float32(255)
    x2, _ = augment_batch(x, np.arange(5), seed=0, epoch=0, step=0)
    flipped = np.ascontiguousarray(x[:, :, ::-1])
    assert (rows_equal(x2, x) | rows_equal(x2, flipped)).any(axis=1).sum() >= 8
