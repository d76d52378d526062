"""qerror.files: atomic writes keep the permissions a file is expected to have."""

import os
import stat

from qerror.files import atomic_write


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_gets_the_umask_mode_and_a_replaced_one_keeps_its_own(tmp_path):
    # mkstemp makes its temporary file 0600: moved into place as it was, a checkpoint in a
    # shared cache was readable by its owner only
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("one"))
        assert _mode(path) == 0o644
        os.chmod(path, 0o640)
        atomic_write(path, lambda tmp: tmp.write_text("two"))
        assert _mode(path) == 0o640 and path.read_text() == "two"
        os.umask(0o077)
        assert _mode(atomic_write(tmp_path / "b.txt", lambda tmp: tmp.write_text("x"))) == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_torch_saves_failed_write_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    # torch's writer says a full disk as a RuntimeError naming a C++ line; every torch file
    # the package writes (checkpoints, training states, studies' network files) goes through
    # files.torch_save, which says it as the OSError it is (the studies' one-line advice).
    import pytest
    import torch

    from qerror import files

    def full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3920576")

    monkeypatch.setattr(torch, "save", full)
    state = {"w": torch.zeros(256, 1024), "nested": [torch.zeros(4)], "step": 3}
    with pytest.raises(OSError, match=r"could not write the state x\.pt \(torch: \[enforce"
                                      r".*its tensors need about 1 MiB .* MiB free; make room "
                                      r"there, or write it elsewhere\. Kept\.$"):
        files.torch_save(state, tmp_path / "x.pt", "the state x.pt", "Kept.")
    assert not (tmp_path / "x.pt").exists()
