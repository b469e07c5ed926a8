"""Where a stage's independent jobs run: in this process, or as Ray tasks on a cluster.

A *job* is a piece of a stage's work that no other piece of the same batch
waits for: a (model, fold) training (:mod:`pipeline.fold_training`), a
verifier's fold in one pseudo-labelling round (:mod:`pipeline.verifiers`), one
fold's embeddings (:mod:`pipeline.embedding_store`), a chunk of clips' features
(:mod:`pipeline.extraction`). The stage builds the jobs -- a module-level
function and plain picklable arguments (the config dict, the work
directory's path, names, fold numbers, row lists) -- and hands a batch to an
executor. Each job re-opens the work directory itself and writes its outputs
there with atomic renames; the driver then reads them back in a fixed order,
so what a stage computes does not depend on the executor.

``run.executor: local`` (the default): :class:`LocalExecutor` calls each job
in this process, in the order given -- what the stages did before executors
existed. Ray is never imported.

``run.executor: ray``: :class:`RayExecutor` submits every job of a batch as a
Ray task with the job's resource request (``run.resources``, per model
``models.<name>.resources``: ``num_cpus``, ``num_gpus``), so Ray places it on
any node with those resources free. A task whose worker dies (node lost,
``kill -9``, out of memory) is run again up to ``run.max_retries`` times and
resumes from its last epoch checkpoint (the trainer writes one after every
epoch). One progress bar counts every job of the stage. Ray is imported, and
started or joined (``run.ray_address``), only when the first batch with work
in it arrives, so an up-to-date stage costs nothing.

The work directory must be visible at the same path on every node (a shared
filesystem): jobs read the cached features and write their fold folders
there. The executor checks it on every node when it starts, and each job
checks it again before it starts; either fails with :class:`WorkDirNotVisible`
naming the node and the path.

Executor settings never enter a fingerprint (:data:`pipeline.config.EXECUTOR_ONLY`):
local and Ray runs of one config give the same results (``tests/test_executor.py``),
and switching executors retrains nothing.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.config import ConfigError
from pipeline.workdir import WorkDirError, changed_paths, note_changed

log = logging.getLogger("executor")

REPO_ROOT = Path(__file__).resolve().parent.parent
#: environment variables a Ray worker takes from the driver (the Keras backend is part of every fold fingerprint)
FORWARDED_ENV = ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL", "AT_RUN_ID")


class WorkDirNotVisible(WorkDirError):
    """A node cannot see the work directory (no shared filesystem there)."""


class JobFailed(WorkDirError):
    """A job's worker died more often than ``run.max_retries`` allows (finished work is kept)."""


@dataclass
class Job:
    """One unit of work: ``fn(*args)`` on some node, with the resources it asks for.

    ``fn`` must be a module-level function (a Ray worker imports it by name) and
    ``args`` plain picklable values. ``work``: the work directory the job reads
    and writes, checked on its node before it starts, with ``needs`` (paths
    relative to it that must exist there too)."""
    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    resources: dict = field(default_factory=lambda: {"num_cpus": 1.0, "num_gpus": 0.0})
    work: str | None = None
    needs: tuple[str, ...] = ()


def job_resources(cfg: dict, model: str | None = None) -> dict:
    """What a job of ``model`` requests: ``run.resources`` with the model's ``resources`` over it (a model of
    ``models`` or a verifier-only entry of ``pseudo_label.models``)."""
    run = cfg.get("run") or {}
    out = {"num_cpus": 1.0, "num_gpus": 0.0, **(run.get("resources") or {})}
    if model is not None:
        entry = ((cfg.get("models") or {}).get(model) or ((cfg.get("pseudo_label") or {}).get("models") or {})
                 .get(model) or {})
        out.update({k: v for k, v in (entry.get("resources") or {}).items() if v is not None})
    return {k: float(v) for k, v in out.items()}


