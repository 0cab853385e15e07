"""Online augmentation of one training batch (docs/experiments.md section 1), reproducible.

The augmented batch is the N originals plus N augmented copies (labels duplicated; the
trainer draws batch_size//2 originals per step, so a step has batch_size images),
shuffled. Every random choice is derived from (seed, epoch, step) via numpy's
SeedSequence, so a step can be replayed bit for bit (e.g. after resuming a checkpoint)
regardless of which worker runs it. No TensorFlow here.
"""

from __future__ import annotations

import numpy as np

from workers.imgaug_compat import import_imgaug


def make_augmenter():
    """The source's augmenter: Fliplr; sometimes Affine; sometimes Flipud; in random order."""
    _, iaa = import_imgaug()
    return iaa.Sequential(
        [
            iaa.Fliplr(1.0),
            iaa.Sometimes(0.1, iaa.Affine(translate_percent={"x": (-0.2, 0.2), "y": (-0.2, 0.2)}, rotate=(-25, 25))),
            iaa.Sometimes(0.1, iaa.Flipud(1.0)),
        ],
        random_order=True,
    )


def _to_uint8(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Map float images to uint8 by a linear scale; return (images, lo, hi) to invert it.

    Pixels in [0, 1] use lo=0, hi=1 (so k/255 survives the round trip exactly). Anything
    else (standardized data) is min-max rescaled over the whole batch. Affine fills
    uncovered pixels with 0, i.e. black for [0, 1] data and the batch minimum otherwise.
    """
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    elif hi == lo:
        hi = lo + 1.0
    scaled = (x.astype(np.float64) - lo) / (hi - lo) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8), lo, hi


def _from_uint8(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Invert _to_uint8 (up to its quantisation)."""
    if lo == 0.0 and hi == 1.0:
        return u.astype(np.float32) / np.float32(255)  # same expression as the loaders
    return (u.astype(np.float64) / 255.0 * (hi - lo) + lo).astype(np.float32)


def augment_batch(x, y, seed: int, epoch: int, step: int, float_images_quirk: bool = False):
    """Return (2N images, 2N labels): originals + augmented copies, shuffled; pure in (seed, epoch, step)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 4 or len(x) != len(y):
        raise ValueError(f"augment_batch: expected images (N, H, W, C) and N labels, got {x.shape} and {y.shape}")
    aug_seq, perm_seq = np.random.SeedSequence([seed, epoch, step]).spawn(2)
    aug = make_augmenter()
    # seed_ derives every child's generator from this one number; a fresh augmenter per call
    # means no generator state carries over between calls.
    aug.seed_(int(aug_seq.generate_state(1, dtype=np.uint32)[0] >> 1))
    if float_images_quirk:
        # The source's suspected mistake: float images straight into imgaug.
        augmented = np.asarray(aug(images=x), dtype=np.float32)
    else:
        u8, lo, hi = _to_uint8(x)
        augmented = _from_uint8(np.asarray(aug(images=u8)), lo, hi)
    order = np.random.default_rng(perm_seq).permutation(2 * len(x))
    return np.concatenate([x, augmented])[order], np.concatenate([y, y])[order]
