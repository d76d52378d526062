"""Shared test set-up."""

import pytest


@pytest.fixture
def fashion_idx(tmp_path, monkeypatch):
    """Factory: a folder of synthetic Fashion-MNIST IDX files (``train`` and ``test`` images),
    made the only place qerror.data looks (no environment variable, cache or Debian folder).

    qerror.data checks every file against Fashion-MNIST's split sizes; the factory declares
    the synthetic ones (``data.SIZES``) for the test's duration."""
    import numpy as np

    from qerror import data

    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")

    def make(train: int, test: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        monkeypatch.setattr(data, "SIZES", {"train": train, "test": test})
        root = tmp_path / "fm"
        root.mkdir(exist_ok=True)
        for split, n in (("train", train), ("test", test)):
            img, lbl = data.FILES[split]
            data.write_idx(root / f"{img}.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            data.write_idx(root / f"{lbl}.gz", rng.integers(0, 10, n, dtype=np.uint8))
        return root

    return make
