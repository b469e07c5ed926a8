"""Batches made ahead by parallel workers (pipeline.prefetch): the same batches and fold results with
any number of workers, a bounded queue, errors that name the clip, and no worker left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import pipeline.callbacks as callbacks
import pipeline.trainer as trainer
from pipeline.batches import WindowBatches
from pipeline.cache import feature_stores
from pipeline.config import model_config
from pipeline.normalize import Normalizer
from pipeline.prefetch import ClipError, LOADER_SETTINGS, Prefetch, loader_options
from pipeline.windows import sliding_windows
from pipeline.workdir import read_json
from prefetch_helpers import FailingStore, Slow
from test_trainer import _fold_args, prepared  # noqa: F401  (the fixture: tiny features + folds)

REPO = Path(__file__).resolve().parent.parent
#: (workers, kind): the synchronous path, one thread, several threads, several processes
LOADERS = [(0, "thread"), (1, "thread"), (3, "thread"), (2, "process")]


def _children(pid: int) -> list[int]:
    """Live loader worker processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and "pipeline.prefetch" in cmd:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _equal(a, b) -> None:
    """Two batches (tuples of arrays or dicts of arrays), element for element."""
    assert type(a) is type(b) and len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
        else:
            np.testing.assert_array_equal(x, y)


def test_batches_are_identical_with_any_number_of_workers(prepared):
    cfg, work, _ = prepared
    args = _fold_args(cfg, work)
    tcfg = dict(args["spec"]["train"], mixup_alpha=0.4, class_weight="balanced",
                spec_augment={"time_masks": 1, "time_width": 4, "freq_masks": 1, "freq_width": 3})
    store = feature_stores(work, cfg, ["logmel"])["logmel"]
    batches = WindowBatches(store, args["rows"], args["n_classes"], 16, tcfg, Normalizer(store.stats()), seed=7)
    tasks = [(epoch, i) for epoch in (0, 1, 2) for i in range(len(batches))]
    reference = []
    for epoch, i in tasks:  # what the training loop has always done
        batches.set_epoch(epoch)
        reference.append(batches[i])
    for workers, kind in LOADERS:
        with Prefetch(batches, workers, depth=3, kind=kind) as loader:
            made = list(loader.map(tasks))
        assert len(made) == len(reference)
        for a, b in zip(made, reference):
            _equal(a, b)


def test_fold_results_are_identical_with_any_number_of_workers(prepared, tmp_path):
    cfg, work, _ = prepared
    args = _fold_args(cfg, work)
    cache: dict = {}  # the loader settings are not in the compiled model's key: one compile for all
    results, fingerprints = [], set()
    for workers, kind in LOADERS:
        spec = dict(args["spec"], train=dict(args["spec"]["train"], loader_workers=workers, loader_kind=kind,
                                             prefetch_batches=2))
        fold_args = dict(args, spec=spec)
        results.append(trainer.train_fold(out_dir=tmp_path / f"{kind}{workers}", model_cache=cache, **fold_args))
        fingerprints.add(trainer.fold_fingerprint(spec, "key", "labels", "folds", 1))
    assert len(cache) == 1
    first = results[0]
    for other in results[1:]:
        np.testing.assert_allclose(other.oof, first.oof, atol=1e-5)
        assert other.summary["val_map3"] == pytest.approx(first.summary["val_map3"])
        assert other.summary["epochs_run"] == first.summary["epochs_run"]
    # how batches are made is in no fingerprint; a spec without the settings (an older run) has the same one
    bare = dict(args["spec"], train={k: v for k, v in args["spec"]["train"].items() if k not in LOADER_SETTINGS})
    fingerprints.add(trainer.fold_fingerprint(bare, "key", "labels", "folds", 1))
    assert len(fingerprints) == 1


class _Counting:
    """A producer that counts the tasks started (threads share it)."""

    def __init__(self):
        self.started, self.lock = 0, threading.Lock()

    def __call__(self, task):
        with self.lock:
            self.started += 1
        return np.full(3, task)


