"""qerror.files: atomic writes keep the permissions a file is expected to have, go where a
link points, and are on the disk (with the folders the studies publish) once done."""

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


def test_a_link_is_written_through_to_where_it_points(tmp_path):
    """A checkpoint path linked to a larger disk: os.replace on the link made a file beside
    it (on the small disk) and left the target stale. The file now lands where the link
    points, through chains of links and dangling ones, and the link stays."""
    import errno

    import pytest

    big, home = tmp_path / "big", tmp_path / "home"
    big.mkdir()
    home.mkdir()
    (big / "model.pt").write_text("old")
    os.chmod(big / "model.pt", 0o640)
    link = home / "model.pt"
    link.symlink_to(big / "model.pt")
    assert atomic_write(link, lambda tmp: tmp.write_text("new")) == link
    assert link.is_symlink() and (big / "model.pt").read_text() == "new"
    assert _mode(big / "model.pt") == 0o640
    chain = home / "state.pt"  # a relative link to a dangling one
    (home / "hop").symlink_to(big / "sub" / "state.pt")
    chain.symlink_to("hop")
    atomic_write(chain, lambda tmp: tmp.write_text("s"))
    assert chain.is_symlink() and (home / "hop").is_symlink()
    assert (big / "sub" / "state.pt").read_text() == "s"
    assert sorted(p.name for p in home.iterdir()) == ["hop", "model.pt", "state.pt"]
    loop = home / "loop"
    loop.symlink_to("loop")
    with pytest.raises(OSError) as err:
        atomic_write(loop, lambda tmp: tmp.write_text("x"))
    assert err.value.errno == errno.ELOOP and loop.is_symlink()
    assert sorted(p.name for p in home.iterdir()) == ["hop", "loop", "model.pt", "state.pt"]


def _record_syncs(monkeypatch):
    """The (device, inode) of every fsync'd file or folder, and of every rename's source,
    in order: ``("sync", id)`` and ``("rename", id)``."""
    from pathlib import Path

    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, Path.rename

    def ident(st):
        return st.st_dev, st.st_ino

    def fsync(fd):
        events.append(("sync", ident(os.fstat(fd))))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("rename", ident(os.lstat(src))))
        return real_replace(src, dst, *a, **k)

    def rename(self, target):
        events.append(("rename", ident(os.lstat(self))))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "rename", rename)
    return events, ident


def test_an_atomic_write_flushes_its_folder_after_the_rename(tmp_path, monkeypatch):
    """Without the folder's fsync after os.replace a power cut could lose the rename after
    the call returned: the training state removed (its run published) while the new
    checkpoint's rename was lost, or a checkpoint's sidecar durable before its weights."""
    events, ident = _record_syncs(monkeypatch)
    path = atomic_write(tmp_path / "sub" / "a.txt", lambda tmp: tmp.write_text("x"))
    file_id, folder_id = ident(os.stat(path)), ident(os.stat(path.parent))
    assert events == [("sync", file_id), ("rename", file_id), ("sync", folder_id)]


def test_a_published_folder_is_on_the_disk_before_it_shows(tmp_path, monkeypatch):
    """The studies' run folders were written without fsync and renamed into place: after a
    power cut the rename could survive and the files' content not, leaving a run whose
    manifest is there and whose files are empty. Every file and folder of the stage is now
    flushed before the renames, and the destination's folder after them."""
    from studies import _common

    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old\n")
    stage = _common.staging_folder(final)
    (stage / "sub").mkdir()
    for name in ("a.csv", "sub/b.csv"):
        (stage / name).write_text("1\n")
    events, ident = _record_syncs(monkeypatch)
    _common.publish_folder(stage, final)
    synced = [i for kind, i in events if kind == "sync"]
    renamed = [n for n, (kind, _) in enumerate(events) if kind == "rename"]
    staged = {ident(os.stat(p)) for p in (final, final / "sub", final / "a.csv",
                                          final / "sub" / "b.csv")}
    assert staged <= set(synced)
    assert all(n < renamed[0] for n, (kind, i) in enumerate(events)
               if kind == "sync" and i in staged)
    assert ("sync", ident(os.stat(tmp_path))) in events[renamed[-1]:]
