"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every write of an adapter, checkpoint, merged model or metrics file goes through here: the bytes go to a
temporary file in the same folder, are fsynced, then renamed over the target (rename is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lora_cli.errors import LoraError


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on failure it vanishes."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
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
def atomic_dir(path: str | os.PathLike, error: type[LoraError] = LoraError) -> Iterator[Path]:
    """Yield a staging folder beside `path`; when the block succeeds the folder replaces `path` (an older one is
    removed only after the new one is in place), when it fails the folder vanishes. Failures are one `error`
    naming `path`, never the hidden staging folder."""
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        os.chmod(staging, default_mode(directory=True))
    except OSError as exc:
        raise error(f"cannot write {out}: {exc.strerror or exc}") from exc
    try:
        yield staging
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(staging, out)
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
