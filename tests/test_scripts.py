"""scripts/get-fashion-mnist.sh (make data): it finds the files where a study finds them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qerror import data

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "get-fashion-mnist.sh"


def _run(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != data.ENV_VAR}
    env.update({"QERROR_PYTHON": sys.executable, **env_extra})
    return subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_uncompressed_files_in_torchvisions_layout_are_found(tmp_path):
    # torchvision's download leaves FashionMNIST/raw/ with the files uncompressed beside the
    # .gz; the library reads that layout, and the script once refused it (make run stopped)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for img, lbl in data.FILES.values():
        (raw / img).write_bytes(b"")
        (raw / lbl).write_bytes(b"")
    got = _run({data.ENV_VAR: str(tmp_path)})
    assert got.returncode == 0, got.stderr
    assert f"found in {raw}" in got.stdout


def test_a_named_folder_without_the_files_stops_with_the_librarys_reasons(tmp_path):
    # a folder named by QERROR_DATA is the only one a study reads: finding the files
    # elsewhere (or installing them) would not help, and the reasons are the library's
    got = _run({data.ENV_VAR: str(tmp_path / "absent")})
    assert got.returncode == 1
    assert f"{tmp_path / 'absent'} does not exist" in got.stderr
    assert "Installing" not in got.stdout


def test_a_python_without_the_package_falls_back_to_the_scripts_own_search(tmp_path):
    # an environment still being made (make -j) or cut short: its python cannot import
    # qerror, which says nothing about the data; the folder named is searched as before
    for img, lbl in data.FILES.values():
        (tmp_path / f"{img}.gz").write_bytes(b"")
        (tmp_path / f"{lbl}.gz").write_bytes(b"")
    bare = tmp_path / "bare-python"
    bare.write_text("#!/bin/sh\nexit 1\n")
    bare.chmod(0o755)
    got = _run({data.ENV_VAR: str(tmp_path), "QERROR_PYTHON": str(bare)})
    assert got.returncode == 0, got.stderr
    assert f"found in {tmp_path}" in got.stdout
