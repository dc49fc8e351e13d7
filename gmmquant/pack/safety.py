"""Safe reading of model directories and safe writing of output directories.

Writing (`atomic_output_dir`): one writer per output path at a time (a lock beside it; the loser gets
`OutputBusyError`), the output built in a temporary sibling and swapped into place atomically
(`renameat2(RENAME_EXCHANGE)`; where the filesystem lacks it, two renames whose interruption the next run
repairs), leftovers of killed runs cleaned by the next run on that path, and `overwrite` limited to
directories gmmquant wrote itself (a manifest lists their files), never the source, the current directory,
a symlink or a directory holding anything else. Output directories get the process umask's permissions.

Reading: file names that come from inside a checkpoint (index entries) must be plain relative names inside
the directory, and everything read or copied must be a regular file (following symlinks, as the Hugging
Face hub cache needs), so a FIFO or a link to `/dev/zero` can neither hang nor fill the disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; outputs are still atomic, but not locked against a second writer
    fcntl = None  # type: ignore[assignment]

MANIFEST = ".gmmquant-output.json"
LOCK_SUFFIX = ".lock"


class OutputError(ValueError):
    """An output directory gmmquant refuses to write (it would destroy data it does not own)."""


class OutputBusyError(OutputError):
    """Another process is writing the same output directory."""


class UnsafeFileError(ValueError):
    """A file of a model directory that is not safe to read (a path outside it, a device, a FIFO...)."""


# --- reading ------------------------------------------------------------------------------------------------


def regular_file(path: Path, what: str = "file") -> Path:
    """`path` if it is a regular file (symlinks followed); UnsafeFileError naming it otherwise.

    Raises FileNotFoundError if nothing is there.
    """
    st = os.stat(path)  # follows symlinks: a hub-cache link to a blob is a regular file
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket")
        link = f" (a symlink to {os.path.realpath(path)})" if os.path.islink(path) else ""
        raise UnsafeFileError(f"{path}: {what} is {kind}{link}, not a regular file (rule: model directories hold regular files only)")
    return path


def member_file(root: Path, name: Any, where: str) -> Path:
    """The file `name` (from an index or config inside `root`) as a path inside `root`.

    Rule: a plain relative name with no `..` component and no absolute path, so a checkpoint can never make
    gmmquant read (or copy out) files outside its own directory.
    """
    if not isinstance(name, str) or not name:
        raise UnsafeFileError(f"{where}: file name {name!r} is not a non-empty string")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or "\x00" in name:
        raise UnsafeFileError(f"{where}: file name {name!r} points outside {root} (rule: shard files are relative "
                              "names inside the checkpoint directory, without '..')")
    return root / pure


def read_json_object(path: Path, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object from a regular file, with one clear error for every way it can be wrong."""
    from .format import FormatError

    try:
        regular_file(path, what)
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise FormatError(f"{path}: no {what}") from err
    except UnicodeDecodeError as err:
        raise FormatError(f"{path}: {what} is not UTF-8 text (byte {err.start}: {err.reason})") from err
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: {what} is invalid JSON ({err})") from err
    except UnsafeFileError as err:
        raise FormatError(str(err)) from err
    if not isinstance(data, dict):
        raise FormatError(f"{path}: {what} must hold a JSON object, got {type(data).__name__}")
    return data


