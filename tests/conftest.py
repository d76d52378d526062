"""Shared test set-up."""

import pytest

# Which INT8 kernel runs is asked of the kernel itself (qerror.nn.int8.kernel_probe), not
# read from CPU flags: FBGEMM's AVX2 kernels saturate int16 pair sums, its AVX512-VNNI
# kernels do not, and a test of either behaviour must skip, saying why, on the other.
KERNEL_MARKERS = {
    "needs_saturating_kernel": True,
    "needs_nonsaturating_kernel": False,
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs_saturating_kernel: the real FBGEMM kernel must saturate int16 "
                   "pair sums (AVX2), as the kernel probe finds")
    config.addinivalue_line(
        "markers", "needs_nonsaturating_kernel: the real FBGEMM kernel must not saturate "
                   "int16 pair sums (AVX512-VNNI), as the kernel probe finds")


def pytest_runtest_setup(item):
    wanted = [want for name, want in KERNEL_MARKERS.items() if item.get_closest_marker(name)]
    if not wanted:
        return
    from qerror.nn.int8 import kernel_probe

    probe = kernel_probe()
    if any(want is not probe.saturates_pairs for want in wanted):
        pytest.skip(f"needs a kernel that {'saturates' if wanted[0] else 'does not saturate'} "
                    f"int16 pair sums; the kernel probe says: {probe.describe()}")


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
