"""Items made ahead of their use by parallel workers, in order, in a bounded queue.

The fold trainer's batches and the sliding-window prediction's model batches
are made here while the model trains / predicts on the previous ones
(:class:`Prefetch`). Every item is a pure function of its task -- a training
batch of (seed, fold, epoch, index), an inference batch of its clips and
window ranges -- so what the consumer receives, and in which order, does not
depend on the number of workers or on their timing: ``workers: 0`` makes each
item in the consumer's thread when it asks for it (the synchronous path), any
other number gives the same items in the same order.

- **Bounded.** At most ``depth`` tasks are submitted and not yet handed to
  the consumer; the next one is submitted when the consumer takes one. So at
  most ``depth`` items exist ahead of the one in use, whatever the workers'
  speed (``Prefetch.high_water`` records the largest number seen).
- **Threads or processes.** Threads share the producer (numpy releases the
  GIL in the copies and arithmetic that dominate here); processes each hold
  a pickled copy of it and send items back over a pipe (pickle protocol 5,
  the arrays' bytes written raw). Worker processes are plain ``python -c``
  children that import this module and what the producer's pickle names,
  never the caller's ``__main__`` (multiprocessing's spawn would import
  ``pipeline.train`` and with it Keras into every worker). Which is faster
  for which feature kind was measured (``benchmarks/bench_prefetch.py``,
  README); ``kind: auto`` picks from :data:`AUTO_KIND`.
- **Clean shutdown.** :meth:`Prefetch.close` (also on an exception or Ctrl-C
  in the consumer, through ``with``) cancels what was not started, lets the
  running tasks end, closes the workers' input pipes (a worker process exits
  on end of input), waits for them and kills one that does not exit. Worker
  processes ignore SIGINT (a Ctrl-C reaches the whole process group; the
  parent decides) and die with their parent (``PR_SET_PDEATHSIG`` on Linux,
  and end of input otherwise), so none is left behind.
- **Errors name the clip.** A producer raises :func:`clip_failure` for a
  failing clip; a worker's exception is re-raised in the consumer, with the
  worker's traceback as a note.
"""
from __future__ import annotations

import collections
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

#: worker kind per feature kind for ``kind: auto`` (measured, benchmarks/bench_prefetch.py: threads matched
#: or beat processes for every feature kind on this machine, since the work is numpy copies and arithmetic
#: that release the GIL, and a process pays a pickle round trip per batch)
AUTO_KIND: dict[str, str] = {}
KINDS = ("thread", "process")


class ClipError(RuntimeError):
    """A clip could not be read or cut into model inputs (the message names it)."""

    def __init__(self, message: str, fname: str | None = None, split: str | None = None):
        super().__init__(message)
        self.fname, self.split = fname, split

    def __reduce__(self):  # keeps fname/split across a worker process's pipe
        return (type(self), (str(self), self.fname, self.split))


class WorkerDied(RuntimeError):
    """A worker process ended without answering (killed, out of memory)."""


def clip_failure(exc: BaseException, fname: str, split: str, where: str) -> BaseException:
    """The exception to raise for ``exc`` raised while reading clip ``fname``: ``exc`` itself with a
    note when its message already names the clip (e.g. the feature store's "no feature for X: run
    the features stage", which the command line shows as one line), else a :class:`ClipError` naming
    the clip (raise it ``from exc``)."""
    if fname in str(exc):
        exc.add_note(f"while {where}")
        return exc
    return ClipError(f"clip {fname} ({split}), while {where}: {type(exc).__name__}: {exc}", fname, split)


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(setting: int | None) -> int:
    """``training.loader_workers``: null: one per core beyond one (the training loop's), at least one,
    at most 8; a number: that many (0: the synchronous path)."""
    if setting is None:
        return max(1, min(8, available_cores() - 1))
    return int(setting)


def resolve_depth(setting: int | None, workers: int) -> int:
    """``training.prefetch_batches``: null: two per worker."""
    return int(setting) if setting is not None else max(2, 2 * int(workers))


def resolve_kind(setting: str, feature_kind: str | None = None) -> str:
    """``training.loader_kind``: thread / process, or auto: :data:`AUTO_KIND` of the feature kind (threads
    by default)."""
    if setting == "auto":
        return AUTO_KIND.get(str(feature_kind), "thread")
    if setting not in KINDS:
        raise ValueError(f"loader kind {setting!r}: use auto, thread or process")
    return setting


