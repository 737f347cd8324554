"""Atomic file writes (a reader sees the old file or the new one, never half of one) and the run lock (one live
command per output directory).

Every write of an adapter, checkpoint, merged model or metrics file goes through here: the bytes go to a
temporary file in the same folder, are fsynced, then renamed over the target (rename is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from lora_cli.errors import ConfigError, InUseError, LoraError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open() or mkdir() would give (mkstemp/mkdtemp make files private)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def local_path(value: str | None) -> str | None:
    """`value` as an absolute path where it names an existing file or folder (so it still does from another
    folder), else as given (None, a hub id)."""
    if value is None or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def output_path(path: str | os.PathLike, flag: str, file: bool = False) -> Path:
    """An output path as given, `~` expanded; `.` or `..` (no name of their own) as the absolute folder they
    name, since the output is written beside it under its name; a path through a symlink loop is one line.
    `-` (elsewhere a standard stream) is refused; with file=True (the output is a file) so is a path ending in a
    slash (a folder, which pathlib would make a file of that name): give the path as typed, not a Path."""
    if str(path) == "-":
        raise ConfigError(f"{flag} -: name a path to write (standard output carries the command's own output)")
    if file and str(path).endswith(("/", os.sep)):
        raise ConfigError(f"{flag} {path} ends with a slash, so it names a directory; name a file to write")
    target = Path(path).expanduser()
    try:
        target.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError("Symlink loop ..."), later ones OSError
        raise ConfigError(f"{flag} {path} runs through a symlink loop; name another path") from exc
    return Path(os.path.abspath(target)) if target.name in ("", ".", "..") else target


def check_output_file(path: str | os.PathLike, flag: str, overwrite: bool) -> None:
    """An output file a command will write once its work is done, checked before the work: not a directory, not
    an existing file unless --overwrite, in a folder that exists (or can be made) and can be written."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {target} is a directory; name a file to write")
    if (target.exists() or target.is_symlink()) and not overwrite:  # a dangling link too: it would be replaced
        raise ConfigError(f"{flag} {target} already exists; choose a new file or pass --overwrite to replace it")
    folder = _existing_ancestor(target)  # the folders below it, atomic_path would make
    # a path that cannot be written is exit code 1, as merge's and export's are (the flag itself is well formed)
    if not folder.is_dir():
        raise LoraError(f"{flag} {target}: {folder} is not a directory; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LoraError(f"{flag} {target}: {folder} is not writable; choose a writable location")


def _existing_ancestor(target: Path) -> Path:
    """The nearest folder above `target` that exists (or a file in a folder's place)."""
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _make_parent(target: Path, error: type[LoraError] = LoraError) -> None:
    """The folders above `target`, made where missing; a file in their place is named (mkdir says only "File
    exists")."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = _existing_ancestor(target)
        if not blocker.is_dir():
            raise error(f"cannot write {target}: {blocker} is not a directory; choose another path") from exc
        raise error(f"cannot write {target}: {exc.strerror or exc}; choose a writable location") from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on failure it vanishes."""
    target = Path(path)
    _make_parent(target)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise LoraError(f"cannot write {target}: {exc.strerror or exc}; choose a writable location") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if target.is_dir():  # os.replace cannot put a file over a directory
            raise LoraError(f"cannot write {target}: it is a directory; name a file") from exc
        raise LoraError(f"cannot write {target}: {exc.strerror or exc}; check free disk space and permissions") from exc
    except Exception as exc:
        # Writers wrap ENOSPC in their own errors (safetensors: SafetensorError, torch.save: RuntimeError
        # "unexpected pos"): a full disk is still the user's to fix, so say so in one line.
        full = _disk_full(target.parent, exc)
        tmp.unlink(missing_ok=True)
        if full:
            raise LoraError(f"cannot write {target}: No space left on device; free some disk space") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _disk_full(folder: Path, exc: BaseException) -> bool:
    if "No space left on device" in str(exc) or "os error 28" in str(exc):
        return True
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 2**20  # (checked before the temporary file is removed)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back until the block ends, then raised again for the handlers it replaced: for
    steps that must not stop half-way. Held by handlers that only note them (a signal mask would not do: the kernel
    gives a process signal to any thread that does not block it, such as torch's OpenMP workers, and Python still
    runs the handler). Off the main thread, where handlers cannot be set, the block runs as it is."""
    caught: list[int] = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, error: type[LoraError] = LoraError) -> Iterator[Path]:
    """Yield a staging folder beside `path`; when the block succeeds the folder replaces `path` (an older one is
    removed only after the new one is in place), when it fails the folder vanishes. Failures are one `error`
    naming `path`, never the hidden staging folder."""
    out = Path(path)
    if out.is_symlink():  # written through, as a run's out_dir is (replacing the link left its target as it was)
        out = Path(os.path.realpath(out))
    _make_parent(out, error)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        os.chmod(staging, default_mode(directory=True))
    except OSError as exc:
        raise error(f"cannot write {out}: {exc.strerror or exc}") from exc
    try:
        yield staging
        with signals_deferred():  # a Ctrl-C between the two renames left `out` missing, its old copy hidden
            old = None
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
            try:
                os.replace(staging, out)
            except OSError:
                if old is not None:
                    os.replace(old, out)  # the earlier output stays where it was
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except (LoraError, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        reason = str(exc) if isinstance(exc, LoraError) else f"cannot write {out}: {exc.strerror or exc}"
        raise error(reason.replace(str(staging), str(out))) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync it; a crash loses at most the line being written (readers skip a torn tail)."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise LoraError(f"cannot write {path}: {exc.strerror or exc}; check free disk space and permissions") from exc


# ------------------------------------------------------------------------------------------------ run lock


def lock_path(directory: str | os.PathLike) -> Path:
    """Where the lock of `directory` lives: `.lock.NAME` beside it, not inside, because `lora merge` replaces its
    output directory whole (atomic_dir) and a run directory may not exist yet; not `.NAME.*`, the pattern of
    atomic_dir's leftovers that SECURITY.md calls safe to delete. The path is resolved, so every spelling of one
    directory (relative, trailing slash, through a symlink) shares one lock."""
    try:
        resolved = Path(directory).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError on Python 3.11)
        raise LoraError(f"{directory} runs through a symlink loop; name another path") from exc
    return resolved.parent / f".lock.{resolved.name}"


def process_start_time(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22), or None where there
    is no /proc or no such process. With the pid it names one process: a pid is reused, the pair is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # after the command name, which may hold spaces and parentheses


def holder_alive(record: dict) -> bool:
    """Whether the process a lock file names still runs: its pid exists with the recorded start time. A process
    on another host cannot be checked and counts as alive."""
    if record.get("host") != socket.gethostname():
        return True
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    start = process_start_time(pid)
    return start is None or record.get("start") is None or start == record["start"]


# flock is not available on every filesystem (some FUSE and old NFS mounts answer one of these)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """Hold `directory` for one command (`what`: "lora train", "lora merge") until release or the end of the
    `with RunLock(out_dir, "lora train", "out_dir"):` block; a second holder, in this process or another, is
    refused with an InUseError naming the process that holds it.

    Why flock on a lock file: the kernel drops the lock when the holding process ends, however it ends (SIGKILL,
    out of memory, power loss), so a lock left by a dead process never blocks and nothing has to decide when a
    lock is stale. An O_CREAT|O_EXCL file instead outlives a killed process, and taking over a stale one races
    with a second taker. The file records pid, process start time, host and command, for the refusal message,
    and as the liveness test on filesystems without flock (a pid whose start time differs was reused). On release
    the file is removed while still locked; a taker checks after flock that the file it locked is still the one
    at the path, and else starts again on the new one."""

    def __init__(self, directory: str | os.PathLike, what: str, name: str = "directory"):
        self.directory = Path(directory)
        self.what = what
        self.name = name  # how the refusal names the directory: "out_dir", "--out"
        self.path = lock_path(directory)
        self._fd: int | None = None
        self._created: list[Path] = []  # parent folders made to hold the lock file, removed again if left empty

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(10):  # each pass loses only to a holder that released in between
            made = self._make_parent()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_mode())
            except OSError as exc:
                if made and isinstance(exc, FileNotFoundError) and not self.path.parent.is_dir():
                    continue  # the parent was just removed by a holder that had created it
                self._remove_created()
                raise LoraError(f"cannot lock {self.name} {self.directory}: cannot create {self.path} "
                                f"({exc.strerror or exc}); put {self.name} in a writable folder") from exc
            try:
                ours = self._lock(fd) and self._still_at_path(fd)
            except BaseException:
                os.close(fd)
                self._remove_created()
                raise
            if not ours:
                os.close(fd)
                continue
            self._fd = fd
            try:
                self._write_record(fd)
            except OSError as exc:
                self.release()
                raise LoraError(f"cannot lock {self.name} {self.directory}: cannot write {self.path} "
                                f"({exc.strerror or exc}); check free disk space and permissions") from exc
            return
        self._remove_created()
        raise LoraError(f"cannot lock {self.name} {self.directory}: {self.path} keeps changing; try again")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: see the class docstring
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _lock(self, fd: int) -> bool:
        """True when `fd` is ours; raises InUseError when a live process holds it."""
        import fcntl  # POSIX only; imported here so that the rest of fsutil imports anywhere

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            raise InUseError(self._refusal(self._read_record(fd, wait=True))) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise LoraError(f"cannot lock {self.name} {self.directory}: {self.path}: {exc.strerror or exc}") from exc
        record = self._read_record(fd, wait=False)  # no flock here: trust the record
        if record and holder_alive(record):
            raise InUseError(self._refusal(record))
        return True

    def _still_at_path(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _write_record(self, fd: int) -> None:
        record = {"pid": os.getpid(), "start": process_start_time(os.getpid()), "host": socket.gethostname(),
                  "command": self.what, "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)

    @staticmethod
    def _read_record(fd: int, wait: bool) -> dict:
        """The holder's record. It writes it right after taking the lock: when `wait`, allow it a moment."""
        for _ in range(50 if wait else 1):
            try:
                record = json.loads(os.pread(fd, 4096, 0) or b"null")
            except (OSError, ValueError):
                record = None
            if isinstance(record, dict):
                return record
            if wait:
                time.sleep(0.01)
        return {}

    def _refusal(self, record: dict) -> str:
        if not record:
            holder = f"another process (its lock {self.path} names none yet)"
        else:
            host = "" if record.get("host") == socket.gethostname() else f" on host {record.get('host')}"
            since = f", since {record['since']}" if record.get("since") else ""
            holder = f"{record.get('command', 'another command')} (process {record.get('pid')}{host}{since})"
        return f"{self.name} {self.directory} is in use by {holder}; wait for it to end or choose another {self.name}"

    def _make_parent(self) -> bool:
        """Make the missing folders above the lock file; False when one cannot be made (os.open names why)."""
        missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        for folder in reversed(missing):  # top first
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except PermissionError as exc:  # a retry cannot help: say so (the lock's loop would call it churn)
                self._remove_created()
                raise LoraError(f"cannot lock {self.name} {self.directory}: cannot create {folder} "
                                f"({exc.strerror or exc}); put {self.name} in a writable folder") from exc
            except OSError:
                return False
            self._created.append(folder)
        return True

    def _remove_created(self) -> None:
        """A run that ends before writing anything leaves the file system as it found it."""
        while self._created:
            try:
                self._created.pop().rmdir()  # deepest first; only an empty folder goes
            except OSError:
                self._created.clear()
                break