def read_model_config(path: Path) -> dict[str, Any]:
    """A model's config.json (`read_json_object`), refusing negative counts and sizes before transformers sees them,
    and special files (FIFOs, devices) anywhere at the top of the model directory.

    Rule: every integer `num_*`, `n_*`, `*_size`, `*_dim` or `*experts*` setting (top level and nested `*_config`) is >= 0;
    transformers would otherwise fail deep inside model construction ("negative dimension").
    """
    from .format import FormatError

    config = read_json_object(path, "config.json")
    special = []
    for entry in Path(path).parent.iterdir():  # a FIFO among the files transformers reads (tokenizer...) would hang
        try:
            mode = os.stat(entry).st_mode
        except OSError:
            continue  # a dangling link: whoever needs it reports it missing
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
            special.append(entry.name)
    if special:
        raise FormatError(f"{Path(path).parent}: {sorted(special)} are FIFOs, devices or sockets (rule: model directories "
                          "hold regular files only; reading one could hang or never end)")
    sections = [("", config)] + [(f"{k}.", v) for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    for prefix, section in sections:
        for key, value in section.items():
            sized = key.startswith(("num_", "n_")) or key.endswith(("_size", "_dim")) or "experts" in key
            if sized and isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise FormatError(f"{path}: {prefix}{key} is {value}; counts and sizes must not be negative")
    return config


def copy_tree_safely(source: Path, target: Path) -> None:
    """Copy a directory of regular files (and real subdirectories); refuse links to directories and special files."""
    target.mkdir()
    for path in sorted(source.iterdir()):
        if path.is_dir() and not path.is_symlink():
            copy_tree_safely(path, target / path.name)
        else:
            shutil.copyfile(regular_file(path, "side file"), target / path.name)


# --- writing ------------------------------------------------------------------------------------------------


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask alone must set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _parent_mutex(parent: Path) -> Iterator[None]:
    """A short exclusive section among gmmquant processes writing into `parent` (guards lock-file handover)."""
    if fcntl is None:
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `out` for the block; OutputBusyError if another live process holds it.

    The kernel drops a flock when its process dies, so a killed writer never blocks the next run. The lock
    file is created and removed under a directory-wide mutex, so no two processes can lock different files.
    """
    if fcntl is None:
        yield
        return
    lock = out.parent / f".{out.name}{LOCK_SUFFIX}"
    with _parent_mutex(out.parent):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputBusyError(f"{out}: another gmmquant process (pid {holder}) is writing this output directory; "
                                  "wait for it to finish or choose another output") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        with _parent_mutex(out.parent):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            os.close(fd)


def _leftovers(out: Path, kind: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(os.path.join(glob.escape(str(out.parent)), f".{glob.escape(out.name)}.{kind}-*")))


def recover_leftovers(out: Path) -> list[Path]:
    """Repair and clean what killed writers of `out` left (call under `output_lock`); return what was removed.

    `.<name>.old-*` is the previous output moved aside by the two-rename fallback: if the kill came before the
    new one took its place, it goes back to `out`. `.<name>.tmp-*` are unfinished outputs.
    """
    olds = _leftovers(out, "old")
    if olds and not os.path.lexists(out):
        os.replace(olds.pop(), out)
    removed = _leftovers(out, "tmp") + olds
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _probe_lock(out: Path) -> None:
    """OutputBusyError now if a live process holds `out`'s lock (so a long job fails before it starts)."""
    if fcntl is None:
        return
    try:
        fd = os.open(out.parent / f".{out.name}{LOCK_SUFFIX}", os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody is writing
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        raise OutputBusyError(f"{out}: another gmmquant process (pid {holder}) is writing this output directory; "
                              "wait for it to finish or choose another output") from None
    finally:
        os.close(fd)


def check_output_target(out_dir: "str | os.PathLike", overwrite: bool, protect: Iterable["str | os.PathLike"] = (),
                        *, probe_lock: bool = False) -> Path:
    """Refuse an output path whose writing would destroy data gmmquant does not own; return it absolute.

    `probe_lock`: also fail now if another process is writing it (for checks before long work; not while
    holding the lock oneself).

    Raises:
        OutputError: the output is (or contains) a source in `protect`, is the current directory, a symlink or
            not a directory, or (with `overwrite`) holds files that no gmmquant manifest lists.
        OutputBusyError: `probe_lock` and another process is writing it.
        FileExistsError: it exists, is not empty, and `overwrite` is false.
    """
    out = Path(os.path.abspath(out_dir))
    if probe_lock and out.parent.is_dir():
        _probe_lock(out)
    real = Path(os.path.realpath(out))
    for source in protect:
        src = Path(os.path.realpath(source))
        if _is_within(src, real):
            raise OutputError(f"output {out_dir} is {'the source' if src == real else 'a directory holding the source'} "
                              f"{source}: writing it would destroy the source; choose another output directory")
    if _is_within(Path(os.path.realpath(os.getcwd())), real):
        raise OutputError(f"output {out_dir} is the current directory (or holds it); choose a new directory name")
    if not os.path.lexists(out):
        return out
    if out.is_symlink():
        raise OutputError(f"output {out_dir} is a symbolic link; pass the directory itself or another name")
    if not out.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a directory; choose another output")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return out  # an empty directory is as good as none
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another output directory or pass overwrite=True "
                              "(--overwrite)")
    try:
        owned = set(json.loads((out / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        owned = None
    foreign = [e for e in entries if owned is None or e not in owned]
    if foreign:
        why = ("it has no gmmquant manifest (written by another tool or an older gmmquant)" if owned is None
               else f"it holds files gmmquant did not write: {foreign[:5]}{' ...' if len(foreign) > 5 else ''}")
        raise OutputError(f"refusing to overwrite {out_dir}: {why}; overwrite replaces only gmmquant's own outputs. "
                          "Remove it yourself or choose another output directory")
    return out


class _NoExchange(Exception):
    pass


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); _NoExchange where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        raise _NoExchange() from None
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise _NoExchange()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _replace_existing(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out` (an existing directory) so that `out` always holds a whole output."""
    try:
        _exchange(tmp, out)  # tmp now holds the previous output
        shutil.rmtree(tmp, ignore_errors=True)
        return
    except _NoExchange:
        pass
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)  # a kill between the two renames: the next run's recover_leftovers restores `old`
    shutil.rmtree(old, ignore_errors=True)


def _write_manifest(directory: Path) -> None:
    files = sorted([p.name for p in directory.iterdir()] + [MANIFEST])
    (directory / MANIFEST).write_text(json.dumps({"written_by": "gmmquant", "files": files}, indent=1) + "\n")


@contextlib.contextmanager
def atomic_output_dir(out_dir: "str | os.PathLike", overwrite: bool = False,
                      protect: Iterable["str | os.PathLike"] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out_dir` when the block finishes without error.

    Args:
        out_dir: the directory to create (an existing empty directory is fine).
        overwrite: replace an existing output that gmmquant wrote (atomically; see `check_output_target`).
        protect: source paths the output must not be, nor contain.

    Raises:
        OutputBusyError: another process holds this output's lock.
        OutputError, FileExistsError: see `check_output_target`.
    """
    protect = list(protect)
    out = check_output_target(out_dir, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)  # mode from the umask
    with output_lock(out):
        recover_leftovers(out)
        check_output_target(out_dir, overwrite, protect)  # again: another run may have finished meanwhile
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are ordinary directories
            yield tmp
            _write_manifest(tmp)
            if out.is_dir() and any(out.iterdir()):
                _replace_existing(tmp, out)
            else:
                os.replace(tmp, out)  # rename onto an empty directory is allowed
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# --- scratch space ------------------------------------------------------------------------------------------


def _clean_stale_scratch(base: Path, prefix: str) -> None:
    """Remove scratch directories whose owner died (their lock file can be locked again)."""
    if fcntl is None:
        return
    for path in base.glob(glob.escape(prefix) + "*"):
        lock = path / LOCK_SUFFIX
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue  # not ours, or still being set up
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path, ignore_errors=True)
        except BlockingIOError:
            pass  # its process is alive
        finally:
            os.close(fd)


@contextlib.contextmanager
def scratch_dir(prefix: str = "gmmquant-scratch-") -> Iterator[str]:
    """A temporary directory (e.g. disk offload of a model) that a killed run's successor removes.

    Like `tempfile.TemporaryDirectory`, plus a lock held for the directory's life: any later `scratch_dir`
    with the same prefix deletes directories whose lock is free (their process died without cleaning up).
    """
    base = Path(tempfile.gettempdir())
    _clean_stale_scratch(base, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    fd = os.open(path / ".lock-new", os.O_RDWR | os.O_CREAT, 0o600)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.replace(path / ".lock-new", path / LOCK_SUFFIX)  # visible to cleaners only once locked
    try:
        yield str(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