#: the training settings that only decide how batches are made, never what they hold: no fingerprint
#: includes them (pipeline.trainer.fold_fingerprint), so changing them retrains nothing
LOADER_SETTINGS = ("loader_workers", "prefetch_batches", "loader_kind")


def loader_options(train_cfg: dict, feature_kind: str | None = None) -> dict:
    """``workers``, ``depth``, ``kind`` of :class:`Prefetch` from a training section."""
    workers = resolve_workers(train_cfg.get("loader_workers"))
    return {"workers": workers, "depth": resolve_depth(train_cfg.get("prefetch_batches"), workers),
            "kind": resolve_kind(train_cfg.get("loader_kind", "auto"), feature_kind)}


def without_loader_settings(train_cfg: dict) -> dict:
    """A training section without :data:`LOADER_SETTINGS` (what a fingerprint hashes)."""
    return {k: v for k, v in train_cfg.items() if k not in LOADER_SETTINGS}


# ---------------------------------------------------------------- the consumer's side
class Prefetch:
    """``producer(task)`` for each task, in order, made up to ``depth`` ahead by ``workers`` threads or
    processes (``kind``); ``workers == 0``: made by :meth:`map`'s caller when asked for.

    Use as a context manager (or call :meth:`close`); worker processes start on first use and serve
    every :meth:`map` until closed, so a fold's epochs share them. ``producer`` must pickle for
    ``kind="process"`` (its class importable without the caller's ``__main__``)."""

    def __init__(self, producer: Callable[[Any], Any], workers: int = 0, depth: int | None = None,
                 kind: str = "thread", name: str = "loader"):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: use thread or process")
        self.producer, self.workers, self.kind, self.name = producer, int(workers), kind, name
        self.depth = max(1, int(depth if depth is not None else resolve_depth(None, workers)))
        self.high_water = 0  # most tasks ever outstanding (submitted, not yet taken)
        self._pool = None
        self._closed = False

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the workers now rather than on first use (worker processes take a second or two to
        import what the producer needs: overlap that with other work)."""
        if self.workers:
            self._ensure_pool()

    def _ensure_pool(self):
        if self._closed:
            raise RuntimeError(f"{self.name}: used after close()")
        if self._pool is None:
            self._pool = (_ThreadPool(self.producer, self.workers, self.name) if self.kind == "thread"
                          else _ProcessPool(self.producer, self.workers, self.name))
        return self._pool

    def map(self, tasks: Iterable) -> Iterator:
        """``producer(task)`` of every task, in order. A worker's exception is raised here, for the
        task it failed on, after the items before it."""
        if self.workers == 0:
            for task in tasks:
                self.high_water = max(self.high_water, 1)
                yield self.producer(task)
            return
        pool = self._ensure_pool()
        tasks = iter(tasks)
        pending: collections.deque[Future] = collections.deque()
        try:
            for task in tasks:
                pending.append(pool.submit(task))
                if len(pending) >= self.depth:
                    break
            while pending:
                self.high_water = max(self.high_water, len(pending))
                item = pending.popleft().result()
                for task in tasks:  # the next task replaces the one taken: at most depth outstanding
                    pending.append(pool.submit(task))
                    break
                yield item
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        """Stop the workers (idempotent): pending tasks are cancelled, running ones end, processes exit."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


class _ThreadPool:
    def __init__(self, producer, workers: int, name: str):
        self.producer = producer
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    def submit(self, task) -> Future:
        return self.executor.submit(self.producer, task)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- worker processes
_HEADER = struct.Struct("<Q")
#: how a worker process starts: this module, from the parent's sys.path, never the parent's __main__
_BOOT = "from pipeline.prefetch import _worker_main; _worker_main()"
#: seconds a worker process gets to exit after its input is closed, before it is killed
EXIT_GRACE = 5.0


def _send(stream, obj) -> None:
    """One message: a pickled header naming the out-of-band buffers' sizes, then their bytes."""
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = pickle.dumps((len(body), [r.nbytes for r in raws]), protocol=5)
    stream.write(_HEADER.pack(len(head)) + head)
    stream.write(body)
    for raw in raws:
        stream.write(raw)
    stream.flush()


def _read_exact(stream, n: int) -> bytearray | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            return None
        got += k
    return buf


def _recv(stream):
    """The next message, or ``EOFError`` at end of input."""
    size = _read_exact(stream, _HEADER.size)
    if size is None:
        raise EOFError
    head = _read_exact(stream, _HEADER.unpack(size)[0])
    if head is None:
        raise EOFError
    body_len, sizes = pickle.loads(head)
    body = _read_exact(stream, body_len)
    buffers = [_read_exact(stream, n) for n in sizes]
    if body is None or any(b is None for b in buffers):
        raise EOFError
    return pickle.loads(body, buffers=buffers)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (a kill -9 of the trainer leaves no worker)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # best effort: end of input still stops the worker
        pass


