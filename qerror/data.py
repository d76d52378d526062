"""Datasets: Fashion-MNIST offline (IDX files) with deterministic splits, and ImageNet folders.

Fashion-MNIST is looked for, in order, in an explicit ``data_root``, in ``$QERROR_DATA``,
in the user cache (``$XDG_CACHE_HOME/qerror/data`` or ``~/.cache/qerror/data``), in
Debian's ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``) and in
torchvision's layout (``<root>/FashionMNIST/raw``) under each of those roots. It is
downloaded only when asked (``download=True``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "QERROR_DATA"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIZES = {"train": 60_000, "test": 10_000}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")
# Mean and standard deviation of the training images' pixels in [0, 1].
MEAN, STD = 0.2860, 0.3530

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataNotFoundError(FileNotFoundError):
    """The data set is in none of the places searched; the message says how to get it."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qerror"


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    Raises
    ------
    ValueError
        If the magic number, the element type or the size does not match the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    kind, ndim = raw[2], raw[3]
    if kind not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{kind:02x}")
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_DTYPES[kind])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = len(raw) - 4 - 4 * ndim
    if body != expected:
        raise ValueError(f"{path}: header says {tuple(dims)} ({expected} bytes) but the file "
                         f"holds {body} bytes; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims).copy()


def write_idx(path: Path | str, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzip-compressed if the name ends in .gz."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"write_idx writes uint8 arrays, got {array.dtype}")
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _candidate_dirs(data_root: Path | str | None) -> list[Path]:
    roots = []
    if data_root is not None:
        roots.append(Path(data_root))
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    roots.append(cache_dir() / "data")
    dirs = []
    for root in roots:
        dirs += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    dirs.append(DEBIAN_DIR)
    return dirs


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(data_root: Path | str | None = None) -> Path:
    """The first folder holding all four Fashion-MNIST IDX files (``.gz`` or not)."""
    searched = _candidate_dirs(data_root)
    for folder in searched:
        if all(_find_file(folder, stem) for pair in FILES.values() for stem in pair):
            return folder
    places = "\n".join(f"  - {p}" for p in searched)
    raise DataNotFoundError(
        "Fashion-MNIST was not found. Searched:\n" + places + "\nAny one of these provides it:\n"
        "  - as root on Debian/Ubuntu: apt-get install dataset-fashion-mnist\n"
        f"  - put the four IDX files ({', '.join(s for p in FILES.values() for s in p)}, "
        f".gz or not) in a folder and pass --data-root FOLDER or set {ENV_VAR}=FOLDER\n"
        "  - download them with torchvision into the cache: pass --download to a study, "
        "or call qerror.data.load_fashion_mnist(download=True)"
    )


def download_fashion_mnist() -> Path:
    """Download with torchvision into the user cache (needs internet)."""
    import torchvision

    root = cache_dir() / "data"
    torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
    torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
    return root / "FashionMNIST" / "raw"


@dataclass(frozen=True)
class ImageSet:
    """Images (N, 28, 28) uint8 and labels (N,) int64, with where they came from."""

    images: np.ndarray
    labels: np.ndarray
    source: str
    sha256: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.source,
                        f"{self.sha256}[{hashlib.sha256(np.asarray(index).tobytes()).hexdigest()[:16]}]")


def load_fashion_mnist(split: str, data_root: Path | str | None = None, *,
                       download: bool = False) -> ImageSet:
    """Fashion-MNIST's ``"train"`` (60,000) or ``"test"`` (10,000) images and labels."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        folder = find_fashion_mnist(data_root)
    except DataNotFoundError:
        if not download:
            raise
        folder = download_fashion_mnist()
    img_path = _find_file(folder, FILES[split][0])
    lbl_path = _find_file(folder, FILES[split][1])
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 images of shape (N, 28, 28), got "
                         f"{images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],) or labels.max(initial=0) > 9:
        raise ValueError(f"{lbl_path}: expected {images.shape[0]} labels in 0..9, got shape "
                         f"{labels.shape}")
    h = hashlib.sha256(images.tobytes())
    h.update(labels.tobytes())
    return ImageSet(images, labels.astype(np.int64), str(folder), h.hexdigest())


@dataclass(frozen=True)
class Splits:
    """Disjoint parts: ``train`` and ``val`` and ``calib`` from the training file, ``test``
    from the test file. The test split is never used to choose anything."""

    train: ImageSet
    val: ImageSet
    calib: ImageSet
    test: ImageSet


def fashion_mnist_splits(data_root: Path | str | None = None, *, val: int = 5000,
                         calib: int = 1000, seed: int = 0, download: bool = False) -> Splits:
    """Deterministic train/validation/calibration/test splits (same seed, same split)."""
    full = load_fashion_mnist("train", data_root, download=download)
    test = load_fashion_mnist("test", data_root, download=download)
    if val < 0 or calib < 0 or val + calib >= len(full):
        raise ValueError(f"val={val} and calib={calib} must be >= 0 and leave training images")
    order = np.random.default_rng(seed).permutation(len(full))
    return Splits(full.subset(np.sort(order[val + calib:])), full.subset(np.sort(order[:val])),
                  full.subset(np.sort(order[val:val + calib])), test)


def to_tensor(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """uint8 (N, 28, 28) → float32 (N, 1, size, size), normalised by the training mean/std.

    Images are zero-padded (not interpolated) to ``size``: padding keeps every pixel
    value exact, which the dataset-quantization study relies on.
    """
    if size < 28:
        raise ValueError(f"size must be at least 28, got {size}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    pad = size - 28
    x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return x.sub_(MEAN).div_(STD).unsqueeze(1)


def imagenet_folder(path: Path | str):
    """An ImageNet-style folder (one sub-folder per class) with torchvision's standard
    evaluation preprocessing: resize 256, centre crop 224, normalise."""
    import torchvision
    from torchvision import transforms

    path = Path(path)
    if not path.is_dir():
        raise DataNotFoundError(
            f"{path} is not a folder. Pass an ImageNet-style folder with one sub-folder per "
            "class (e.g. the ILSVRC2012 validation set arranged by synset)")
    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])
    return torchvision.datasets.ImageFolder(str(path), transform=tf)
