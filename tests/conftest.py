"""Shared test set-up."""

import os

import pytest

# Which INT8 kernel runs is asked of the kernel itself (qerror.nn.int8.kernel_probe), not
# read from CPU flags: FBGEMM's AVX2 kernels saturate int16 pair sums, its AVX512-VNNI
# kernels do not, and a test of either behaviour must skip, saying why, on the other.
KERNEL_MARKERS = {
    "needs_saturating_kernel": True,
    "needs_nonsaturating_kernel": False,
}


def share_the_cores(environ=os.environ, cores: int | None = None) -> int | None:
    """Threads for each of pytest-xdist's workers: the cores this process may use divided
    among the workers, unless the caller set ``OMP_NUM_THREADS``. Returns the count set
    (also exported as ``OMP_NUM_THREADS`` for the studies a test starts), or None.

    Each worker's torch would otherwise start a thread per core: with two workers on two
    cores, four threads meet at every parallel region's barrier and wait in libgomp for a
    descheduled partner (``make test`` took 38 minutes so on a fresh 2-core Intel machine
    of this kind, its last twenty mostly spinning in libgomp)."""
    workers = int(environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers <= 1 or environ.get("OMP_NUM_THREADS"):
        return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def pytest_configure(config):
    threads = share_the_cores()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
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
    # a kernel no pipeline models is no kernel of either kind for a test of the model
    if probe.faithful is None or any(want is not probe.saturates_pairs for want in wanted):
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


@pytest.fixture
def unlistable(monkeypatch):
    """Factory: ``unlistable(folder)`` makes ``os.scandir`` refuse ``folder`` (EACCES) for the
    test's duration, as the kernel refuses a user without read access to it (root lists
    every folder; ``os.walk`` lists each folder with ``os.scandir``)."""
    real = os.scandir

    def lock(folder) -> None:
        def scandir(path="."):
            if os.fspath(path) == os.fspath(folder):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)

    return lock