# ---------------------------------------------------------------- what runs on a node
def node_identity() -> str:
    """``ip (hostname, node <id>)`` of the Ray node this runs on (the first 8 hex digits of Ray's node id:
    two nodes on one machine share the address); the hostname outside Ray."""
    host = socket.gethostname()
    try:
        if "ray" in sys.modules:  # only a process that runs Ray already has it imported
            import ray
            import ray.util
            node = ray.get_runtime_context().get_node_id()[:8] if ray.is_initialized() else ""
            return f"{ray.util.get_node_ip_address()} ({host}{', node ' + node if node else ''})"
    except Exception:  # not in a Ray process, or no network: the hostname says enough
        pass
    return host


def check_work_visible(work: str | os.PathLike | None, needs: Sequence[str] = ()) -> None:
    """Raise :class:`WorkDirNotVisible` naming this node and the path when the work directory, or one of
    ``needs`` (relative to it, or absolute: e.g. the dataset's audio folder), is not there."""
    root = None if work is None else Path(work)
    if root is not None and not root.is_dir():
        missing, what = root, "the work directory"
    else:
        paths = [Path(n) if root is None else root / n for n in needs]
        missing = next((p for p in paths if not p.exists()), None)
        if missing is None:
            return
        inside = root is not None and missing.is_relative_to(root)
        what = f"{missing.name} in the work directory {root}" if inside else "the dataset folder"
    raise WorkDirNotVisible(
        f"node {node_identity()} cannot see {what}: {missing} does not exist there. A Ray job reads and writes "
        f"the work directory (and the feature stage reads --data) on whichever node runs it, so --work and --data "
        f"must be on a filesystem every node mounts at the same path (NFS, a cluster filesystem); without one, "
        f"run with run.executor=local, or use Ray on one machine only (run.ray_address empty)")


_WORKER_LOG: dict = {}


