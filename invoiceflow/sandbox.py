"""A bounded pool of worker processes for untrusted document work, with OS-enforced budgets.

Python threads cannot be killed and share the flow's GIL and address space, so
everything that touches an untrusted document (pypdf, attachment and XML reading,
pdfium, Tesseract, the rules extractor) runs here instead, one job per worker at a
time:

- **Wall clock.** A job past ``limits.time_limit_s`` gets its worker (and the worker's
  process group, i.e. a running ``tesseract``) SIGKILLed; a fresh worker replaces it
  and the job fails with `DocumentError` kind ``too_slow`` naming the limit.
- **Memory.** Each worker sets ``RLIMIT_AS`` to ``limits.memory_limit_mb`` before its
  first job. Python allocations past it raise MemoryError in the worker, and a worker
  the kernel kills (OOM) is treated the same way: ``too_large`` naming the limit.

Workers are plain `multiprocessing` processes from the "forkserver" context: forking
the threaded flow process itself could copy a lock held by another thread, while the
fork server is a clean single-threaded process with pypdf, pdfium and the readers
already imported (so a replacement worker starts in ~10 ms, not ~1 s).
`concurrent.futures.ProcessPoolExecutor` is not used because one dead worker marks
that whole pool broken, which is exactly what killing a worker does here.

Use::

    with DocumentWorkers(processes=2, limits=DocumentLimits(time_limit_s=30)) as workers:
        doc = workers.read(body, "invoice.pdf")               # blocking, thread-safe
        doc = await workers.aread(body, "invoice.pdf")        # never blocks the loop
        invoice = await workers.acall(extract_invoice, text)  # any picklable pure function

At most ``processes`` jobs run at once; further callers wait for a free worker. An
async caller that is cancelled stops waiting, but its job still runs to completion (or
to the time limit) in the worker.

Imports nothing from Prefect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import multiprocessing
import multiprocessing.context
import os
import pickle
import queue
import resource
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.connection import Connection
from multiprocessing.context import set_spawning_popen
from types import TracebackType
from typing import Any, Final, TypeVar

from invoiceflow.documents import DocumentError, DocumentLimits, ReadDocument, read_document

T = TypeVar("T")

# Imported once in the fork server, so every worker starts with them loaded.
_PRELOAD: Final = ["invoiceflow.documents", "invoiceflow.extractors.rules"]
# A new worker says it is ready within this time, or the pool gives up on it.
_START_TIMEOUT_S: Final = 60.0
_MB: Final = 1024 * 1024


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def start_fork_server() -> None:
    """Start the workers' fork server in the background, without waiting for it.

    Its first start imports pypdf and pdfium (~0.5-1 s on 2 cores); a run calls this
    first thing, so that happens while it loads its blocks and lists its invoices.
    """

    def ensure_running() -> None:
        _context()
        with contextlib.suppress(Exception):  # the first worker start tries again, loudly
            forkserver.ensure_running()

    threading.Thread(target=ensure_running, name="fork-server-start", daemon=True).start()


class _PopenWithoutMain(popen_forkserver.Popen):
    """Starts a worker without re-running the parent's ``__main__`` in it.

    multiprocessing prepares every child by importing the parent's main module (a
    script path or ``-m`` name), and preloading "__main__" in the fork server, meant to
    avoid that, has been dead code since Python 3.4 (CPython gh-98552, gh-126631). For
    ``pytest``, the ``invoiceflow`` CLI or ``python -m prefect.engine`` that re-import
    cost 0.3 s to several seconds per worker, plus its memory under RLIMIT_AS. Workers
    only run module-level functions imported by name, so they never need it. This is
    CPython 3.11-3.13's ``popen_forkserver.Popen._launch`` minus the main-module keys.
    """

    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_name", None)
        prep_data.pop("init_main_from_path", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _WorkerProcess(multiprocessing.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> _PopenWithoutMain:
        return _PopenWithoutMain(process_obj)


# --- the worker side (runs in the child process) ------------------------------------------


def _serve(conn: Connection, memory_limit_bytes: int, nice: int) -> None:
    """Worker main loop: run (fn, args) jobs from ``conn`` until the pipe closes."""
    # Own process group, so a kill also takes a running tesseract with it.
    os.setpgid(0, 0)
    # Below the flow's priority (Tesseract inherits it): OCR is throughput work, the
    # flow's event loop (LLM calls, manifest commits) is latency work. Workers share
    # the flow's session, hence its CFS autogroup, so this is what orders them.
    os.nice(nice)
    # One OCR thread per worker: the pool size is the OCR concurrency bound.
    os.environ["OMP_THREAD_LIMIT"] = "1"
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    conn.send(("ready", None))  # start-up time does not count against a job's limit
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return  # the pool closed or its process died
        except Exception as exc:  # unpicklable here, e.g. a function of the parent's __main__
            conn.send(("error", DocumentError("internal_error", f"cannot load the job: {exc}")))
            continue
        try:
            reply: tuple[str, Any] = ("ok", fn(*args))
        except MemoryError:
            reply = ("memory", None)
        except BaseException as exc:
            reply = ("error", _picklable(exc))
        try:
            conn.send(reply)
        except MemoryError:
            conn.send(("memory", None))
        if reply[0] == "memory":
            return  # after a MemoryError the interpreter's state is not trusted


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` if it survives the pipe, else a DocumentError describing it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return DocumentError("internal_error", f"{type(exc).__name__}: {exc}")


# --- the pool side ------------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    process: Any  # multiprocessing.context.ForkServerProcess
    conn: Connection
    killed: bool = False

    def kill(self) -> None:
        if self.killed:
            return  # its pid may belong to someone else by now
        self.killed = True
        # Not yet its own group leader, or already gone: the kill below still applies.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.kill()
        self.process.join()
        self.conn.close()


class DocumentWorkers:
    """A bounded pool of ``processes`` worker processes; see the module docstring."""

    def __init__(
        self, processes: int = 1, limits: DocumentLimits | None = None, *, nice: int = 10
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.processes = processes
        self.limits = limits or DocumentLimits()
        self.nice = nice
        # Added to the workers' niceness; 0 keeps the flow's priority.
        self._ctx = _context()
        # A slot is a live worker or None (started on first use, or after a kill).
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(processes):
            self._idle.put(None)
        self._busy: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        # Threads that wait on the workers' pipes for the async twins; as many as
        # workers, so a queued async job waits here, not in the loop's default executor.
        self._waiters = ThreadPoolExecutor(processes, thread_name_prefix="document-worker")

    # -- public API --

    def read(self, body: bytes, name: str) -> ReadDocument:
        """`read_document` in a worker. Raises DocumentError (never anything else)."""
        return self.call(read_document, body, name, self.limits)

    async def aread(self, body: bytes, name: str) -> ReadDocument:
        return await self.acall(read_document, body, name, self.limits)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker, under the pool's limits. Blocking; thread-safe.

        ``fn`` must be a module-level function and ``args`` picklable. Exceptions ``fn``
        raises are re-raised here; budget breaches raise DocumentError.
        """
        worker = self._checkout()
        try:
            status, payload = self._exchange(worker, fn, args)
        except BaseException:
            worker.kill()  # whatever happened, its pipe may hold a half-finished job
            raise
        finally:
            self._checkin(worker)
        if status == "ok":
            return payload  # type: ignore[no-any-return]
        if status == "memory":
            raise _too_large(self.limits, "ran out of memory")
        raise payload

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        """`call` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._waiters, functools.partial(self.call, fn, *args))

    def close(self) -> None:
        """Stop idle workers now; busy ones are stopped when their job ends."""
        with self._lock:
            self._closed = True
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            if worker is not None:
                worker.kill()
        self._waiters.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> DocumentWorkers:
        # Started now, beside whatever the caller does next (a run lists and claims
        # its invoices), rather than by the first jobs: the fork server's first start
        # imports pypdf and pdfium (~0.5-1 s), which the first invoice would wait for.
        threading.Thread(
            target=self._start_idle, name="document-workers-start", daemon=True
        ).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --

    def _start_idle(self) -> None:
        """Start a process for every idle slot that has none (best effort)."""
        for _ in range(self.processes):
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return  # the rest are in use: they start on demand as before
            if worker is None and not self._closed:
                with contextlib.suppress(DocumentError):
                    worker = self._start()
            if worker is not None and self._closed:
                worker.kill()
                worker = None
            self._idle.put(worker)

    def _checkout(self) -> _Worker:
        if self._closed:
            raise RuntimeError("DocumentWorkers is closed")
        worker = self._idle.get()
        if self._closed:
            self._idle.put(worker)  # wake the next waiter, which fails the same way
            raise RuntimeError("DocumentWorkers is closed")
        if worker is None or not worker.process.is_alive():
            if worker is not None:
                worker.kill()
            try:
                worker = self._start()
            except BaseException:
                self._idle.put(None)
                raise
        with self._lock:
            self._busy.add(worker)
        return worker

    def _checkin(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
            closed = self._closed
        if closed:
            worker.kill()
            self._idle.put(None)  # a caller waiting for a worker must not wait forever
            return
        self._idle.put(None if worker.killed or not worker.process.is_alive() else worker)

    def _start(self) -> _Worker:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = _WorkerProcess(
            target=_serve,
            args=(child_end, self.limits.memory_limit_mb * _MB, self.nice),
            name="invoiceflow-document-worker",
            daemon=True,
        )
        process.start()
        child_end.close()  # so the parent sees EOF when the child dies
        worker = _Worker(process, parent_end)
        try:
            ready = parent_end.poll(_START_TIMEOUT_S) and parent_end.recv()[0] == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            worker.kill()
            raise DocumentError(
                "worker_crashed", "a document worker process failed to start", transient=True
            )
        return worker

    def _exchange(
        self, worker: _Worker, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> tuple[str, Any]:
        """Send one job, wait for its reply within the time limit; kills on a breach."""
        limits = self.limits
        try:
            worker.conn.send((fn, args))
        except (BrokenPipeError, ConnectionResetError):  # it died between jobs
            worker.process.join(timeout=5)
            raise _death_error(worker.process.exitcode, limits) from None
        if not worker.conn.poll(limits.time_limit_s):
            raise DocumentError(
                "too_slow",
                f"reading the document took longer than the {limits.time_limit_s:g} s time "
                "limit; its worker process was killed",
            )
        try:
            status, payload = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=5)
            raise _death_error(worker.process.exitcode, limits) from None
        if status == "memory":
            worker.kill()  # it exits by itself; reap it and take its slot for a new one
        return status, payload


def _too_large(limits: DocumentLimits, how: str) -> DocumentError:
    return DocumentError(
        "too_large",
        f"reading the document needed more than the {limits.memory_limit_mb} MB memory "
        f"limit (its worker process {how})",
    )


def _death_error(exitcode: int | None, limits: DocumentLimits) -> DocumentError:
    """The error for a worker that died mid-job with ``exitcode``."""
    if exitcode == -signal.SIGKILL:
        # Nothing in the pool killed it, so the kernel did: the OOM killer.
        return _too_large(limits, "was killed by the kernel")
    if exitcode is not None and exitcode < 0:
        cause = f"died of {signal.Signals(-exitcode).name}"
    else:
        cause = f"exited with status {exitcode}"
    return DocumentError("worker_crashed", f"the document worker process {cause}")
