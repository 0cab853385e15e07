"""File primitives of a run directory on any ``pyarrow.fs`` filesystem: the one URI check,
atomic whole-file writes (temporary name + fsync + rename; in place on object stores, where a
single write is already atomic), exclusive creates, listing, reading and JSON encoding."""
from __future__ import annotations

import json
import os
import posixpath
import re
import secrets
import time
from pathlib import PurePath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis.rundir.errors import StorageError
from analysis.rundir.layout import TMP_MARK
from workers.errors import one_line

_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # two+ letters: not a Windows drive
_IN_PLACE_HINTS = ("s3", "gcs", "gs")  # object stores: single writes are atomic, no rename


def is_uri(location: str | os.PathLike) -> bool:
    """True for a ``pyarrow.fs`` URI (``s3://...``, ``file:///...``), False for a local path."""
    return bool(_URI_RE.match(os.fspath(location)))


def local_path(location: str | os.PathLike) -> str | None:
    """The local path a location names (a plain path or a ``file://`` URI, ``~`` expanded,
    made absolute), or None for any other filesystem; decided from the text alone."""
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif is_uri(text):
        return None
    return os.path.abspath(os.path.expanduser(text))


def resolve(location: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or a URI; StorageError (one line) if a URI
    cannot be opened. With ``filesystem`` given, ``location`` is a path inside it."""
    location = os.fspath(location)
    if filesystem is not None:
        fs, root = filesystem, location
    elif is_uri(location):
        try:
            fs, root = pafs.FileSystem.from_uri(location)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StorageError(f"cannot open {location}: {one_line(exc)}") from None
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    if fs.type_name == "local":
        root = root.replace(os.sep, "/")
    return fs, root.rstrip("/") or "/"


def child(location: str | os.PathLike, name: str) -> str:
    """The location of ``name`` inside the folder ``location`` (a local path or a URI, whose
    query string, e.g. ``?endpoint_override=...``, stays at the end)."""
    text = os.fspath(location)
    if not is_uri(text):
        return os.path.join(text, name)
    base, mark, query = text.partition("?")
    return f"{base.rstrip('/')}/{name}{mark}{query}"


def subfolders(location: str | os.PathLike) -> list[str] | None:
    """The locations of the folders directly inside ``location``, sorted by name; None if
    ``location`` is not a folder (a local path or a ``pyarrow.fs`` URI)."""
    fs, root = resolve(location)
    try:
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return None
        infos = fs.get_file_info(pafs.FileSelector(root))
    except (OSError, pa.ArrowException):
        return None
    names = sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)
    return [child(location, name) for name in names]


class Files:
    """The file operations of one run directory (``root`` inside ``fs``)."""

    def __init__(self, fs: pafs.FileSystem, root: str, atomic_rename: bool | None = None):
        self.fs = fs
        self.root = root
        if atomic_rename is None:
            atomic_rename = not any(hint in fs.type_name for hint in _IN_PLACE_HINTS)
        self.rename = bool(atomic_rename)
        self.durable = fs.type_name == "local"  # fsync files and folders before trusting a rename
        self._made_dirs: set[str] = set()

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def rel(self, path: str) -> str:
        return posixpath.relpath(path, self.root)

    def kind(self, path: str) -> pafs.FileType:
        return self.fs.get_file_info(path).type

    def exists(self, path: str) -> bool:
        return self.kind(path) != pafs.FileType.NotFound

    def list(self, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
        except (NotADirectoryError, FileNotFoundError):
            return []

    def read_bytes(self, path: str) -> bytes:
        if not self.exists(path):
            raise FileNotFoundError(path)
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def read_json(self, path: str) -> Any:
        """The JSON in ``path`` (FileNotFoundError, ValueError as json raises them)."""
        return json.loads(self.read_bytes(path))

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, filesystem=self.fs, columns=columns)

    def delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    def make_folder(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def _make_parent(self, path: str) -> str:
        parent = posixpath.dirname(path)
        if parent not in self._made_dirs:
            self.fs.create_dir(parent, recursive=True)
            self._made_dirs.add(parent)
        return parent

    def write_bytes(self, path: str, data: bytes | pa.Buffer) -> None:
        """Write a whole file atomically: temporary name + rename, or in place on object stores."""
        parent = self._make_parent(path)
        if not self.rename:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}{TMP_MARK}{secrets.token_hex(4)}")
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.sync(tmp)
            self.fs.move(tmp, path)
        except BaseException:
            self.delete(tmp)
            raise
        self.sync(parent)

    def write_table(self, path: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(path, sink.getvalue())

    def move(self, source: str, target: str) -> None:
        """Rename ``source`` to ``target`` and make the rename durable."""
        self.fs.move(source, target)
        self.sync(posixpath.dirname(target))

    def sync(self, path: str) -> None:
        """fsync a local file or folder, so a rename never exposes data the disk does not hold."""
        if not self.durable:
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # folders cannot be fsynced on some platforms
        finally:
            os.close(fd)

    def create_exclusive(self, path: str, data: bytes, token: str) -> bool:
        """Create ``path`` holding ``data`` (JSON with ``token``) only if it does not exist; True
        if this call created it. Object stores offer no conditional write: there it is a write
        followed by a read-back of the token, which narrows but does not close the race."""
        if self.fs.type_name == "local":
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            except OSError as exc:
                raise StorageError(f"cannot write {path}: {one_line(exc)}") from None
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.sync(posixpath.dirname(path))
            return True
        if self.exists(path):
            return False
        self.write_bytes(path, data)
        time.sleep(0.2)
        try:
            return self.read_json(path).get("token") == token
        except (FileNotFoundError, ValueError, AttributeError):
            return False


def json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays
        return value.tolist()
    if isinstance(value, (PurePath, set, frozenset)):
        return str(value) if isinstance(value, PurePath) else sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_bytes(data: Any, what: str) -> bytes:
    """``data`` as indented JSON; StorageError (one line) if it cannot be."""
    try:
        return json.dumps(data, indent=2, sort_keys=True, default=json_default).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise StorageError(f"{what} cannot be stored as JSON ({one_line(exc)})") from None
