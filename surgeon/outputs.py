"""Where surgeon writes: a whole directory or file, or nothing; never outside OUT, never over an input.

- A directory is filled in a temporary sibling ``.<OUT>.tmp-<pid>-<random>`` and renamed into place.
- The final rename never replaces an OUT that appeared while we worked (``renameat2(RENAME_NOREPLACE)``);
  ``force`` replaces an OUT that existed at the start by an atomic exchange, then deletes the old copy.
- OUT may not be, contain, or (when it exists) lie inside an input: ``force`` never destroys what it reads.
- Temporary siblings left by a process that died (kill -9) are swept, with a notice, on the next write to that OUT;
  SIGTERM runs the same clean-up as an exception (the CLI turns it into ``SystemExit``).
- Modes follow the umask, as for any file the user creates (``mkdtemp``/``mkstemp`` alone give 0700/0600).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from surgeon.errors import AdapterError, OutputError, SurgeonError, SurgeonNotice, WriteError
from surgeon.names import MODEL_FILES

_TMP, _OLD = ".tmp-", ".old-"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2``; False when the kernel or filesystem does not offer it (the caller falls back)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` when ``dst`` exists (checked atomically where Linux can)."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as err:
        if err.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(out: Path) -> list[Path]:
    """Remove temporary siblings of ``out`` whose writing process is gone; return what was removed."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in (_TMP, _OLD):
        for stale in out.parent.glob(f".{out.name}{kind}*"):
            pid = stale.name[len(f".{out.name}{kind}"):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
                removed.append(stale)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary director{'y' if len(removed) == 1 else 'ies'} left by an "
                      f"interrupted earlier write to {out}: {', '.join(p.name for p in removed)}", SurgeonNotice,
                      stacklevel=3)
    return removed


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def check_out(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *, force: bool = False,
              what: str = "OUT") -> Path:
    """OUT resolved; refused when it exists (unless ``force``), or is, contains, or (existing) lies inside an input."""
    out = _resolved(out)
    exists = os.path.lexists(out)
    empty = exists and out.is_dir() and not any(out.iterdir())  # an empty directory is as good as none
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if out == source:
            raise OutputError(f"{what} {out} is an input of this command; writing there would destroy it: choose "
                              "another -o")
        if source.is_relative_to(out):
            raise OutputError(f"{what} {out} contains the input {source}; replacing it would destroy that input: "
                              "choose another -o")
        if exists and out.is_relative_to(source):
            raise OutputError(f"{what} {out} lies inside the input {source}; replacing it would change that input: "
                              "choose an -o outside it")
    if exists and not force and not empty:
        raise OutputError(f"{out}: exists already; choose another -o or pass --force to replace it")
    if exists and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; choose another -o")
    return out


def write_dir_atomically(out: str | os.PathLike, fill: Callable[[Path], None], *, force: bool = False,
                         inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Call ``fill(tmp_dir)``, then rename ``tmp_dir`` to ``out``; on any error (or SIGTERM) nothing is left."""
    out = check_out(out, inputs, force=force)
    existed = out.exists()
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep(out)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}{_TMP}{os.getpid()}-"))
        _follow_umask(tmp, directory=True)
    except OSError as err:
        raise OutputError(f"{out}: cannot write there ({err.strerror}); choose a writable -o") from None
    # deferred: safetensors raises its own error for I/O failures (disk full) while serialising, but outputs is
    # imported by the CLI before any command runs, where the import would cost time for nothing
    from safetensors import SafetensorError

    try:
        fill(tmp)
        if existed and out.exists():
            _replace(tmp, out)
        else:
            try:
                rename_noreplace(tmp, out)
            except FileExistsError:
                raise OutputError(f"{out}: appeared while surgeon was writing; it was left as it is and the result "
                                  "discarded: run again with another -o (or --force to replace it)") from None
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, SurgeonError):  # a refusal from inside fill (e.g. an unreadable input): as it is
            raise
        reason = getattr(err, "strerror", None) or str(err)
        raise WriteError(f"{out}: writing failed ({reason}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Swap ``tmp`` into ``out`` (atomic exchange where Linux offers it), then delete the old copy."""
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old OUT
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{_OLD}{os.getpid()}-"))
    os.replace(out, old / "replaced")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def check_file_target(path: Path) -> Path:
    """``path`` when a file can be written there: its nearest existing parent is a writable directory."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise OutputError(f"{path}: cannot write there ({parent} is "
                                  f"{'not a directory' if not parent.is_dir() else 'not writable'})")
            break
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place (mode from the umask)."""
    path = check_file_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP}{os.getpid()}-")
    except OSError as err:
        raise OutputError(f"{path}: cannot write there ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _follow_umask(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_name(name: object, what: str = "adapter name") -> str:
    """``name`` when it can be one file or directory name inside OUT; otherwise an error saying why.

    One path component: not empty, not ``.`` or ``..``, no ``/`` or ``\\``, no control characters.
    Every name that becomes a path (``--name``, ``adapter_name`` in ``save_pretrained``) passes here.
    """
    problem = None
    if not isinstance(name, str):
        problem = f"must be a string, got {type(name).__name__}"
    elif not name.strip():
        problem = "is empty"
    elif name in (".", ".."):
        problem = "is a directory reference, not a name"
    elif any(sep in name for sep in ("/", "\\")):
        problem = "contains a path separator; it must be one name, not a path"
    elif any(ord(ch) < 32 for ch in name):
        problem = "contains a control character"
    elif len(name.encode()) > 200:
        problem = "is longer than 200 bytes"
    if problem:
        raise AdapterError(f"{what} {name!r} {problem}; use letters, digits, '-', '_' or '.' (e.g. 'my-adapter')")
    return name


def refuse_model_dir(directory: Path) -> None:
    """An adapter never goes into a model's directory: transformers would then load that model as a PEFT model."""
    found = [name for name in MODEL_FILES if (Path(directory) / name).is_file()]
    if found:
        raise AdapterError(f"{directory}: is a model directory (it holds {', '.join(found)}); adapters go in their own "
                           "directory, e.g. -o runs/my-adapter")
