"""The driver lease (RUN/driver.lock): one driver per run, taken atomically, renewed by its owner only."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import time

import pytest

from analysis.rundir import RunDir, StorageError
from analysis.rundir.layout import LOCK

TAKERS = 16


def _take(location: str, barrier, done, results, index: int) -> None:
    run = RunDir(location)
    token = f"taker-{index}-{os.getpid()}"
    barrier.wait()
    try:
        run.take_lease(token)
        results.put((index, "won"))
    except StorageError as error:
        results.put((index, "refused: " + str(error)))
    except BaseException as error:  # anything else is a failure of the test
        results.put((index, f"crashed: {type(error).__name__}: {error}"))
    done.wait()  # the winner stays alive (its pid keeps the lease live) until every taker has tried


@pytest.mark.timeout(240)
def test_many_concurrent_takers_exactly_one_wins(tmp_path):
    ctx = mp.get_context("fork")
    for trial in range(20):
        location = str(tmp_path / f"run{trial}")
        barrier, done, results = ctx.Barrier(TAKERS), ctx.Barrier(TAKERS + 1), ctx.Queue()
        procs = [ctx.Process(target=_take, args=(location, barrier, done, results, i)) for i in range(TAKERS)]
        for p in procs:
            p.start()
        outcome = [results.get(timeout=60) for _ in procs]
        holder = json.loads((tmp_path / f"run{trial}" / LOCK).read_text())
        done.wait(timeout=60)
        for p in procs:
            p.join(timeout=60)
        won = [i for i, text in outcome if text == "won"]
        assert len(won) == 1, (trial, outcome)
        assert all(text.startswith("refused: ") and "\n" not in text for _, text in outcome if text != "won"), outcome
        assert holder["token"].startswith(f"taker-{won[0]}-")  # the file names the one winner


@pytest.mark.timeout(60)
def test_renewal_only_by_the_owner_and_takeover_only_when_expired(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.take_lease("mine")
    run.renew_lease("mine")
    with pytest.raises(StorageError, match="is being run by pid"):
        RunDir(run.location).take_lease("theirs")  # live: this process holds it
    with pytest.raises(StorageError, match="lost"):
        run.renew_lease("theirs")  # not the owner: refused, the lease unchanged
    assert run.read_lock()["token"] == "mine"
    run.release_lease("theirs")  # not the owner: a no-op
    assert run.read_lock()["token"] == "mine"

    # a lease of a dead process on this host is expired: taken over
    (tmp_path / "run" / LOCK).write_text(json.dumps({"host": platform.node(), "pid": _dead_pid(), "token": "dead",
                                                     "heartbeat": time.time()}))
    run.take_lease("next")
    assert run.read_lock()["token"] == "next"
    with pytest.raises(StorageError, match="lost"):
        run.renew_lease("dead")

    # another host: live while its heartbeat is fresh, expired after LEASE_STALE_SECONDS
    (tmp_path / "run" / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "remote",
                                                     "heartbeat": time.time()}))
    with pytest.raises(StorageError, match="elsewhere"):
        run.take_lease("next2")
    (tmp_path / "run" / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "remote",
                                                     "heartbeat": time.time() - 3600}))
    run.take_lease("next2")
    run.release_lease("next2")
    assert not (tmp_path / "run" / LOCK).exists()
    assert not [p.name for p in (tmp_path / "run").iterdir()]  # no takeover mark left behind


def _expire_then_take(location: str, barrier, done, results, index: int) -> None:
    barrier.wait()
    try:
        RunDir(location).take_lease(f"t{index}")
        results.put(f"t{index}")
    except StorageError:
        results.put("refused")
    done.wait()


@pytest.mark.timeout(120)
def test_concurrent_takeover_of_an_expired_lease_has_one_winner(tmp_path):
    ctx = mp.get_context("fork")
    for trial in range(5):
        root = tmp_path / f"run{trial}"
        root.mkdir()
        (root / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "old", "heartbeat": 0}))
        barrier, done, results = ctx.Barrier(8), ctx.Barrier(9), ctx.Queue()
        procs = [ctx.Process(target=_expire_then_take, args=(str(root), barrier, done, results, i)) for i in range(8)]
        for p in procs:
            p.start()
        outcome = [results.get(timeout=60) for _ in procs]
        holder = json.loads((root / LOCK).read_text())["token"]
        done.wait(timeout=60)
        for p in procs:
            p.join(timeout=60)
        won = [text for text in outcome if text != "refused"]
        assert won == [holder], outcome  # one taker replaced the expired lease, the others were refused


def _dead_pid() -> int:
    proc = mp.get_context("fork").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()
    return proc.pid
