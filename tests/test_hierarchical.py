"""The ``hierarchical`` model: meta-class derivation and checks, the two-level
composition, the output-space loss, the builder, and a tiny end-to-end run
(cnn_ref extractors on two features -> per-fold embeddings -> two-level DNNs)
that checks which embeddings each fold reads.
"""
from __future__ import annotations

from types import SimpleNamespace

import keras
import numpy as np
import pandas as pd
import pytest
from helpers import make_tiny_dataset

import pipeline.fold_training
import pipeline.hierarchical as hier
from models import build_model, load_model
from models.hierarchical import ComposePosteriors, check_groups, membership, split_posteriors
from pipeline.config import ConfigError, load_config, resolve
from pipeline.cv import load_folds, run_folds
from pipeline.embedding_store import EmbeddingStore
from pipeline.extraction import run_features
from pipeline.losses import HierarchicalLoss
from pipeline.predictions import EPS
from pipeline.workdir import WorkDir, read_json


# -- meta-classes -----------------------------------------------------------------
def test_meta_classes_are_derived_from_a_hand_made_confusion():
    # classes {0, 1} confuse each other, as do {2, 3, 4}; 5 is confused with nothing
    conf = np.eye(6) * 0.6
    conf[0, 1] = conf[1, 0] = 0.3
    for i, j in ((2, 3), (3, 4), (2, 4)):
        conf[i, j] = conf[j, i] = 0.2
    conf[5, 0] = 0.02
    assert hier.derive_meta_classes(conf, 3) == [[0, 1], [2, 3, 4], [5]]
    assert hier.derive_meta_classes(conf, 1) == [[0, 1, 2, 3, 4, 5]]
    assert hier.derive_meta_classes(conf, 6) == [[c] for c in range(6)]
    assert hier.default_n_meta(10) == 3 and hier.default_n_meta(41) == 6 and hier.default_n_meta(2) == 1


def test_soft_confusion_is_the_mean_prediction_per_true_class():
    labels = np.array([0, 0, 1, 2])
    probs = np.array([[0.8, 0.2, 0, 0], [0.6, 0.4, 0, 0], [0.1, 0.9, 0, 0], [0.3, 0.3, 0.4, 0]])
    np.testing.assert_allclose(hier.soft_confusion(labels, probs, 4),
                               [[0.7, 0.3, 0, 0], [0.1, 0.9, 0, 0], [0.3, 0.3, 0.4, 0], [0, 0, 0, 0]])


def test_given_meta_classes_are_checked_against_the_dataset():
    classes = ["a", "b", "c", "d"]
    names, groups = hier.given_meta_classes({"x": ["c", "a"], "y": ["b"], "z": ["d"]}, classes, "m")
    assert names == ["x", "y", "z"] and groups == [[0, 2], [1], [3]]
    with pytest.raises(ConfigError, match=r"m.x: 'e' is not a class"):
        hier.given_meta_classes({"x": ["a", "e"], "y": ["b", "c", "d"]}, classes, "m")
    with pytest.raises(ConfigError, match="'a' is in both 'x' and 'y'"):
        hier.given_meta_classes({"x": ["a", "b"], "y": ["a", "c", "d"]}, classes, "m")
    with pytest.raises(ConfigError, match="d are in no meta-class"):
        hier.given_meta_classes({"x": ["a", "b"], "y": ["c"]}, classes, "m")


# -- composition ------------------------------------------------------------------
def test_two_level_composition_matches_a_hand_computation():
    groups = [[0, 3], [1], [2, 4]]
    meta = np.array([[0.5, 0.2, 0.3]], dtype="float32")
    inner_0 = np.array([[0.9, 0.1]], dtype="float32")   # classes 0, 3 given meta 0
    inner_2 = np.array([[0.25, 0.75]], dtype="float32")  # classes 2, 4 given meta 2
    got = np.asarray(ComposePosteriors(groups)([meta, inner_0, inner_2]))
    want = np.array([[0.5 * 0.9, 0.2, 0.3 * 0.25, 0.5 * 0.1, 0.3 * 0.75]])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)
    back_meta, back_inner = split_posteriors(got, groups)
    np.testing.assert_allclose(back_meta, meta, rtol=1e-6)
    np.testing.assert_allclose(back_inner[0], inner_0, rtol=1e-6)
    np.testing.assert_allclose(back_inner[2], inner_2, rtol=1e-6)


