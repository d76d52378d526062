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
