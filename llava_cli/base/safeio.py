"""Files and folders that someone else may control: read regular files only, never blocking, never
past a cap; write only into folders of ours, never through a planted name.

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
returns the descriptor (for files that are written, such as the input history).

Writing, in folders and files another local user may have prepared (a shared XDG_RUNTIME_DIR, a
planted symlink in place of a folder or file), goes through the writers below and nothing else:
- `make_private_dir(path)` creates missing folders with `mkdir` (0700 whatever the umask), then
  checks the folder itself with `lstat`: a folder, not a link, ours, no one else may write to it
  (read bits of an old folder of ours are taken away), else `NotPrivate`. `private_folder(path)`
  is the same check without creating or tightening.
- `write_private_file(path, data)` replaces a file in such a folder: the folder is opened once
  (O_NOFOLLOW) and checked through its descriptor, the data goes to a new file with a random name
  created `O_CREAT|O_EXCL|O_NOFOLLOW` 0600 in it, fsynced, then renamed over `path`; a planted
  name is never opened, followed or chmodded.
- `open_output(path, max_bytes)` opens a file the user named for appending (`-o FILE`): never
  through a symlink, a regular file only (not a FIFO, not /dev/zero), ours and with no other hard
  link; it returns the descriptor and what the file already holds (read from that descriptor,
  at most `max_bytes`).
- `read_within(path, root, max_bytes)` reads a file that must lie inside `root`: opened once, the
  *opened* file's real location checked (/proc/self/fd, or F_GETPATH), then read from that same
  descriptor, so swapping a path component for a symlink between the check and the read is
  refused, not followed (CWE-367).
This module imports nothing of llava-cli's, so anything may use it.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import sys
from contextlib import suppress
from pathlib import Path

READ_CHUNK = 1 << 20
OTHERS_MAY_WRITE = stat.S_IWGRP | stat.S_IWOTH
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
OUTPUT_FILE_MODE = 0o644  # a file the user asked for: readable as an ordinary file would be
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIRECTORY = getattr(os, "O_DIRECTORY", 0)
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
        super().__init__(
            errno.EINVAL, "it is not a valid path (a NUL byte or an unencodable character)", repr(str(path))
        )


class NotPrivate(OSError):
    """The file or folder belongs to another user, or others may write to it."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(errno.EPERM, reason, str(path))


def kind_of(mode: int) -> str:
    return FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_private(status: os.stat_result, path: str | os.PathLike[str]) -> None:
    """Raise `NotPrivate` unless `status` belongs to the current user and no one else may write to it.
    (On Windows, which has no owner uid and whose mode bits do not say who may write, it passes.)"""
    if not hasattr(os, "getuid"):
        return
    if status.st_uid != os.getuid():
        raise NotPrivate(path, f"it belongs to another user (uid {status.st_uid})")
    if status.st_mode & OTHERS_MAY_WRITE:
        raise NotPrivate(path, f"others may write to it (mode {stat.S_IMODE(status.st_mode):04o})")


def private_folder(path: str | os.PathLike[str]) -> None:
    """Raise `NotPrivate` (or the OSError of lstat) unless `path` is a folder, not a link, that only we can change."""
    check_private_dir(os.lstat(path), path)


