"""qerror.files: atomic writes keep the permissions a file is expected to have, go where a
link points, and are on the disk (with the folders the studies publish) once done."""

import os
import signal
import stat
import subprocess
import sys

import pytest

from qerror.files import (
    atomic_write,
    clean_stale_temps,
    name_bytes,
    name_max,
    shortened,
    temp_name_tag,
)


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
    import shutil

    import pytest
    import torch

    from qerror import files

    def full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3920576")

    real_save = torch.save
    monkeypatch.setattr(torch, "save", full)
    # 1 MiB of float32, all of it inside lists and tuples inside the mapping
    state = {"nested": [(torch.zeros(256, 512),), torch.zeros(256, 512)], "step": 3}
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2**19))
    with pytest.raises(OSError, match=r"could not write the state x\.pt \(torch: \[enforce"
                                      r".*its tensors need about 1 MiB and its file system has "
                                      r"0 MiB free; make room there, or write it elsewhere\. "
                                      r"Kept\.$"):
        files.torch_save(state, tmp_path / "x.pt", "the state x.pt", "Kept.")
    assert not (tmp_path / "x.pt").exists()
    # Where room is not what is missing (a folder at the path, no folder for it), torch's own
    # reason is given and no full disk is claimed (every RuntimeError was said as one).
    monkeypatch.undo()
    (tmp_path / "d.pt").mkdir()
    for path, room in ((tmp_path / "d.pt", True), (tmp_path / "none" / "x.pt", False)):
        with pytest.raises(OSError, match=r"could not write it \(torch: .+\. Kept\.$") as e:
            files.torch_save(state, path, "it", "Kept.")
        assert "make room" not in str(e.value)
        # free space known (the folder is there): said, with why room is not the cause
        assert ("MiB free; room is not what failed: see torch's reason" in str(e.value)) is room
    assert real_save is torch.save


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


def test_a_write_that_fails_or_is_interrupted_leaves_the_old_file_and_no_temporary(tmp_path):
    """The temporary file beside the destination is removed whatever ends the write: an
    error, or a Ctrl-C (a KeyboardInterrupt is no Exception); the file it would replace
    keeps its content."""
    import pytest

    from qerror.files import atomic_write

    path = tmp_path / "state.pt"
    path.write_text("old")
    for error in (OSError("disk full"), KeyboardInterrupt()):
        def half(tmp, error=error):
            tmp.write_text("half")
            raise error

        with pytest.raises(type(error)):
            atomic_write(path, half)
        assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
        assert path.read_text() == "old"


