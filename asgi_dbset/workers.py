"""Long-lived worker threads that lanes borrow, one lane at a time.

A lane's connection belongs to Django's thread-local ``connections`` of the
thread that opened it, so every job of a lane must run on that one thread, in
submission order. A :class:`Worker` is such a thread with a FIFO queue; it is
an ``Executor`` so that a lane hands it calls (:func:`~.hop.hop`) and its
lease (``run_in_executor``) exactly as asgiref hands calls to the executor of
Django's own thread.

Workers are created on demand and kept for reuse: a lane is leased per request,
a thread is not. Their number is bounded by the number of lanes that can be
open at once, which the budget bounds.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")

_names = itertools.count(1)
_STOP = object()


class Worker(Executor):
    """A daemon thread running submitted callables one after another, in order."""

    def __init__(self) -> None:
        self.name = f"asgi_dbset-lane-{next(_names)}"
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<Worker {self.name} alive={self.alive}>"

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (after :meth:`shutdown`)."""
        self._thread.join(timeout)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._queue.put(_STOP)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # handed to the waiting coroutine
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                    del result
            # An idle worker holds nothing of its last job (as the stdlib's
            # ThreadPoolExecutor drops its work item): the callable - a lane's
            # call, closing over the request's set, context and block - and
            # the future with the call's result go now, not at the next job.
            del item, future, fn, args, kwargs


class WorkerPool:
    """Idle workers kept for the next lane; thread-safe.

    :meth:`shutdown` stops the idle workers, and every worker lent out at
    that moment is stopped when it comes back (a lane returned after the
    lifespan shutdown), not kept. Workers lent out afterwards are kept again:
    one process may serve, shut down and serve again (tests do).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[Worker] = []
        self._lent: set[Worker] = set()
        self._created = 0

    def __repr__(self) -> str:
        return (
            f"<WorkerPool created={self._created} idle={len(self._idle)} "
            f"lent={len(self._lent)}>"
        )

    def acquire(self) -> Worker:
        with self._lock:
            if self._idle:
                worker = self._idle.pop()
                self._lent.add(worker)
                return worker
            self._created += 1
        worker = Worker()
        with self._lock:
            self._lent.add(worker)
        return worker

    def release(self, worker: Worker) -> None:
        with self._lock:
            if worker in self._lent:
                self._lent.discard(worker)
                self._idle.append(worker)
                return
            # Lent out before a shutdown: stop it rather than keep it.
            self._created -= 1
        worker.shutdown(wait=False)

    def shutdown(self) -> None:
        """Stop the idle workers now (at lifespan shutdown), and the lent ones
        when they come back."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._lent.clear()  # (release() stops a worker it does not know)
            self._created -= len(idle)
        for worker in idle:
            worker.shutdown(wait=True)


workers = WorkerPool()