@pytest.mark.parametrize("depth", [1, 4])
def test_the_queue_never_holds_more_than_its_depth(depth):
    producer = _Counting()
    with Prefetch(producer, workers=3, depth=depth) as loader:
        for taken, item in enumerate(loader.map(range(30))):
            assert item[0] == taken
            time.sleep(0.005)  # a slow consumer: unbounded workers would run far ahead
            # made or being made: the items taken (this one included) and at most `depth` more
            assert producer.started <= taken + 1 + depth
        assert loader.high_water == depth
    with Prefetch(Slow(), workers=2, depth=depth, kind="process") as loader:
        assert [int(x[0, 0]) for x in loader.map(range(12))] == list(range(12))
        assert loader.high_water == depth


def test_predict_clips_same_batches_with_workers_and_a_ten_minute_clip():
    """Prediction overlaps cutting windows with the model; the result is the old code's, and a
    10-minute clip is cut into fixed-size batches rather than one array."""
    rng = np.random.default_rng(0)
    lengths = {"long.wav": 10 * 60 * 62, "a.wav": 130, "b.wav": 7, "c.wav": 64, "d.wav": 300}  # 62 frames/s
    arrays = {f: rng.standard_normal((n, 5, 3)).astype(np.float16) for f, n in lengths.items()}

    class Store:
        def load(self, split, fname):
            return arrays[fname]

    class Model:
        output_shape = (None, 4)
        shapes: list = []

        def predict_on_batch(self, x):
            self.shapes.append(x.shape)
            logits = np.stack([x[:, :, :, c].mean(axis=(1, 2)) for c in range(3)] + [x[:, 0, 0, 0]], axis=1)
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def old_predict_clips(model, store, split, fnames, window, hop, normalizer, batch_size, max_windows):
        """predict_clips before the prefetching pipeline (verbatim but for the names)."""
        out = np.zeros((len(fnames), 4), dtype=np.float64)
        pending, owners, first, n_pending = [], [], 0, 0

        def flush(upto):
            nonlocal pending, owners, first
            if not pending:
                return
            x = normalizer(np.concatenate(pending))
            probs = trainer.predict_fixed_batches(model, x, batch_size)
            logp = np.log(np.clip(probs.astype(np.float64), trainer.EPS, 1.0))
            owner = np.concatenate(owners)
            sums = np.zeros((upto - first, logp.shape[1]))
            np.add.at(sums, owner - first, logp)
            counts = np.bincount(owner - first, minlength=upto - first)[:, None]
            mean = sums / counts
            out[first:upto] = np.exp(mean - mean.max(axis=1, keepdims=True))
            pending, owners, first = [], [], upto

        for i, fname in enumerate(fnames):
            wins = sliding_windows(store.load(split, fname), window, hop)
            pending.append(wins)
            owners.append(np.full(len(wins), i))
            n_pending += len(wins)
            if n_pending >= max_windows:
                flush(i + 1)
                n_pending = 0
        flush(len(fnames))
        return trainer.normalize_rows(out)

    normalizer = Normalizer({"mean": [0.1, -0.2, 0.3], "std": [1.5, 0.5, 2.0]})
    fnames = ["a.wav", "long.wav", "b.wav", "c.wav", "d.wav", "a.wav"]
    for max_windows in (4096, 50):
        want = old_predict_clips(Model(), Store(), "test", fnames, 64, 32, normalizer, 16, max_windows)
        for workers in (0, 1, 3):
            model = Model()
            model.shapes = []
            got = trainer.predict_clips(model, Store(), "test", fnames, 64, 32, normalizer, 16, max_windows,
                                        workers=workers, depth=2)
            np.testing.assert_array_equal(got, want)
            assert set(model.shapes) == {(16, 64, 5, 3)}  # never more than one batch at a time


