"""File and metadata helpers: hashes, atomic and durable writes, JSON-safe values, package
versions.

Used by the library (checkpoints) and by the studies (run folders and manifests).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

import numpy as np
import torch

PACKAGES = ("qerror", "numpy", "scipy", "torch", "torchvision", "pandas", "matplotlib",
            "seaborn", "torchao")


def sha256_file(path: Path | str | BinaryIO) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks.

    Parameters
    ----------
    path : Path, str or binary file object
        The file, or one already open, read from its position to its end (so that what is
        hashed and what is then read from it, after a ``seek(0)``, are the same bytes even
        if the name comes to name another file meanwhile).

    Returns
    -------
    str
        64 lowercase hex digits.
    """
    h = hashlib.sha256()
    with contextlib.nullcontext(path) if hasattr(path, "read") else open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    """The process's umask (read from /proc where it can be, else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, write) -> Path:
    """Call ``write(tmp_path)``, then move the file into place with one ``os.replace``.

    Parameters
    ----------
    path : Path or str
        Destination; its folder is created if missing. A symbolic link (or a chain of them,
        a dangling one too) is written through: the file lands where it points, and the
        link stays, as ``open(path, "w")`` would leave it.
    write : callable
        ``write(tmp_path)`` writes the whole content to ``tmp_path``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OSError
        Also when ``path`` is a loop of symbolic links (``errno.ELOOP``); nothing is written.

    Notes
    -----
    The temporary file lives in the folder of the file it becomes (named after it, cut
    short where a long name would make the temporary one too long for the file system), so
    the rename never
    crosses a file system, and a crash leaves either the old file or the new one, never a
    mixture. The content is flushed to the disk before the rename and the folder after it
    (:func:`sync_folder`): once this returns, the new file survives a power cut. The file
    gets the permissions of the one it replaces, or those a new file gets
    under the process's umask (``mkstemp`` makes its temporary file readable by its owner
    only).

    The temporary name says which machine and process write it
    (``.NAME.HOST-PID-XXXXXXXX.tmp``, :func:`temp_name_tag`). A process killed while writing
    (SIGKILL, a power cut) cannot remove its temporary file; the next write of the same file
    on the same machine removes the ones whose process is gone
    (:func:`clean_stale_temps`), so a checkpoint killed part-way through does not leave its
    bytes hidden in the cache for good. Another machine's (or container's) are left alone:
    on a shared file system its process ids say nothing here.
    """
    path = Path(path)
    try:
        # os.replace on a link replaces the link: a checkpoint linked to a larger disk
        # became a file beside the link, on the small one, and the target stayed stale
        target = path.resolve()
    except RuntimeError as err:  # a loop of links (Python < 3.13; later, an OSError)
        raise OSError(errno.ELOOP, f"cannot follow the symbolic links to a file ({err})",
                      str(path)) from err
    target.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name holds as much of the file's name as fits: a long name that is
    # legal must not make an illegal one (mkstemp's random letters and ".tmp" follow)
    stem = shortened(target.name, name_max(target.parent) - _TEMP_ROOM)
    clean_stale_temps(target.parent, stem)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{stem}.{temp_name_tag()}-",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(target.parent)  # the rename itself, on the disk before the caller goes on
    return path


#: The most digits a process id has: Linux's largest pid_max (PID_MAX_LIMIT, 2**22 on 64-bit
#: kernels) has 7. Room for names made from a process id is counted with it, so the longest
#: name accepted does not depend on the process id a run happens to get.
PID_DIGITS = 7

#: Hex digits of the machine's tag in a temporary name (:func:`temp_name_tag`).
_HOST_DIGITS = 6

#: Bytes a temporary name of :func:`atomic_write` adds to the file's: the leading dot, the
#: dot before the tag, the tag (``HOST-PID-``), ``mkstemp``'s random letters (8 in CPython)
#: and the ``.tmp`` suffix, with a margin of 8 for the random letters.
_TEMP_ROOM = 2 + _HOST_DIGITS + 1 + PID_DIGITS + 1 + 8 + len(".tmp") + 8


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (another user's too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # no process can have this id
        return False
    return True


def _host_tag() -> str:
    """This machine's tag: the first :data:`_HOST_DIGITS` hex digits of the sha256 of its
    host name and, on Linux, its process-id namespace (containers that share a host name
    count their processes apart)."""
    try:
        space = os.readlink("/proc/self/ns/pid")
    except (OSError, AttributeError):  # not Linux
        space = ""
    host = hashlib.sha256(f"{socket.gethostname()}\0{space}".encode("utf-8", "surrogateescape"))
    return host.hexdigest()[:_HOST_DIGITS]


def temp_name_tag() -> str:
    """``HOST-PID``: this machine's tag and this process's id, as :func:`atomic_write` puts
    them in a temporary name."""
    return f"{_host_tag()}-{os.getpid()}"


def clean_stale_temps(folder: Path | str, stem: str) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` for a file named from ``stem``
    that killed processes left in ``folder``.

    Only regular files (not links) named ``.STEM.HOST-PID-XXXXXXXX.tmp`` with this machine's
    tag (:func:`temp_name_tag`) whose process ``PID`` is gone: a write in progress keeps its
    file, and so does one from another machine (or container) sharing the folder, whose
    process ids cannot be asked here. A file that cannot be removed is left; the write goes
    on. Returns the files removed.
    """
    folder = Path(folder)
    host = _host_tag()
    pattern = re.compile(re.escape(f".{stem}.{host}-") + r"([0-9]+)-[a-z0-9_]+\.tmp")
    removed = []
    for p in folder.glob(f".{glob.escape(stem)}.{host}-*.tmp"):
        m = pattern.fullmatch(p.name)
        try:
            if m and stat.S_ISREG(os.lstat(p).st_mode) and not process_alive(int(m[1])):
                p.unlink()
                removed.append(p)
        except OSError:  # gone meanwhile, or not ours to remove
            pass
    return removed


