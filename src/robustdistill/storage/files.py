"""Writing files so that a reader never sees half of one and a crash loses nothing, one writer per
folder (`FolderLock`), and torch files read without running code (`load_torch`)."""

from __future__ import annotations

import fcntl
import glob
import io
import os
import socket
import tempfile
from collections.abc import Callable
from errno import EACCES, ENOSPC, EROFS
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointError, UserError

HOST = socket.gethostname()
INSIDE_LOCK = ".robustdistill-lock"  # an evaluation folder's lock file (FolderLock(..., inside=True))


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, flush it to disk, then rename over `path`: a reader never sees half
    a file, and a crash leaves either the old or the new one. The file gets the usual permissions
    (0666 less the umask, not mkstemp's 0600); temporaries left by an interrupted earlier write of
    the same file are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        if not _owner_alive(stale.name[len(prefix) :]):  # another live process's write is left alone
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as exc:  # a full or read-only disk, reported by Python or by a writer library
        errno = getattr(exc, "errno", None)
        if errno == ENOSPC or "No space left on device" in str(exc):
            raise UserError(
                f"no space left on the device while writing {path} (unchanged: the write went to a temporary "
                "file, now removed); free some space and run again (--resume continues a run from its last checkpoint)"
            ) from None
        if errno in (EROFS, EACCES):
            raise UserError(f"cannot write {path}: {os.strerror(errno)}") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _owner_alive(rest: str) -> bool:
    """Whether the process that named a temporary `<host>.<pid>.<random>.tmp` may still be writing
    it: a process of another host (a shared file system) is assumed alive; names without host and
    pid (written before they carried them) are stale."""
    parts = rest.split(".")
    if len(parts) < 4 or not parts[-3].isdigit():
        return False
    host, pid = ".".join(parts[:-3]), int(parts[-3])
    if host != HOST:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class FolderLock:
    """An exclusive lock on a folder (a run, an evaluation) while one process writes it: `flock` on
    the sibling file `.NAME.lock`, which the operating system releases when the process ends, however
    it ends (kill -9 included), so a lock is never left behind. A second process is refused in one
    line that names the holder. (Across machines it holds where the shared file system supports
    flock, as NFSv4 and Lustre do.)"""

    def __init__(self, folder: str | Path, what: str, inside: bool = False):
        self.folder, self.what = Path(folder), what
        # beside the folder by default (a run folder is replaced whole by --force); `inside`: in it
        self.path = self.folder / INSIDE_LOCK if inside else self.folder.parent / f".{self.folder.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # the holder says what it is doing (a training, an evaluation, an export), not what we want
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process is using it"
            os.close(fd)
            raise UserError(
                f"{self.folder} is in use: {holder}; wait for it to finish (or stop it), or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"robustdistill pid {os.getpid()} on {HOST} is {self.what} it".encode())
        self._fd = fd
        return self

    def discard(self) -> None:
        """Release and remove the lock file: the folder it guarded is gone (a failed start). Unlinked
        while held, so a process that opens it now is refused, and one that comes later makes a new one."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (not possible on every platform or file system)."""
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


def save_torch(obj: Any, path: str | Path) -> None:
    """`torch.save` atomically. Serialised in memory first: writing the bytes then fails as a plain
    write does (a full disk is ENOSPC, reported in one line), where torch's own file writer fails
    with an internal position error."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def load_torch(path: str | Path) -> Any:
    """`torch.load` restricted to tensors and plain containers (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - torch raises many types for unsafe or corrupt files
        pass
    try:  # lists the pickle's globals without executing anything
        refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001
        refused = []
    if any(name.startswith("torch.nn.modules.") for name in refused):
        raise CheckpointError(
            f"{path} holds a whole pickled model, not a state dict; loading it would run arbitrary code, so this "
            "tool refuses: in Python, load it from a source you trust and save model.state_dict() instead"
        ) from None
    if refused:
        shown = ", ".join(sorted(refused)[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise CheckpointError(
            f"{path} needs the Python object(s) {shown}, which this tool refuses to unpickle (weights_only=True "
            "loads tensors and plain containers only); save a plain state dict of tensors instead"
        ) from None
    raise CheckpointError(
        f"{path} is truncated or not a PyTorch checkpoint (torch.save file); re-save or re-copy it"
    ) from None