def _worker_main() -> None:
    """A worker process: read the producer, then tasks until end of input; answer each with
    ``("ok", item)`` or ``("error", exception, traceback text)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it closes us
    _die_with_parent()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a print in the producer must not corrupt the answers
    try:
        producer = _recv(inp)
    except EOFError:
        return
    while True:
        try:
            task = _recv(inp)
        except EOFError:
            return
        try:
            answer = ("ok", producer(task))
        except BaseException as exc:  # noqa: BLE001 -- every failure goes back to the consumer
            text = "".join(traceback.format_exception(exc))
            try:
                pickle.dumps(exc, protocol=5)
                answer = ("error", exc, text)
            except Exception:
                answer = ("error", RuntimeError(f"{type(exc).__name__}: {exc}"), text)
        try:
            _send(out, answer)
        except (BrokenPipeError, OSError):
            return


def _widen_pipe(stream, size: int = 1 << 20) -> None:
    """Linux: a 1 MiB pipe buffer instead of 64 KiB, so a large batch crosses in fewer wake-ups
    (best effort: the system's pipe-max-size may refuse)."""
    try:
        import fcntl
        fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (ImportError, OSError, ValueError):
        pass


class _Worker:
    """One worker process: its pipes, the futures of its tasks in order, and a reader thread that
    completes them as answers arrive (so the transfer overlaps the consumer's work)."""

    def __init__(self, payload: bytes, index: int, name: str):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p or os.curdir) for p in sys.path)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # one core's work per worker
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, close_fds=True)
        self.name = f"{name} worker {index} (pid {self.proc.pid})"
        _widen_pipe(self.proc.stdout)
        self.futures: collections.deque[Future] = collections.deque()
        self.lock = threading.Lock()
        self.proc.stdin.write(payload)
        self.proc.stdin.flush()
        self.reader = threading.Thread(target=self._read, name=f"{name}-reader-{index}", daemon=True)
        self.reader.start()

    def submit(self, task) -> Future:
        fut: Future = Future()
        with self.lock:
            self.futures.append(fut)
            try:
                _send(self.proc.stdin, task)
            except (BrokenPipeError, OSError, ValueError):
                pass  # the reader fails the future when it sees the worker gone
        return fut

    def _read(self) -> None:
        while True:
            try:
                answer = _recv(self.proc.stdout)
            except EOFError:
                break
            except Exception as exc:  # an answer that does not unpickle here
                answer = ("error", RuntimeError(f"{self.name}: unreadable answer: {exc}"), "")
            with self.lock:
                fut = self.futures.popleft() if self.futures else None
            if fut is None or not fut.set_running_or_notify_cancel():
                continue  # cancelled: the consumer stopped before taking it
            if answer[0] == "ok":
                fut.set_result(answer[1])
            else:
                exc = answer[1]
                if answer[2]:
                    exc.add_note(f"in {self.name}:\n{answer[2].rstrip()}")
                fut.set_exception(exc)
        code = self.proc.wait()
        with self.lock:
            left, self.futures = list(self.futures), collections.deque()
        for fut in left:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(WorkerDied(f"{self.name} exited (code {code}) before answering"))

    def close_input(self) -> None:
        with self.lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def stop(self, grace: float) -> None:
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=grace)
        try:
            self.proc.stdout.close()
        except OSError:
            pass


class _ProcessPool:
    """``workers`` worker processes, tasks dealt round robin (each answers its tasks in order)."""

    def __init__(self, producer, workers: int, name: str):
        import io
        buf = io.BytesIO()
        _send(buf, producer)  # pickled once, sent to every worker
        payload = buf.getvalue()
        self.workers: list[_Worker] = []
        try:
            for i in range(workers):
                self.workers.append(_Worker(payload, i, name))
        except BaseException:
            self.close()
            raise
        self.next = 0

    def submit(self, task) -> Future:
        worker = self.workers[self.next % len(self.workers)]
        self.next += 1
        return worker.submit(task)

    def close(self) -> None:
        for w in self.workers:
            with w.lock:
                for fut in w.futures:
                    fut.cancel()
            w.close_input()
        for w in self.workers:
            w.stop(EXIT_GRACE)
        self.workers = []

