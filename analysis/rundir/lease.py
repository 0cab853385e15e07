"""The driver's lease on a run (``RUN/driver.lock``): one driver writes a run at a time.

The lease is taken with an exclusive create, so of many drivers starting at once exactly one
wins. A lease is live while its pid lives (same host) or, on another host, while its
heartbeat is younger than LEASE_STALE_SECONDS; an expired lease is taken over under a short
takeover mark (``.driver.lock.takeover``, itself created exclusively), which also serialises
renewals and releases, so a lease is never overwritten by anyone but its owner.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any
import platform
import secrets
import time

import pyarrow as pa
import pyarrow.fs as pafs

from analysis.rundir.errors import LeaseLost, StorageError
from analysis.rundir.files import json_bytes
from analysis.rundir.layout import LOCK, TAKEOVER
from workers.errors import one_line

LEASE_STALE_SECONDS = 60.0  # a lease on another host is dead after this long without a heartbeat
_TAKEOVER_STALE_SECONDS = 30.0


class LeaseMixin:
    """RunDir's lease methods (mixed into RunDir; ``self._files`` and ``self.location``)."""

    def read_lock(self) -> dict | None:
        """The current driver's lease, or None if no driver holds the run (or the lease is unreadable)."""
        try:
            holder = self._files.read_json(self._files.path(LOCK))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError:
            return None  # a torn lease: see _lease_state
        return holder if isinstance(holder, dict) else None

    def take_lease(self, token: str, *, details: Mapping[str, Any] | None = None) -> None:
        """Claim the run for the driver holding ``token``; StorageError (one line) if another holds it.

        The run folder is created if needed. ``details`` (JSON-able, e.g. the suite and options
        a new run is started with) are kept in the lease record and its renewals, so a driver
        killed before the manifest exists still leaves word of what it was starting (see
        liveness.py). Object stores: pyarrow offers no conditional
        write, so there the exclusive create is a write followed by a read-back check, which
        narrows but does not close the window in which two drivers starting in the same
        instant could both win.
        """
        if not isinstance(token, str) or not token:
            raise StorageError("a lease token must be a non-empty string")
        self._make_folder()
        lock = self._files.path(LOCK)
        record = {**dict(details or {}), **_record(token)}
        for _ in range(3):
            if self._create_record(lock, record):
                return
            state, holder = self._lease_state()
            if state == "gone":
                continue  # released in the meantime: try the exclusive create again
            if holder.get("token") == token:
                self.renew_lease(token)
                return
            if state == "live":
                raise StorageError(self._held_message(holder))
            with self._takeover_mark() as marked:  # expired: take it over, one taker at a time
                if not marked:
                    raise StorageError(f"{self.location}: another driver is taking over its expired {LOCK}; try again")
                state, holder = self._lease_state()  # look again, under the mark
                if state == "live" and holder.get("token") != token:
                    raise StorageError(self._held_message(holder))
                if state != "gone":
                    self._files.delete(lock)
                if self._create_record(lock, record):
                    return
        raise StorageError(f"{self.location}: could not take {LOCK} (other drivers keep taking it); try again")

    def renew_lease(self, token: str) -> None:
        """Refresh the heartbeat of the lease ``token`` holds; LeaseLost if it is not the owner's any more."""
        with self._takeover_mark() as marked:
            if not marked:
                return  # someone is looking at the lease right now: renew at the next heartbeat
            holder = self.read_lock()
            if holder is None or holder.get("token") != token:
                who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "nobody"
                raise LeaseLost(f"{self.location}: this driver lost {LOCK} (now held by {who}); stopped")
            record = {**holder, **_record(token)}  # the details given to take_lease stay
            self._files.write_bytes(self._files.path(LOCK), json_bytes(record, f"{self.location}: {LOCK}"))

    def release_lease(self, token: str) -> None:
        """Give the run up, if ``token`` still holds it."""
        with self._takeover_mark() as marked:
            if marked and (self.read_lock() or {}).get("token") == token:
                self._files.delete(self._files.path(LOCK))

    def lease_state(self) -> tuple[str, dict]:
        """('gone' | 'live' | 'expired', the lease record): is a driver alive for this run? Reads only.

        'expired': the holder's process is gone (same host) or its heartbeat is older than
        LEASE_STALE_SECONDS (another host); the record ({} when gone, or torn) says who it was and
        when it was last seen (``heartbeat``, unix seconds)."""
        try:
            return self._lease_state()
        except (OSError, pa.ArrowException):
            return "gone", {}

    def _create_record(self, path: str, record: dict) -> bool:
        return self._files.create_exclusive(path, json_bytes(record, f"{self.location}: {LOCK}"), record["token"])

    def _lease_state(self) -> tuple[str, dict]:
        """('gone' | 'live' | 'expired', the lease record)."""
        info = self._files.fs.get_file_info(self._files.path(LOCK))
        if info.type == pafs.FileType.NotFound:
            return "gone", {}
        holder = self.read_lock()
        mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
        if holder is None:  # being written right now, or torn by a crash: judged by its age
            return ("live" if time.time() - mtime < LEASE_STALE_SECONDS else "expired"), {}
        try:
            beat = float(holder.get("heartbeat", 0))
            pid = int(holder.get("pid", -1))
        except (TypeError, ValueError):
            beat, pid = mtime, -1
        if holder.get("host") == platform.node():
            return ("live" if _pid_alive(pid) else "expired"), holder
        return ("live" if time.time() - beat < LEASE_STALE_SECONDS else "expired"), holder

    def _held_message(self, holder: dict) -> str:
        if not holder:
            return f"{self.location} is being started by another driver ({LOCK} is being written); wait for it"
        try:
            age = f"{time.time() - float(holder.get('heartbeat', 0)):.0f} s"
        except (TypeError, ValueError):
            age = "?"
        return (f"{self.location} is being run by pid {holder.get('pid')} on {holder.get('host')} (heartbeat {age} ago); "
                f"wait for it, or remove {self.location}/{LOCK} if it is dead")

    @contextlib.contextmanager
    def _takeover_mark(self):
        """Hold ``.driver.lock.takeover`` (exclusive create) for a moment; yields False if another process holds it."""
        path = self._files.path(TAKEOVER)
        token = secrets.token_hex(8)
        data = json_bytes(_record(token), f"{self.location}: {TAKEOVER}")
        mine = False
        for _ in range(50):
            if self._files.create_exclusive(path, data, token):
                mine = True
                break
            info = self._files.fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                continue
            if info.mtime is not None and time.time() - info.mtime.timestamp() > _TAKEOVER_STALE_SECONDS:
                self._files.delete(path)  # left by a process that died while holding it
                continue
            time.sleep(0.01 + 0.02 * secrets.randbelow(5))
        try:
            yield mine
        finally:
            if mine:
                self._files.delete(path)

    def _make_folder(self) -> None:
        kind = self._files.kind(self._files.root)
        if kind == pafs.FileType.File:
            raise StorageError(f"{self.location} is a file, not a folder for a bplab run")
        if kind == pafs.FileType.NotFound:
            try:
                self._files.make_folder(self._files.root)
            except (OSError, pa.ArrowException) as exc:
                raise StorageError(f"cannot create {self.location}: {one_line(exc)}") from None


def _record(token: str) -> dict:
    return {"host": platform.node(), "pid": os.getpid(), "token": token, "heartbeat": time.time()}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