#: The longest file name, in bytes, assumed where the file system cannot be asked: POSIX's
#: NAME_MAX on Linux's and macOS's usual file systems.
DEFAULT_NAME_MAX = 255


def name_max(folder: Path | str) -> int:
    """The longest file name, in bytes, that ``folder``'s file system takes.

    Parameters
    ----------
    folder : Path or str
        The folder the name goes in; when it does not exist yet, its nearest existing
        ancestor is asked (a new folder is on that one's file system, short of a mount).

    Returns
    -------
    int
        ``pathconf``'s ``PC_NAME_MAX``, or :data:`DEFAULT_NAME_MAX` where the platform or the
        file system does not say.
    """
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or not said
        return DEFAULT_NAME_MAX
    return limit if limit > 0 else DEFAULT_NAME_MAX


def name_bytes(name: str) -> int:
    """The length of a file name in bytes as the file system sees it (``os.fsencode``)."""
    return len(os.fsencode(name))


def name_room(path: Path | str, longer: Iterable[str]) -> tuple[int, int]:
    """``(longest, room)``: the longest file name ``path``'s folder takes
    (:func:`name_max`), and the longest name ``path`` itself may have there so that the
    names made from it, ``longer`` (as they are for ``path``'s present name: a sidecar, a
    staging folder), fit too; each of them is its name and the same bytes more."""
    path = Path(path)
    longest = name_max(path.parent)
    added = max(name_bytes(n) for n in longer) - name_bytes(path.name)
    return longest, longest - added