def _failing_folder_fsync(monkeypatch, code):
    """os.fsync failing with ``code`` on folders (files still flushed)."""
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_folder_its_file_system_cannot_flush_is_skipped_and_a_disk_error_raised(
        tmp_path, monkeypatch):
    """sync_folder: EINVAL (a file system that does not flush folders) is not an error; EIO
    (the disk failed) is, so that a write is never taken for durable when it is not."""
    import errno

    import pytest

    from qerror.files import sync_folder

    for code in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
        _failing_folder_fsync(monkeypatch, code)
        sync_folder(tmp_path)
    _failing_folder_fsync(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as err:
        sync_folder(tmp_path)
    assert err.value.errno == errno.EIO


def test_flushing_closes_every_descriptor_it_opens(tmp_path, monkeypatch):
    """sync_folder and sync_tree close what they open, also when the fsync fails: a
    study publishing many folders would otherwise run out of descriptors."""
    import errno

    import pytest

    from qerror.files import sync_folder, sync_tree

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    opened, real_open, real_close = set(), os.open, os.close

    def open_(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        opened.add(fd)
        return fd

    def close(fd):
        opened.discard(fd)
        return real_close(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "close", close)
    sync_tree(tmp_path)
    sync_folder(tmp_path)
    assert opened == set()
    _failing_folder_fsync(monkeypatch, errno.EIO)
    for sync in (sync_folder, sync_tree):
        with pytest.raises(OSError):
            sync(tmp_path)
        assert opened == set()


def test_sync_tree_skips_what_is_not_a_regular_file(tmp_path):
    """A link (a dangling one too) is not followed: opening it to flush it failed with
    FileNotFoundError, and a run folder holding one could not be published."""
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "link").symlink_to(tmp_path / "a.txt")
    from qerror.files import sync_tree

    sync_tree(tmp_path)


def test_jsonable_gives_plain_json_values_and_refuses_everything_else():
    """Each kind of value as the plain JSON value metadata holds (a path as its text, an
    enum as its value, numpy scalars and one-element tensors as Python numbers, mapping keys
    as strings); a class, a set or an arbitrary object is a TypeError, never a repr."""
    import dataclasses
    import enum
    import json
    from pathlib import Path

    import numpy as np
    import pytest
    import torch

    from qerror.files import jsonable

    class Kind(enum.Enum):
        A = "a"

    @dataclasses.dataclass
    class Record:
        path: Path
        kind: Kind
        scale: np.float32
        count: torch.Tensor
        table: dict

    out = jsonable(Record(Path("runs/x"), Kind.A, np.float32(0.5), torch.tensor(2),
                          {1: (np.int64(3), None, True)}))
    expected = {"path": "runs/x", "kind": "a", "scale": 0.5, "count": 2,
                "table": {"1": [3, None, True]}}
    assert out == expected and json.loads(json.dumps(out)) == expected
    assert [type(out[k]) for k in ("path", "kind", "scale", "count")] == [str, str, float,
                                                                          int]
    for value, name in ((Record, "type"), ({1, 2}, "set"), (object(), "object")):
        with pytest.raises(TypeError, match=f"cannot store a {name} as JSON metadata"):
            jsonable(value)


def test_json_text_is_strict_json_with_null_where_a_float_is_not_finite():
    """Python's json wrote NaN and infinities as bare words that other readers refuse (a
    drift run's summary.json held "recovered": NaN); json_text writes them as null, in
    nested dicts and lists, numpy's and torch's scalars included, and leaves every finite
    value as it was."""
    import json
    import math

    import numpy as np
    import torch

    from qerror.files import json_text

    def strict(text):
        def refuse(word):
            raise ValueError(f"not JSON: {word}")
        return json.loads(text, parse_constant=refuse)

    value = {"b": [1.5, math.nan, {"c": -math.inf}], "a": np.float64(math.inf),
             "t": torch.tensor(math.nan), "n": None, "i": 3, "f": 1e-300, "s": "NaN"}
    text = json_text(value)
    assert strict(text) == {"a": None, "b": [1.5, None, {"c": None}], "f": 1e-300, "i": 3,
                            "n": None, "s": "NaN", "t": None}
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')  # keys sorted
    assert json.loads(json_text({"x": 0.1 + 0.2}))["x"] == 0.1 + 0.2  # finite: every digit


def test_jsonable_keys_an_enum_by_its_value_and_refuses_a_key_it_would_write_as_a_repr():
    """A mapping keyed by an enum is keyed by the enum's value, as the enum itself is stored
    (it was keyed 'Kind.A', which Choice.parse does not read back); a numpy integer and a
    path as their text; a tuple key is a TypeError (it was the string '(1, 2)', a repr)."""
    import enum
    from pathlib import Path

    import numpy as np
    import pytest

    from qerror.files import jsonable
    from qerror.rounding import RoundingMode

    class Kind(enum.Enum):
        A = "a"

    out = jsonable({RoundingMode.FLOOR: 1, Kind.A: 2, np.int64(3): 3, Path("runs/x"): 4, 5: 5})
    assert out == {"floor": 1, "a": 2, "3": 3, "runs/x": 4, "5": 5}
    assert RoundingMode.parse(next(iter(out))) is RoundingMode.FLOOR
    with pytest.raises(TypeError, match=r"cannot store a tuple as a JSON metadata key: \(1, 2\)"):
        jsonable({(1, 2): 0})


def test_package_versions_says_none_for_a_package_not_installed():
    from qerror.files import package_versions

    versions = package_versions(["numpy", "qerror-no-such-distribution"])
    assert set(versions) == {"python", "numpy", "qerror-no-such-distribution"}
    assert versions["numpy"] and versions["qerror-no-such-distribution"] is None


@pytest.mark.parametrize("tail", ["", "é"], ids=["ascii", "two-byte"])
def test_a_long_legal_name_is_written_through_a_temporary_name_that_fits(tmp_path, tail):
    # the temporary name was ".NAME.XXXXXXXX.tmp", 14 bytes longer than the file's: a legal
    # name of 242 bytes or more failed with "File name too long" before anything was written
    limit = name_max(tmp_path)
    name = "a" * (limit - name_bytes(tail)) + tail
    assert name_bytes(name) == limit
    seen = []

    def write(tmp):
        seen.append(tmp.name)
        tmp.write_text("x")

    atomic_write(tmp_path / name, write)
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_text() == "x"
    assert name_bytes(seen[0]) <= limit and seen[0].startswith(".aaa")
    assert seen[0].endswith(".tmp")


def test_shortened_cuts_at_a_characters_end():
    assert shortened("abc", 5) == "abc" and shortened("abc", 2) == "ab"
    assert shortened("aé", 2) == "a" and shortened("aé", 3) == "aé"  # é is two bytes
    assert shortened("abc", 0) == "" and shortened("abc", -1) == ""


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_writer_killed_mid_write_leaves_a_temporary_the_next_write_removes(tmp_path):
    # a checkpoint write killed by SIGKILL left ".m.pt.XXXXXXXX.tmp" (10 MB here) for good:
    # the next write of m.pt left it beside the new file
    code = ("import sys, time\nfrom qerror.files import atomic_write\n"
            "def write(tmp):\n    tmp.write_bytes(b'x' * 1_000_000)\n"
            "    print('writing', flush=True)\n    time.sleep(60)\n"
            f"atomic_write({str(tmp_path / 'm.pt')!r}, write)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".m.pt.") and left[0].endswith(".tmp")
    atomic_write(tmp_path / "m.pt", lambda tmp: tmp.write_bytes(b"new"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert (tmp_path / "m.pt").read_bytes() == b"new"


def test_only_this_machines_temporaries_of_dead_processes_are_removed(tmp_path):
    host, me = temp_name_tag().split("-")
    assert me == str(os.getpid()) and len(host) == 6
    other_host = "0" * 6 if host != "0" * 6 else "1" * 6
    dead = _dead_pid()
    names = {
        f".m.pt.{host}-{dead}-abc_9xyz.tmp": False,  # a killed writer's: removed
        f".m.pt.{host}-{os.getpid()}-abcdefgh.tmp": True,  # a write in progress
        f".m.pt.{host}-{os.getppid()}-abcdefgh.tmp": True,  # another live process's
        f".m.pt.{other_host}-{dead}-abcdefgh.tmp": True,  # another machine's
        f".n.pt.{host}-{dead}-abcdefgh.tmp": True,  # another file's
        f".m.pt.{host}-{dead}-abcdefgh.tmp.keep": True,  # not a temporary name
        f".m.pt.{host}-x{dead}-abcdefgh.tmp": True,
        "m.pt": True,
    }
    for name in names:
        (tmp_path / name).write_text("x")
    link = f".m.pt.{host}-{dead}-linklink.tmp"  # a link is not a temporary file
    os.symlink(tmp_path / "m.pt", tmp_path / link)
    names[link] = True
    folder = f".m.pt.{host}-{dead}-folderxx.tmp"
    (tmp_path / folder).mkdir()
    names[folder] = True
    removed = clean_stale_temps(tmp_path, "m.pt")
    assert [p.name for p in removed] == [f".m.pt.{host}-{dead}-abc_9xyz.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, k in names.items() if k)
    assert (tmp_path / "m.pt").read_text() == "x"


def test_a_temporary_that_cannot_be_removed_does_not_stop_the_write(tmp_path, monkeypatch):
    host = temp_name_tag().split("-")[0]
    stale = tmp_path / f".m.pt.{host}-{_dead_pid()}-abcdefgh.tmp"
    stale.write_text("x")
    real = type(stale).unlink

    def refuse(self, missing_ok=False):
        if self == stale:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, missing_ok=missing_ok)

    monkeypatch.setattr(type(stale), "unlink", refuse)
    atomic_write(tmp_path / "m.pt", lambda tmp: tmp.write_text("new"))
    assert (tmp_path / "m.pt").read_text() == "new" and stale.exists()


def test_jsonable_refuses_two_keys_of_the_same_text_instead_of_losing_a_value():
    """Keys become their text, and two keys of one text (an int and its digits, an enum and
    its value, a path and its string) became one: {1: "a", "1": "b"} was stored as
    {"1": "b"}, a value lost without a word, in a manifest or a summary."""
    import re
    from pathlib import Path

    import pytest

    from qerror.files import json_text, jsonable
    from qerror.rounding import RoundingMode

    for value in ({1: "a", "1": "b"}, {RoundingMode.FLOOR: 1, "floor": 2},
                  {Path("x"): 1, "x": 2}, {"outer": [{None: 0, "None": 1}]}):
        first, second = list(value.get("outer", [value])[0])
        with pytest.raises(TypeError, match=re.escape(f"keys {first!r} and {second!r} are "
                                                      "both the JSON key")):
            json_text(value)
    assert jsonable({1: "a", "2": "b"}) == {"1": "a", "2": "b"}


def test_jsonable_refuses_a_tensor_of_many_elements_and_a_scalar_json_has_no_value_for():
    """A tensor of two or no elements raised torch's RuntimeError ('a Tensor with 2 elements
    cannot be converted to Scalar'), not the TypeError the docstring promises; numpy's
    complex, bytes and datetime scalars were returned as a complex, bytes and a date, no
    JSON values, which json_text then refused with json's own message."""
    import re

    import numpy as np
    import pytest
    import torch

    from qerror.files import json_text, jsonable

    for value in (torch.tensor([1.0, 2.0]), torch.zeros(0), torch.zeros(1, 2)):
        with pytest.raises(TypeError, match=re.escape(f"tensor of shape {tuple(value.shape)} as")):
            jsonable({"x": value})
    for value, kind in ((np.complex128(1 + 2j), "complex"), (np.bytes_(b"a"), "bytes"),
                        (np.datetime64("2020-01-01"), "date"),
                        (torch.tensor(1 + 2j), "complex")):
        with pytest.raises(TypeError, match=f"cannot store a {kind} as JSON metadata"):
            json_text([value])
    assert jsonable([torch.tensor([[2.5]]), np.str_("a"), np.float32(0.5)]) == [2.5, "a", 0.5]