def _worker_logging(log_file: str | None) -> None:
    """In a Ray worker: INFO and above into the stage's log file (appended, as the driver does), warnings
    also to stderr (Ray shows them on the driver's console). Set once per worker and log file."""
    if _WORKER_LOG.get("file") == log_file:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_at_job_handler", False):
            root.removeHandler(h)
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s %(name)s [{socket.gethostname()} pid {os.getpid()}]: "
                            "%(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler()]
    handlers[0].setLevel(logging.WARNING)
    if log_file and Path(log_file).parent.is_dir():
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        h._at_job_handler = True
        root.addHandler(h)
    for noisy in ("matplotlib", "numba", "PIL", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _WORKER_LOG["file"] = log_file


def run_job(fn: Callable, args: tuple, name: str, work: str | None, needs: tuple, settings: dict) -> dict:
    """What a Ray task runs: check the work directory on this node, set up logging, run the
    job. Returns its result with where and how long it ran."""
    if work is not None or needs:
        check_work_visible(work, needs)
    _worker_logging(settings.get("log_file"))
    start = time.time()
    before = len(changed_paths())
    result = fn(*args)
    return {"result": result, "node": node_identity(), "pid": os.getpid(), "started": start,
            "seconds": round(time.time() - start, 2), "changed": [str(p) for p in changed_paths()[before:]]}


def _probe(work: str) -> str:
    """On one node: the work directory's check (see :meth:`RayExecutor.check_nodes`)."""
    check_work_visible(work)
    return node_identity()


_CACHES: "dict[str, dict]" = {}


def process_cache(name: str, keep: int = 2) -> dict:
    """A dict that lives as long as this process, for jobs of ``name`` (e.g. a model's compiled network,
    which :func:`pipeline.trainer.fresh_model` reuses across folds: compiling costs more than a small fold's
    training). Only the ``keep`` most recently used names are kept, so memory stays flat in a Ray worker
    that runs the jobs of many models."""
    cache = _CACHES.pop(name, None)
    cache = {} if cache is None else cache
    _CACHES[name] = cache  # now the most recent
    while len(_CACHES) > keep:
        _CACHES.pop(next(iter(_CACHES)))
    return cache


# ---------------------------------------------------------------- executors
class LocalExecutor:
    """Every job in this process, one after the other, in the order given."""
    kind = "local"
    #: several models may train at once (each waits for the models it reads)
    concurrent = False
    #: jobs show their own progress bars (per-fold epochs)
    job_progress = True

    first_error = None

    def run(self, jobs: Sequence[Job]) -> list:
        return [job.fn(*job.args) for job in jobs]

    def parallelism(self) -> int | None:
        """Cores the executor's jobs may use at once (None: this machine's)."""
        return None

    def cancel_all(self) -> None:
        pass

    def serve(self, timeout: float = 0.1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RayExecutor:
    """Every job of a batch as a Ray task placed by its resources; see the module doc."""
    kind = "ray"
    concurrent = True
    job_progress = False

    def __init__(self, address: str = "", max_retries: int = 3, work: str | os.PathLike | None = None,
                 stage: str = "", progress: bool = True):
        self.address, self.max_retries = address, int(max_retries)
        self.work = None if work is None else os.path.abspath(work)
        self.stage, self.progress = stage, progress
        self._ray = None
        self._owned = False
        self._lock = threading.Lock()
        self._bar = None
        self._rows: list[dict] = []
        self._failed = threading.Event()
        self._pending: set = set()        # every submitted, unfinished task of every driver thread
        self._served = False               # the main thread starts Ray for driver threads (serve)
        self._start_wanted, self._started = threading.Event(), threading.Event()
        self._start_error: BaseException | None = None
        self._largest: dict | None = None  # the largest node's CPUs and GPUs
        #: the error of the first job that failed (other driver threads then stop with JobFailed)
        self.first_error: BaseException | None = None

    # -- the cluster ---------------------------------------------------------
    def start(self) -> None:
        """Import Ray and start one on this machine (``ray_address`` empty) or join a cluster; check that
        every node sees the work directory. Done once, by the first batch with work in it; from a driver
        thread while the main thread runs :meth:`serve`, the main thread does it (Ray installs its signal
        handlers there)."""
        if self._ray is not None:
            return
        if self._served and threading.current_thread() is not threading.main_thread():
            self._start_wanted.set()
            self._started.wait()
        else:
            self._start_here()
        if self._start_error is not None:
            raise self._start_error

    def serve(self, timeout: float = 0.1) -> None:
        """In the main thread, while driver threads submit jobs: start Ray when one of them first needs it."""
        self._served = True
        if not self._started.is_set() and self._start_wanted.wait(timeout):
            self._start_here()

    def _start_here(self) -> None:
        with self._lock:
            if self._started.is_set():
                return
            try:
                import ray
                if not ray.is_initialized():  # (else: a caller, e.g. a test, started or joined one already)
                    started = time.time()
                    init_ray(self.address)
                    self._owned = True
                    log.info("ray: %s in %.1f s; cluster resources %s", f"joined {self.address}" if self.address
                             else "started on this machine", time.time() - started, _resources_text(ray))
                self._ray = ray
                if self.work is not None:
                    self.check_nodes()
            except BaseException as exc:
                self._start_error = exc
            finally:
                self._started.set()

    def check_nodes(self) -> list[str]:
        """Run :func:`check_work_visible` on every alive node (a zero-CPU task pinned to it): a node without
        the shared filesystem is named now, not when its first job fails."""
        ray = self._ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(self.work) for n in nodes]
        seen = []
        for ref in refs:
            try:
                seen.append(ray.get(ref))
            except ray.exceptions.RayTaskError as exc:
                raise _cause(exc) from None
        log.info("ray: the work directory %s is visible on %d node(s): %s", self.work, len(seen), ", ".join(seen))
        return seen

    def parallelism(self) -> int | None:
        self.start()
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def _check_fits(self, job: Job) -> None:
        """Refuse a job no node can run (Ray would wait for such a node forever)."""
        if self._largest is None:
            nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
            self._largest = {k: max([n.get(r, 0.0) for n in nodes] or [0.0])
                             for k, r in (("num_cpus", "CPU"), ("num_gpus", "GPU"))}
        for key, have in self._largest.items():
            want = float(job.resources.get(key, 0.0))
            if want > have:
                raise ConfigError(f"{job.name} requests {key}={want:g} but no node of the Ray cluster has that "
                                  f"many (the largest has {have:g}; {_resources_text(self._ray)}): lower "
                                  f"run.resources.{key} (or the model's resources.{key}), or add a node that has them")

    # -- running -------------------------------------------------------------
    def run(self, jobs: Sequence[Job]) -> list:
        """Submit every job, wait for all; results in the jobs' order. A failing job cancels the others
        (their last epoch checkpoints stay: a rerun resumes them) and its error is raised here."""
        jobs = list(jobs)
        if not jobs:
            return []
        if self._failed.is_set():
            raise JobFailed("an earlier job of this stage failed (see above); not starting more")
        self.start()
        ray = self._ray
        remote = ray.remote(run_job)
        log_file = _stage_log_file(self.work)
        refs = []
        for job in jobs:
            self._check_fits(job)
            settings = {"log_file": log_file}
            refs.append(remote.options(num_cpus=job.resources.get("num_cpus", 1.0),
                                       num_gpus=job.resources.get("num_gpus", 0.0), max_retries=self.max_retries,
                                       retry_exceptions=False, name=job.name)
                        .remote(job.fn, tuple(job.args), job.name, job.work, tuple(job.needs), settings))
        self._grow_bar(len(jobs))
        pending = dict(zip(refs, range(len(jobs))))
        with self._lock:
            self._pending.update(refs)
        results: list = [None] * len(jobs)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i = pending.pop(ref)
                    with self._lock:
                        self._pending.discard(ref)
                    out = self._get(ref, jobs[i])
                    results[i] = out["result"]
                    self._done(jobs[i], out)
        except BaseException as exc:
            with self._lock:
                if self.first_error is None and not self._failed.is_set():
                    self.first_error = exc
            self.cancel_all()
            raise
        return results

    def cancel_all(self) -> None:
        """Stop every submitted job of every driver thread (a job stops at once; its last epoch checkpoint
        stays, so a rerun resumes it)."""
        self._failed.set()
        if not self._started.is_set():  # a driver thread waiting for the main thread to start Ray: stop it
            self._start_error = JobFailed("stopped before Ray started (see the error above)")
            self._started.set()
        with self._lock:
            refs, self._pending = list(self._pending), set()
        for ref in refs:
            with contextlib.suppress(Exception):
                self._ray.cancel(ref)

    def _get(self, ref, job: Job) -> dict:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the job raised: its own error, as a local run raises it
            cause = _cause(exc)
            if not self._failed.is_set():  # the worker's traceback, into the stage's log file only
                log.error("%s failed on a Ray worker: %s", job.name, exc, extra={"console": False})
            raise cause from None
        except ray.exceptions.TaskCancelledError:
            if self._failed.is_set():
                raise JobFailed(f"{job.name}: stopped because another job of this stage failed") from None
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                ray.exceptions.OutOfMemoryError) as exc:
            raise JobFailed(f"{job.name}: its Ray worker died {self.max_retries + 1} time(s) "
                            f"({type(exc).__name__}; run.max_retries = {self.max_retries}); finished work is kept: "
                            f"rerun to resume. {str(exc).splitlines()[0] if str(exc) else ''}") from None

    def _grow_bar(self, n: int) -> None:
        with self._lock:
            if self._bar is None:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=0, unit="job", desc=f"{self.stage or 'jobs'} on ray",
                                 disable=not self.progress)
            self._bar.total += n
            self._bar.refresh()

    def _done(self, job: Job, out: dict) -> None:
        note_changed(out.get("changed", ()))  # the job's writes count as this stage's (it did work)
        with self._lock:
            self._rows.append({"job": job.name, "node": out["node"], "pid": out["pid"],
                               "started": time.strftime("%H:%M:%S", time.localtime(out["started"])),
                               "seconds": out["seconds"], "num_cpus": job.resources.get("num_cpus", 1.0),
                               "num_gpus": job.resources.get("num_gpus", 0.0)})
            if self._bar is not None:
                self._bar.update(1)
        log.info("%s: done on %s (pid %d) in %.1f s", job.name, out["node"], out["pid"], out["seconds"])

    # -- the end ---------------------------------------------------------------
    def close(self) -> None:
        """Close the bar, write ``logs/<run>/<stage>.jobs.csv`` (where each job ran, how long) and leave a Ray
        this executor started."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._rows and self.work is not None:
            _write_jobs_table(self._rows, self.work, self.stage)
            nodes = sorted({r["node"] for r in self._rows})
            log.info("ray: %d job(s) on %d node(s): %s", len(self._rows), len(nodes), "; ".join(
                f"{n}: {sum(r['node'] == n for r in self._rows)}" for n in nodes))
        if self._ray is not None and self._owned:
            self._ray.shutdown()
        self._ray, self._owned = None, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_executor(cfg: dict, work=None, stage: str = "", progress: bool = True):
    """The executor ``run.executor`` names (Ray is started only when a batch needs it)."""
    run = cfg.get("run") or {}
    if run.get("executor", "local") == "ray":
        return RayExecutor(run.get("ray_address", ""), int(run.get("max_retries", 3)),
                           None if work is None else getattr(work, "root", work), stage, progress)
    return LocalExecutor()


# ---------------------------------------------------------------- helpers
def init_ray(address: str = "", **kwargs) -> None:
    """``ray.init`` as the executor does it: start a Ray on this machine (``address`` empty) or join one
    (``auto``, ``ray://host:port``); workers get this repository on their path and the driver's Keras
    backend (``FORWARDED_ENV``). ``kwargs`` go to ``ray.init`` (e.g. ``num_cpus`` for a local Ray)."""
    import ray
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    path = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(os.path.abspath(p) for p in path))
    options: dict = dict(runtime_env={"env_vars": env}, logging_level=logging.WARNING)
    if not address:
        options["include_dashboard"] = False  # a Ray of this stage's own: nobody to look at it
        # its workers do the stage's work: at this process's priority, not Ray's default nice 15 (on a busy
        # machine niced workers lost to every other process; a cluster's `ray start` environment decides there)
        os.environ.setdefault("RAY_worker_niceness", "0")
    options.update(kwargs)
    # "local" starts a new Ray even where `ray start` runs one (ray.init() alone would join that one)
    ray.init(address=address or "local", **options)


def _cause(exc) -> BaseException:
    """The exception a Ray task raised (``RayTaskError.cause``), else the wrapper itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _resources_text(ray) -> str:
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return (f"{len(nodes)} node(s), {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU")


def _stage_log_file(work: str | None) -> str | None:
    """The stage's log file (the root logger's file handler, ``<work>/logs/<run>/<stage>.log``), which Ray
    workers append to; None when logging goes to no file in the work directory."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and not getattr(h, "_at_job_handler", False):
            if work is not None and Path(h.baseFilename).resolve().is_relative_to(Path(work).resolve() / "logs"):
                return h.baseFilename
    return None


def _write_jobs_table(rows: list[dict], work: str, stage: str) -> None:
    log_file = _stage_log_file(work)
    folder = Path(log_file).parent if log_file else Path(work) / "logs"
    path = folder / f"{stage or 'stage'}.jobs.csv"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:  # a log of this run, not an output of the pipeline
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc)