def shortened(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes (:func:`name_bytes`) at a character's end;
    ``name`` itself when it fits."""
    name = name[:max(limit, 0)]  # a character is at least a byte
    while name and name_bytes(name) > limit:
        name = name[:-1]
    return name


#: fsync's errors that say a folder cannot be flushed on this file system (not that its
#: disk failed): a folder's fsync is then skipped.
_NO_FOLDER_SYNC = {errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP}


def sync_folder(folder: Path | str) -> None:
    """Flush ``folder``'s own entries to its disk (``fsync`` on the folder): a file made,
    renamed or removed in it survives a power cut only once its folder is flushed.

    Nothing happens where the platform cannot open a folder (Windows) or its file system
    does not flush one (EINVAL and the like); any other failure (EIO) is raised.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_FOLDER_SYNC:
            raise
    finally:
        os.close(fd)


def sync_tree(folder: Path | str) -> None:
    """Flush every file under ``folder`` and every folder in it (itself too) to its disk,
    before the folder is renamed into place: a rename that survives a power cut can
    otherwise show files whose content did not (empty ones). Links are not followed."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            p = os.path.join(root, name)
            if not stat.S_ISREG(os.lstat(p).st_mode):  # a link, a pipe (whose open waits)
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_folder(root)


def torch_save(obj: Any, path: Path | str, what: str, note: str = "") -> None:
    """``torch.save(obj, path)``, with a failed write said as the OSError it is.

    torch's writer reports a write that fails (a full disk, a missing folder, a folder at the
    path) as a RuntimeError naming a C++ source line; here it becomes an OSError naming
    ``what`` (e.g. "the checkpoint x.pt") and torch's reason, the bytes the tensors need and
    those free, and, only where the file system has less room than the tensors need, the
    advice to make room, then ``note``; the studies say it in one line.
    """
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        need = sum(t.numel() * t.element_size() for t in _tensors(obj))
        try:
            free = shutil.disk_usage(Path(path).parent).free
        except OSError:  # the folder is not there (torch's reason says so)
            free = None
        room = ("" if free is None else
                f": its tensors need about {need / 2**20:.0f} MiB and its file system has "
                f"{free / 2**20:.0f} MiB free; "
                + ("make room there, or write it elsewhere" if free <= need else
                   "room is not what failed: see torch's reason (a quota, a file-size limit, "
                   "the path itself)"))
        raise OSError(f"could not write {what} (torch: {exc}){room}"
                      + (f". {note}" if note else "")) from exc


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def jsonable(value: Any) -> Any:
    """Dataclasses, enums, paths and numpy scalars as plain JSON values.

    Parameters
    ----------
    value : object
        A dataclass instance, mapping, list, tuple, enum member, path, numpy scalar,
        one-element tensor, or a JSON scalar, nested in any way. A mapping's keys become
        strings: an enum's value, a path's or a number's text.

    Returns
    -------
    object
        The same data as dicts, lists, str, int, float, bool and None.

    Raises
    ------
    TypeError
        For any other type, also as a mapping's key (a tuple), so metadata never holds a
        ``repr`` by accident; and for a mapping two of whose keys have the same text (``1``
        and ``"1"``, an enum and its value), of which JSON would keep one value.
    """
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        return {k: jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = _json_key(k)
            if key in out:  # a dict cannot hold both: one value would be lost unsaid
                first = next(j for j in value if _json_key(j) == key)
                raise TypeError(f"cannot store a mapping whose keys {first!r} and {k!r} are "
                                f"both the JSON key {key!r}; give them distinct keys")
            out[key] = jsonable(v)
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise TypeError(f"cannot store a tensor of shape {tuple(value.shape)} as JSON metadata "
                        "(one element only); store value.tolist() for its elements")
    if isinstance(value, (np.generic, torch.Tensor)):
        return jsonable(value.item())  # a complex, bytes or a date is no JSON value either
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} as JSON metadata: {value!r}")


def json_text(value: Any) -> str:
    """``value`` (anything :func:`jsonable` takes) as strict JSON text: keys sorted, indented
    by two, one final newline.

    JSON (RFC 8259) has no NaN or infinity, and Python's ``json`` writes them as the bare
    words ``NaN`` and ``Infinity``, which other readers (``jq``, JavaScript's
    ``JSON.parse``, R's jsonlite) refuse: a float that is not finite is written as ``null``,
    as pandas' ``to_json`` writes it, and reads back as None.

    Raises
    ------
    TypeError
        What :func:`jsonable` refuses.
    """
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(jsonable(value)), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _json_key(key: Any) -> str:
    """A mapping's key as a JSON object's key: an enum by its value, a path or a number (numpy's
    too) as its text, None and a bool as ``str`` writes them; anything else (a tuple) is a
    TypeError, not its repr."""
    if isinstance(key, (enum.Enum, Path, np.generic)):
        key = jsonable(key)
    if key is None or isinstance(key, (str, int, float, bool)):
        return str(key)
    raise TypeError(f"cannot store a {type(key).__name__} as a JSON metadata key: {key!r}")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Python's and the installed packages' versions.

    Parameters
    ----------
    names : iterable of str
        Distribution names (default: qerror and the packages its results depend on).

    Returns
    -------
    dict
        ``{"python": version, name: version or None (not installed), ...}``.
    """
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