def check_private_dir(status: os.stat_result, path: str | os.PathLike[str]) -> None:
    if stat.S_ISLNK(status.st_mode):
        raise NotPrivate(path, "it is a symbolic link, not a folder")
    if not stat.S_ISDIR(status.st_mode):
        raise NotPrivate(path, f"it is {kind_of(status.st_mode)}, not a folder")
    check_private(status, path)


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` (and any missing parents) 0700 whatever the umask, then check it (see the module docstring).

    `mkdir(mode=0o700)` alone is not enough: an umask can take the owner's own bits away. A name
    that exists is never chmodded through: it is checked with lstat, and refused unless it is our
    own folder (an old one of ours readable by others is tightened through a descriptor).
    """
    folder = Path(path)
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        with suppress(FileExistsError):  # made by someone else meanwhile: checked below like any existing folder
            os.mkdir(created, PRIVATE_DIR_MODE)
            tighten_dir(created)
    status = os.lstat(path)
    check_private_dir(status, path)
    if stat.S_IMODE(status.st_mode) != PRIVATE_DIR_MODE:
        tighten_dir(path)
    return Path(path)


def tighten_dir(path: str | os.PathLike[str]) -> None:
    """chmod 0700 the folder at `path` through a descriptor opened without following a link."""
    folder = open_private_folder(Path(path))
    if folder is None:  # Windows: no folder descriptors, and no such modes to tighten
        return
    try:
        os.fchmod(folder, PRIVATE_DIR_MODE)
    finally:
        os.close(folder)


def write_private_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` at once (0600), in a private folder (see the module docstring)."""
    make_private_dir(path.parent)
    folder = open_private_folder(path.parent)
    temporary, target = f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp", path.name
    if folder is None:  # no descriptors of folders here (Windows): the checked folder's paths
        temporary, target = str(path.parent / temporary), str(path)
    try:
        fd = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, PRIVATE_FILE_MODE, dir_fd=folder
        )
        try:
            try:
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, PRIVATE_FILE_MODE)  # whatever the umask
                write_all(fd, data)
                os.fsync(fd)  # the data is on disk before the rename makes it visible
            finally:
                os.close(fd)
            os.replace(temporary, target, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with suppress(OSError):
                os.unlink(temporary, dir_fd=folder)
            raise
    finally:
        if folder is not None:
            os.close(folder)


def open_private_folder(path: Path) -> int | None:
    """A descriptor of the folder at `path`, opened without following a link and checked through it
    (the folder written into is the one checked); None where folders cannot be opened (Windows)."""
    if os.open not in os.supports_dir_fd:
        private_folder(path)
        return None
    folder = os.open(path, os.O_RDONLY | DIRECTORY | NOFOLLOW | CLOEXEC)
    try:
        check_private_dir(os.fstat(folder), path)
    except BaseException:
        os.close(folder)
        raise
    return folder


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # os.write may write less than asked (a full disk); finish the data
        view = view[os.write(fd, view) :]


def open_output(path: str | os.PathLike[str], max_bytes: int) -> tuple[int, bytes]:
    """(a read-append descriptor, the content so far) of the file the user named; see the module docstring."""
    fd = open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, follow_symlinks=False, mode=OUTPUT_FILE_MODE)
    try:
        status = os.fstat(fd)
        if hasattr(os, "getuid") and status.st_uid != os.getuid():
            raise NotPrivate(path, f"it belongs to another user (uid {status.st_uid})")
        if status.st_nlink > 1:
            raise NotPrivate(path, f"it has {status.st_nlink - 1} other hard link(s); write to a file of its own")
        return fd, read_capped(fd, path, max_bytes)
    except BaseException:
        os.close(fd)
        raise


def read_within(path: str | os.PathLike[str], root: Path, max_bytes: int) -> tuple[str, bytes]:
    """(the real path, the bytes) of the regular file `path` resolves to, which must lie inside `root`.

    `root` is a real path (symlinks resolved). The file is opened once, at its resolved path and
    without following a last link; where the *opened* file really is decides, so a component
    swapped for a link after `realpath` is caught. Raises `NotPrivate` for a file outside `root`."""
    real = os.path.realpath(path)
    fd = open_regular(real, os.O_RDONLY, follow_symlinks=False)
    try:
        opened = opened_path(fd)
        if opened is None or not Path(opened).is_relative_to(root) or not same_file(os.fstat(fd), opened):
            raise NotPrivate(path, f"it is not inside {root}")
        return opened, read_capped(fd, path, max_bytes)
    finally:
        os.close(fd)


def opened_path(fd: int) -> str | None:
    """Where the file open as `fd` really is: /proc/self/fd on Linux, F_GETPATH on macOS; None elsewhere."""
    if sys.platform == "darwin":
        import fcntl

        return os.fsdecode(fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\0"))
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def same_file(status: os.stat_result, path: str) -> bool:
    """True when `path` names the file of `status` (a deleted or moved file's old path does not)."""
    try:
        found = os.lstat(path)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == (status.st_dev, status.st_ino)


def open_regular(
    path: str | os.PathLike[str],
    flags: int = os.O_RDONLY,
    follow_symlinks: bool = True,
    private: bool = False,
    mode: int = PRIVATE_FILE_MODE,
) -> int:
    """A descriptor of the regular file at `path` (opened without blocking), checked as the module docstring says."""
    flags |= getattr(os, "O_NONBLOCK", 0) | CLOEXEC | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= NOFOLLOW
    try:
        fd = os.open(path, flags, mode)  # the mode only matters with O_CREAT
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