def test_predicting_a_clip_without_features_says_so_by_name(prepared):
    """The feature store's own error (one line on the command line), through the prediction workers."""
    cfg, work, _ = prepared
    store = feature_stores(work, cfg, ["logmel"])["logmel"]

    class Model:
        output_shape = (None, 3)

        def predict_on_batch(self, x):
            return np.full((len(x), 3), 1 / 3, np.float32)

    usable = _fold_args(cfg, work)["rows"].fnames[:2]
    assert trainer.predict_clips(Model(), store, "train", usable, 16, 8, Normalizer(None), 8, workers=2).shape == (2, 3)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        trainer.predict_clips(Model(), store, "train", ["missing.wav"], 16, 8, Normalizer(None), 8, workers=2)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_worker_error_names_the_clip_after_the_items_before_it(kind):
    with Prefetch(Slow(bad=5), workers=2, depth=3, kind=kind) as loader:
        got = []
        with pytest.raises(ClipError, match="clip5.wav") as info:
            for item in loader.map(range(10)):
                got.append(int(item[0, 0]))
        assert got == [0, 1, 2, 3, 4]
        if kind == "process":
            assert any("worker" in note for note in info.value.__notes__)  # the worker's traceback
    assert _children(os.getpid()) == []


@pytest.mark.parametrize("workers, kind", [(0, "thread"), (2, "process")])
def test_a_failing_clip_stops_the_fold_cleanly_naming_it(prepared, tmp_path, monkeypatch, workers, kind):
    cfg, work, _ = prepared
    args = _fold_args(cfg, work)
    bad = args["rows"].fnames[3]
    trigger = tmp_path / "trigger"
    args["store"] = FailingStore(args["store"], bad, str(trigger))
    args["spec"] = dict(args["spec"], train=dict(args["spec"]["train"], loader_workers=workers, loader_kind=kind))
    real_write = callbacks.atomic_write_json

    def fail_from_the_second_epoch(obj, path):  # the clip breaks once the first epoch is checkpointed
        real_write(obj, path)
        if path.name == "state.json":
            trigger.touch()

    monkeypatch.setattr(callbacks, "atomic_write_json", fail_from_the_second_epoch)
    with pytest.raises(ClipError) as info:
        trainer.train_fold(out_dir=tmp_path / "fold", **args)
    assert bad in str(info.value) and "epoch 2" in str(info.value) and "Input/output error" in str(info.value)
    state = read_json(tmp_path / "fold" / "state.json")
    assert state["epoch"] == 0 and not state["finished"]  # the first epoch's checkpoint, intact
    assert (tmp_path / "fold" / "last.npz").exists()
    assert _children(os.getpid()) == []


def test_ctrl_c_during_training_leaves_no_worker_process(prepared, tmp_path):
    cfg, work, data = prepared
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "preset"}))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = tmp_path / "train.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.train", "--config", str(preset), "--data", str(data),
             "--work", str(work.root), "--set", "training.loader_kind=process", "--set", "training.loader_workers=2",
             "--set", "training.epochs=1000", "--set", "training.early_stop_patience=1000",
             "--set", "training.steps_per_epoch=50"],  # long enough for any backend: the signal finds it training
            cwd=REPO, env=env, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
    state = work.fold_dir("m_logmel", 0) / "state.json"
    try:
        deadline = time.time() + 240
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert state.exists(), log.read_text()[-3000:]
        workers = _children(proc.pid)
        assert len(workers) == 2, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert rc == 130 and "interrupted" in text, text[-3000:]
    time.sleep(0.5)
    assert not [pid for pid in workers if _alive(pid)]
    kept = read_json(state)  # the last finished epoch's checkpoint is whole
    assert kept["epoch"] >= 0 and not kept["finished"]
    assert (state.parent / "last.npz").exists()


def test_loader_settings_resolve_from_the_cores(monkeypatch):
    import pipeline.prefetch as prefetch
    monkeypatch.setattr(prefetch, "available_cores", lambda: 2)
    assert loader_options({"loader_workers": None, "prefetch_batches": None, "loader_kind": "auto"}) == \
        {"workers": 1, "depth": 2, "kind": "thread"}
    monkeypatch.setattr(prefetch, "available_cores", lambda: 16)
    assert loader_options({"loader_workers": None, "prefetch_batches": None, "loader_kind": "auto"}, "wave") == \
        {"workers": 8, "depth": 16, "kind": prefetch.AUTO_KIND.get("wave", "thread")}
    assert loader_options({"loader_workers": 0, "prefetch_batches": 5, "loader_kind": "process"}) == \
        {"workers": 0, "depth": 5, "kind": "process"}
    defaults = model_config({"training": {}, "models": {"m": {"feature": "logmel", "window": 8}}}, "m")["train"]
    assert set(LOADER_SETTINGS) <= set(defaults)
