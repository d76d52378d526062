"""Fashion-MNIST loading from IDX files the test writes, splits, and clear errors."""

import gzip

import numpy as np
import pytest

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


def test_torchvision_layout_is_found(idx_root, tmp_path):
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in idx_root.iterdir():
        (raw / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))  # uncompressed
    assert data.find_fashion_mnist(tmp_path / "tv") == raw
    assert len(data.load_fashion_mnist("test", tmp_path / "tv")) == 50


def test_missing_data_names_every_way_to_get_it(idx_root, tmp_path):
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_fashion_mnist("train", tmp_path / "empty")
    msg = str(info.value)
    for way in ("apt-get install dataset-fashion-mnist", "--data-root", data.ENV_VAR, "download"):
        assert way in msg


def test_truncated_or_foreign_file_is_refused(idx_root):
    path = idx_root / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        data.load_fashion_mnist("train", idx_root)
    path.write_bytes(gzip.compress(b"\x1f\x8b" + raw[2:]))
    with pytest.raises(ValueError, match="not an IDX file"):
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


def test_to_tensor_pads_exactly():
    img = np.full((2, 28, 28), 255, dtype=np.uint8)
    t = data.to_tensor(img, size=32)
    assert t.shape == (2, 1, 32, 32)
    assert float(t[0, 0, 0, 0]) == pytest.approx(-data.MEAN / data.STD)
    assert float(t[0, 0, 2, 2]) == pytest.approx((1 - data.MEAN) / data.STD)
    with pytest.raises(ValueError, match="at least 28"):
        data.to_tensor(img, size=20)


def test_bad_split_name():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.load_fashion_mnist("validation")
