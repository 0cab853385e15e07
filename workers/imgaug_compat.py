"""Import imgaug 0.4.0 under NumPy 2.

imgaug 0.4.0 (the last release) was written for NumPy 1.x. What breaks under NumPy 2,
found by importing it and running the augmenters bplab uses (Fliplr, Flipud, Affine with
translate/rotate, Sometimes, Sequential(random_order=True)) on uint8 and float32 images:

- `np.sctypes` (removed in NumPy 2.0) is read at import time by imgaug/imgaug.py to build
  NP_FLOAT_TYPES / NP_INT_TYPES / NP_UINT_TYPES, which the dtype checks of every augmenter
  use later. This is the only thing we patch.

Checked and deliberately not patched:
- `np.bool` (used by SomeOf and polygon masks) exists again in NumPy 2 (an alias of np.bool_).
- `np.complex` is used only by imgaug.parameters.Power (the `**` of stochastic parameters)
  and FrequencyNoise; no augmenter bplab uses reaches them.
- dtype names such as "float96"/"float128" in imgaug's dtype gates are plain strings
  compared with dtype.name; they need no patch.

The patch only adds attributes NumPy lacks, so it does nothing on NumPy 1.x and is safe to
apply many times. No TensorFlow here.
"""

from __future__ import annotations

import numpy as np


def _classic_sctypes() -> dict:
    """The NumPy 1.x value of np.sctypes (as on 64-bit Linux), which imgaug reads at import."""
    return {
        "int": [np.int8, np.int16, np.int32, np.int64],
        "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
        "float": [np.float16, np.float32, np.float64, np.longdouble],
        "complex": [np.complex64, np.complex128, np.clongdouble],
        "others": [bool, object, bytes, str, np.void],
    }


def patch_numpy() -> list[str]:
    """Add the NumPy 1.x attributes imgaug needs if missing; return the names added."""
    added = []
    # np.sctypes was removed in NumPy 2.0; imgaug/imgaug.py does set(np.sctypes["float"]) etc.
    # at import. `in vars(np)` and not hasattr: NumPy 2's module __getattr__ raises for it.
    if "sctypes" not in vars(np):
        np.sctypes = _classic_sctypes()
        added.append("sctypes")
    return added


def import_imgaug():
    """Patch NumPy as needed, then import and return (imgaug, imgaug.augmenters)."""
    patch_numpy()
    import imgaug
    import imgaug.augmenters as iaa

    return imgaug, iaa