def test_builder_output_is_a_distribution_and_groups_must_partition():
    model = build_model("hierarchical", (12,), 5, groups=[[0, 3], [1], [2, 4]], hidden=[8, 8], dropout=0.1)
    p = np.asarray(model(np.random.default_rng(0).normal(size=(7, 12)).astype("float32")))
    assert p.shape == (7, 5) and (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    names = {layer.name for layer in model.layers}
    assert {"meta_softmax", "inner_0_softmax", "inner_2_softmax"} <= names and "inner_1_softmax" not in names
    flat = build_model("hierarchical", (12,), 5, hidden=[8], dropout=0.0)  # no groups: one flat DNN
    assert flat.output_shape == (None, 5)
    with pytest.raises(ValueError, match="partition"):
        check_groups([[0, 1], [1, 2]], 3)
    with pytest.raises(ValueError, match="partition"):
        check_groups([[0], [2]], 3)
    np.testing.assert_array_equal(membership([[1], [0, 2]], 3), [[0, 1], [1, 0], [0, 1]])


# -- the loss -----------------------------------------------------------------------
def _reference_loss(t, p, groups, gamma, margin):
    """The loss written out row by row (numpy), as the docstring of HierarchicalLoss states it."""
    g = membership(groups, t.shape[1])
    tm, pm = t @ g, p @ g
    meta, cls = tm.argmax(1), t.argmax(1)

    def kl(a, b):
        return float(np.sum(a * (np.log(np.clip(a, EPS, 1)) - np.log(np.clip(b, EPS, 1)))))

    def restrict(v, m):
        w = v * g[:, m]
        return w / w.sum()

    out = []
    for i in range(len(t)):
        a_in, p_in = restrict(t[i], meta[i]), restrict(p[i], meta[i])
        total_kl = kl(tm[i], pm[i]) + kl(a_in, p_in)
        trip = []
        for level in ("meta", "inner"):
            hinges = []
            for j in range(len(t)):
                if level == "meta" and meta[j] != meta[i]:
                    a, pos, neg = tm[i], pm[i], pm[j]
                elif level == "inner" and meta[j] == meta[i] and cls[j] != cls[i]:
                    a, pos, neg = a_in, p_in, restrict(p[j], meta[j])
                else:
                    continue
                hinges.append(max(0.0, np.sum((a - pos) ** 2) - np.sum((a - neg) ** 2) + margin))
            trip.append(np.mean(hinges) if hinges else 0.0)
        out.append(gamma * total_kl + (1 - gamma) * sum(trip))
    return np.array(out)


def test_hierarchical_loss_matches_a_row_by_row_computation():
    rng = np.random.default_rng(1)
    groups = [[0, 3], [1], [2, 4]]
    labels = np.array([0, 3, 3, 1, 2, 4, 4, 0])
    t = np.full((8, 5), 0.02, dtype="float32")
    t[np.arange(8), labels] = 0.92
    p = rng.dirichlet(np.ones(5), size=8).astype("float32")
    loss = HierarchicalLoss(groups, gamma=0.2, margin=0.3)
    got = np.asarray(loss.call(keras.ops.convert_to_tensor(t), keras.ops.convert_to_tensor(p)))
    np.testing.assert_allclose(got, _reference_loss(t.astype(float), p.astype(float), groups, 0.2, 0.3),
                               rtol=1e-4, atol=1e-6)
    # a perfect prediction of one-hot targets costs nothing beyond the margins it clears
    onehot = np.eye(5, dtype="float32")[labels]
    assert float(np.max(np.asarray(loss.call(onehot, onehot)))) < 1e-4


def test_one_training_step_lowers_nothing_to_nan():
    groups = [[0, 1], [2]]
    model = build_model("hierarchical", (6,), 3, groups=groups, hidden=[8], dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=HierarchicalLoss(groups))
    x = np.random.default_rng(0).normal(size=(6, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[[0, 1, 2, 0, 1, 2]]
    first = float(np.asarray(model.train_on_batch(x, y)))
    for _ in range(30):
        last = float(np.asarray(model.train_on_batch(x, y)))
    assert np.isfinite(first) and last < first


# -- config -------------------------------------------------------------------------
def test_config_checks_sources_and_their_order():
    cfg = load_config("quick")
    h = cfg["models"]["hierarchical"]
    assert h["hierarchy"]["sources"] == ["cnn_ref", "cnn_ref_gammatone", "cnn_ref_cqt"]
    assert h["hierarchy"]["gamma"] == 0.2 and h["hierarchy"]["margin"] == 0.3
    run = cfg["run"]["models"]
    assert run.index("hierarchical") > max(run.index(s) for s in h["hierarchy"]["sources"])
    with pytest.raises(ConfigError, match="must be trained before it"):
        load_config("quick", ["run.models=[hierarchical,cnn_ref,cnn_ref_gammatone,cnn_ref_cqt]"])
    with pytest.raises(ConfigError, match="not a model"):
        load_config("quick", ["models.hierarchical.hierarchy.sources=[cnn_reff]"])
    with pytest.raises(ConfigError, match="no extractor"):
        load_config("quick", ["models.hierarchical.hierarchy.sources=[stats_lgbm]"])
    with pytest.raises(ConfigError, match="only a model with builder hierarchical"):
        load_config("quick", ["models.cnn_ref.hierarchy={}"])
    with pytest.raises(ConfigError, match="groups"):
        load_config("quick", ["models.hierarchical.params.groups=[[0]]"])
    full = load_config("full")["models"]["hierarchical"]
    assert full["params"]["hidden"] == [512, 1024, 1024] and full["train"]["epochs"] == 100


# -- end to end ---------------------------------------------------------------------
def tiny_cfg() -> dict:
    cfg = load_config("quick")
    cfg["feature_extraction"] = {"n_jobs": 1, "chunk_size": 16}
    cfg["folds"] = {"n_folds": 2}
    cfg["training"].update(epochs=1, batch_size=8, eval_batch_size=64)
    for name in ("cnn_ref", "cnn_ref_gammatone"):
        cfg["models"][name]["params"] = {"filters": [4, 8], "dropout": 0.1}
        cfg["models"][name]["window"] = 16
    cfg["models"]["hierarchical"]["params"] = {"hidden": [16, 16], "dropout": 0.1}
    cfg["models"]["hierarchical"]["train"] = {"epochs": 3, "batch_size": 8, "lr": 1e-3}
    cfg["models"]["hierarchical"]["hierarchy"] = {"sources": ["cnn_ref", "cnn_ref_gammatone"], "n_meta": 2}
    cfg["run"]["models"] = ["cnn_ref", "cnn_ref_gammatone", "hierarchical"]
    cfg["stacking"] = {"mfcc_feature": None}
    cfg["pseudo_label"]["enabled"] = False
    cfg["labels"] = {"source": "given"}
    return resolve(cfg)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hierarchical")
    ds = make_tiny_dataset(root / "data", n_classes=4, clips_per_class=6, n_test=4, seed=5)
    cfg = tiny_cfg()
    work = WorkDir(root / "work")
    run_features(cfg, ds.root, work, progress=False)
    run_folds(cfg, ds.root, work)
    for source in ("cnn_ref", "cnn_ref_gammatone"):
        pipeline.fold_training.train_model(cfg, ds.root, work, source, progress=False)
    return SimpleNamespace(ds=ds, cfg=cfg, work=work, folds=load_folds(work))


def test_each_fold_reads_only_its_own_extractors_embeddings(run, monkeypatch):
    """Fold k's classifiers train, validate and predict on what fold k's
    extractors produced (``*-fold<k>`` splits), never on another fold's (whose
    extractor trained on fold k's held-out rows)."""
    reads, current = [], {}
    original_load, original_fold = EmbeddingStore.load, hier.train_hierarchical_fold

    def spy_load(self, split, fname):
        reads.append((current.get("fold"), self.source, split))
        return original_load(self, split, fname)

    def spy_fold(*args, **kwargs):
        current["fold"] = args[9]
        try:
            return original_fold(*args, **kwargs)
        finally:
            current.clear()

    monkeypatch.setattr(EmbeddingStore, "load", spy_load)
    monkeypatch.setattr(pipeline.fold_training, "train_hierarchical_fold", spy_fold)
    result = pipeline.fold_training.train_model(run.cfg, run.ds.root, run.work, "hierarchical", progress=False)
    during = [r for r in reads if r[0] is not None]
    assert {(k, s) for k, s, _ in during} == {(k, s) for k in (0, 1) for s in ("cnn_ref", "cnn_ref_gammatone")}
    wrong = [r for r in during if not r[2].endswith(f"fold{r[0]}")]
    assert not wrong, f"a fold read another fold's embeddings: {wrong[:3]}"
    assert {r[2] for r in during} == {"train-fold0", "test-fold0", "train-fold1", "test-fold1"}

    # tables, meta-classes on disk, saved classifiers that reproduce the fold's predictions
    classes = run.ds.classes
    oof = pd.read_csv(run.work.oof_csv("hierarchical"), dtype={"fname": str})
    assert oof["fname"].tolist() == run.folds["fname"].tolist()
    np.testing.assert_allclose(oof[classes].sum(axis=1), 1.0, atol=1e-5)  # tables keep 6 decimals
    assert 0.0 <= result["oof_map3"] <= 1.0
    for k in (0, 1):
        meta = read_json(run.work.fold_dir("hierarchical", k) / hier.META_FILE)
        assert len(meta["groups"]) == 2 and sorted(c for g in meta["classes"] for c in g) == sorted(classes)
        assert meta["how"].startswith("derived")
        summary = read_json(run.work.fold_dir("hierarchical", k) / "summary.json")
        assert set(summary["val_map3_per_source"]) == {"cnn_ref", "cnn_ref_gammatone"}
    # the report shows each fold's grouping
    from pipeline.reporting.sections import meta_classes_section
    text = "\n".join(meta_classes_section(run.work).lines)
    assert "## Meta-classes of the hierarchical models" in text and "derived from the out-of-fold confusion" in text
    assert all(c in text for c in classes) and "| 1 |" in text
    store = hier.source_stores(run.cfg, run.work, run.cfg["models"]["hierarchical"], compute=False)
    held = run.folds.loc[run.folds["fold"] == 1, "fname"].tolist()
    fold_dir = run.work.fold_dir("hierarchical", 1)
    summed = sum(hier.predict_rows(load_model(fold_dir / f"{s}.keras", compile=False),
                                   hier.clip_embeddings(st, st.train_split(1), held)) for s, st in store.items())
    want = oof.set_index("fname").loc[held, classes].to_numpy()
    np.testing.assert_allclose(summed / summed.sum(axis=1, keepdims=True), want, atol=1e-5)


def test_given_meta_classes_are_used_and_a_bad_one_is_refused_before_training(run, tmp_path):
    classes = run.ds.classes
    cfg = resolve({**run.cfg, "models": {**run.cfg["models"], "hierarchical": {
        **run.cfg["models"]["hierarchical"],
        "hierarchy": {**run.cfg["models"]["hierarchical"]["hierarchy"],
                      "meta_classes": {"low": classes[:1], "high": classes[1:]}}}}})
    meta = hier.fold_meta_classes(cfg["models"]["hierarchical"] | {"name": "hierarchical"}, run.work, run.folds, 0,
                                  classes)
    assert meta["how"] == "given" and meta["names"] == ["low", "high"] and meta["groups"] == [[0], [1, 2, 3]]
    bad = resolve({**cfg, "models": {**cfg["models"], "hierarchical": {
        **cfg["models"]["hierarchical"],
        "hierarchy": {**cfg["models"]["hierarchical"]["hierarchy"], "meta_classes": {"low": classes[:2]}}}}})
    with pytest.raises(ConfigError, match="in no meta-class"):
        run_features(bad, run.ds.root, WorkDir(tmp_path / "w"), progress=False)
