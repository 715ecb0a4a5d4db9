"""Reading files that someone else may control: regular files only, never blocking, never past a cap.

`read_regular(path, max_bytes)` is the one way llava-cli reads a file whose path or content is not
the user's own doing (images, saved conversations, discovery files, the input history):
- the file is opened with O_NONBLOCK, so opening a FIFO returns at once instead of waiting for a
  writer; with `follow_symlinks=False` also with O_NOFOLLOW, so a link planted in one of our
  folders is refused instead of followed to /dev/zero or someone else's file;
- the *opened descriptor* is checked with fstat (checking the path first and reading it later
  could be fooled by a swap in between): anything but a regular file - a directory, FIFO, device,
  socket - raises `NotRegularFile`;
- with `private=True` the file must also belong to the current user and be writable by nobody else,
  else `NotPrivate` (files other local users could have planted or can change);
- at most `max_bytes` are read, whatever `st_size` claims (a file can grow while it is read, and
  special files report 0): one byte more raises `FileTooLarge`.
A path no file can have (a NUL byte, a lone surrogate) raises `BadPath` instead of ValueError.
All of these are `OSError`s whose `strerror` is a readable reason, so a caller's existing
`cannot read PATH: {err.strerror}` message reads well; errors from `open` itself (missing file,
permission denied) pass through unchanged. `open_regular(path, flags)` does the same checks and
returns the descriptor (for files that are written, such as the input history). `private_folder(path)` applies the ownership rule to a
folder; `make_private_dir(path)` creates llava-cli's own folders 0700 whatever the umask. This
module imports nothing of llava-cli's, so anything may use it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

READ_CHUNK = 1 << 20
OTHERS_MAY_WRITE = stat.S_IWGRP | stat.S_IWOTH
FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


class NotRegularFile(OSError):
    """The path is a directory, FIFO, device, socket (or a refused symlink), not a regular file."""

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        super().__init__(errno.EINVAL, f"it is {kind}, not a regular file", str(path))
        self.kind = kind


class FileTooLarge(OSError):
    """The file holds more than the reader's byte cap."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        super().__init__(errno.EFBIG, f"it is larger than {max_bytes:,} bytes", str(path))
        self.max_bytes = max_bytes


class BadPath(OSError):
    """The path cannot name a file at all (it holds a NUL byte or an unencodable character)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.EINVAL, "it is not a valid path (a NUL byte or an unencodable character)", repr(str(path)))


class NotPrivate(OSError):
    """The file or folder belongs to another user, or others may write to it."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(errno.EPERM, reason, str(path))


def kind_of(mode: int) -> str:
    return FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_private(status: os.stat_result, path: str | os.PathLike[str]) -> None:
    """Raise `NotPrivate` unless `status` belongs to the current user and no one else may write to it."""
    if hasattr(os, "getuid") and status.st_uid != os.getuid():
        raise NotPrivate(path, f"it belongs to another user (uid {status.st_uid})")
    if status.st_mode & OTHERS_MAY_WRITE:
        raise NotPrivate(path, f"others may write to it (mode {stat.S_IMODE(status.st_mode):04o})")


def private_folder(path: str | os.PathLike[str]) -> None:
    """Raise `NotPrivate` (or the OSError of lstat) unless `path` is a folder, not a link, that only we can change."""
    status = os.lstat(path)
    if not stat.S_ISDIR(status.st_mode):
        raise NotRegularFile(path, kind_of(status.st_mode))
    check_private(status, path)


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` (and any missing parents) as 0700 whatever the umask; an existing `path` of ours is tightened to 0700.

    `mkdir(mode=0o700)` alone is not enough: `parents=True` creates the parents with the umask's
    default (0755, or 0777 under umask 000), and an umask can even take the owner's own bits away.
    """
    folder = Path(path)
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        try:
            os.mkdir(created, 0o700)
        except FileExistsError:  # made by someone else meanwhile: checked below like any existing folder
            continue
        os.chmod(created, 0o700)
    status = os.stat(path)
    if hasattr(os, "getuid") and status.st_uid == os.getuid() and stat.S_IMODE(status.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return Path(path)


def open_regular(
    path: str | os.PathLike[str], flags: int = os.O_RDONLY, follow_symlinks: bool = True, private: bool = False
) -> int:
    """A descriptor of the regular file at `path` (opened without blocking), checked as the module docstring says."""
    flags |= getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)  # the mode only matters with O_CREAT
    except ValueError:  # a NUL byte, or a lone surrogate from undecodable JSON: no file can have that name
        raise BadPath(path) from None
    except OSError as err:
        if err.errno == errno.ELOOP and not follow_symlinks and Path(path).is_symlink():
            raise NotRegularFile(path, "a symbolic link") from None
        raise
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise NotRegularFile(path, kind_of(status.st_mode))
        if private:
            check_private(status, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(
    path: str | os.PathLike[str], max_bytes: int, follow_symlinks: bool = True, private: bool = False
) -> bytes:
    """The bytes of the regular file at `path`, at most `max_bytes` of them; see the module docstring."""
    fd = open_regular(path, os.O_RDONLY, follow_symlinks, private)
    try:
        return read_capped(fd, path, max_bytes)
    finally:
        os.close(fd)


def read_capped(fd: int, path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """Read `fd` to its end, raising `FileTooLarge` as soon as it gives more than `max_bytes`."""
    data = bytearray()
    while chunk := os.read(fd, min(READ_CHUNK, max_bytes + 1 - len(data))):
        data += chunk
        if len(data) > max_bytes:
            raise FileTooLarge(path, max_bytes)
    return bytes(data)
