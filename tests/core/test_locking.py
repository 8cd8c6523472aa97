"""ReadWriteLock: searches share it, a change to the index holds it alone."""

from __future__ import annotations

import threading
import time

from gpurag.locking import ReadWriteLock


def test_readers_share_the_lock() -> None:
    lock = ReadWriteLock()
    inside = threading.Barrier(3, timeout=5)

    def reader() -> None:
        with lock.read():
            inside.wait()  # only passes if all three readers are inside at once

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not inside.broken


def test_a_writer_excludes_readers_and_waits_for_them() -> None:
    lock = ReadWriteLock()
    events: list[str] = []
    reading = threading.Event()

    def reader() -> None:
        with lock.read():
            reading.set()
            time.sleep(0.1)
            events.append("read done")

    def writer() -> None:
        reading.wait(5)
        with lock.write():
            events.append("write")

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert events == ["read done", "write"]


def test_a_waiting_writer_holds_back_new_readers() -> None:
    lock = ReadWriteLock()
    events: list[str] = []
    first_in = threading.Event()

    def first_reader() -> None:
        with lock.read():
            first_in.set()
            time.sleep(0.2)

    def writer() -> None:
        first_in.wait(5)
        with lock.write():
            events.append("write")

    def late_reader() -> None:
        first_in.wait(5)
        time.sleep(0.05)  # the writer is waiting by now
        with lock.read():
            events.append("late read")

    threads = [threading.Thread(target=f) for f in (first_reader, writer, late_reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert events == ["write", "late read"]


def test_the_writer_may_take_the_lock_again_and_read_under_it() -> None:
    lock = ReadWriteLock()
    with lock.write(), lock.write(), lock.read():
        pass
    with lock.write():  # released fully above
        pass
