"""Shared test helpers: a tiny dataset in the FSDKaggle2018 layout.

``make_tiny_dataset(root, ...)`` writes synthetic, easily separable clips
(white noise and pure tones at distinct pitches, with a little noise and a
random level) plus, with ``hard_cases=True``, every awkward file the
pipeline must survive. It returns a :class:`TinyDataset` describing what was
written, so tests never hard-code file names.

Layout written under ``root``::

    train.csv              fname,label,manually_verified
    sample_submission.csv  fname,label   (test fnames, in order)
    test_labels.csv        fname,label
    audio_train/*.wav
    audio_test/*.wav

Rows: ``n_classes * clips_per_class`` regular training clips and ``n_test``
regular test clips. With ``hard_cases`` some regular clips are *encoded*
differently (stereo, 8-bit, 24-bit, float32, 44.1 kHz, 8 kHz, a 0.1 s clip:
all still usable) and three unusable clips are *added*: an empty (0-sample)
wav and an all-silent clip in train, a corrupt (garbage bytes) file in test.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

#: variant name -> (split, soundfile subtype, sample rate or None for the base rate, channels)
FORMAT_VARIANTS = {
    "stereo": ("train", "PCM_16", None, 2),
    "pcm8": ("train", "PCM_U8", None, 1),
    "pcm24": ("train", "PCM_24", None, 1),
    "float32": ("train", "FLOAT", None, 1),
    "sr44k": ("train", "PCM_16", 44100, 1),
    "short": ("train", "PCM_16", None, 1),     # 0.1 s long
    "sr8k": ("test", "PCM_16", 8000, 1),
}
#: unusable clips -> (split, status the feature stage must give them)
BAD_CASES = {
    "empty": ("train", "empty"),
    "silent": ("train", "silent"),
    "corrupt": ("test", "unreadable"),
}


@dataclass
class TinyDataset:
    root: Path
    classes: list[str]                       # sorted
    train: list[dict]                        # rows of train.csv (manually_verified as int)
    test_fnames: list[str]                   # sample_submission order
    test_labels: dict[str, str]              # fname -> label
    hard: dict[str, tuple[str, str]] = field(default_factory=dict)   # case -> (split, fname)
    bad: dict[str, tuple[str, str]] = field(default_factory=dict)    # fname -> (split, expected status)
    sr: int = 16000

    def path(self, split: str, fname: str) -> Path:
        return self.root / f"audio_{split}" / fname

    @property
    def train_fnames(self) -> list[str]:
        return [r["fname"] for r in self.train]

    @property
    def usable_train(self) -> list[str]:
        return [f for f in self.train_fnames if f not in self.bad]

    def label_of(self, fname: str) -> str:
        for r in self.train:
            if r["fname"] == fname:
                return r["label"]
        return self.test_labels[fname]


def class_names(n_classes: int) -> list[str]:
    """Class 0 is white noise, class i > 0 a tone at 250 * 2**(i-1) Hz (up to ~6 kHz)."""
    return ["noise"] + [f"tone_{int(250 * 2 ** (i - 1))}Hz" for i in range(1, n_classes)]


def synth_clip(label: str, rng: np.random.Generator, sr: int, duration: float | None = None) -> np.ndarray:
    """A mono float32 clip in [-1, 1] for ``label`` (see :func:`class_names`)."""
    if duration is None:
        duration = float(rng.uniform(0.4, 1.0))
    n = max(1, int(round(duration * sr)))
    t = np.arange(n) / sr
    level = float(rng.uniform(0.2, 0.8))
    if label == "noise":
        y = rng.uniform(-1.0, 1.0, n)
    else:
        freq = float(label.split("_")[1][:-2])
        y = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)) + 0.02 * rng.standard_normal(n)
    fade = min(n // 4, int(0.01 * sr))  # 10 ms fades, no clicks
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade)
        y[:fade] *= ramp
        y[-fade:] *= ramp[::-1]
    y = y / max(1e-9, float(np.max(np.abs(y))))
    return (level * y).astype(np.float32)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def make_tiny_dataset(root, n_classes: int = 3, clips_per_class: int = 8, n_test: int = 6, sr: int = 16000,
                      hard_cases: bool = True, seed: int = 0, verified_fraction: float = 0.6) -> TinyDataset:
    """Write a tiny FSDKaggle2018-layout dataset under ``root`` (see the module doc)."""
    if n_classes < 2 or n_classes > 7:
        raise ValueError("n_classes must be in 2..7 (tones must stay below 8 kHz)")
    root = Path(root)
    (root / "audio_train").mkdir(parents=True, exist_ok=True)
    (root / "audio_test").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = class_names(n_classes)
    used: set[str] = set()

    def new_name() -> str:
        while True:
            name = f"{int(rng.integers(0, 2 ** 32)):08x}.wav"
            if name not in used:
                used.add(name)
                return name

    # regular clips: label, verified flag (each class gets both statuses when it can)
    n_verified = int(round(verified_fraction * clips_per_class))
    if clips_per_class >= 2:
        n_verified = min(max(n_verified, 1), clips_per_class - 1)
    train_rows = []
    for label in labels:
        for j in range(clips_per_class):
            train_rows.append({"fname": new_name(), "label": label, "manually_verified": int(j < n_verified)})
    order = rng.permutation(len(train_rows))
    train_rows = [train_rows[i] for i in order]
    test_fnames = [new_name() for _ in range(n_test)]
    test_labels = {f: labels[i % n_classes] for i, f in enumerate(test_fnames)}

    ds = TinyDataset(root=root, classes=sorted(labels), train=train_rows, test_fnames=test_fnames,
                     test_labels=test_labels, sr=sr)

    # which regular clips get an awkward encoding
    variant_of: dict[str, str] = {}
    if hard_cases:
        train_pool = [r["fname"] for r in train_rows]
        ti = 0
        for case, (split, *_rest) in FORMAT_VARIANTS.items():
            if split == "train" and ti < len(train_pool):
                fname = train_pool[ti]
                ti += 1
            elif split == "test" and test_fnames:
                fname = test_fnames[0]
            else:
                continue
            variant_of[fname] = case
            ds.hard[case] = (split, fname)

    def write_clip(split: str, fname: str, label: str) -> None:
        path = root / f"audio_{split}" / fname
        case = variant_of.get(fname)
        subtype, rate, channels = "PCM_16", sr, 1
        duration = None
        if case is not None:
            _split, subtype, case_rate, channels = FORMAT_VARIANTS[case]
            rate = case_rate or sr
            if case == "short":
                duration = 0.1
        y = synth_clip(label, rng, rate, duration)
        if channels == 2:
            # right channel a quieter copy, so the channel mean is not trivially one channel
            y = np.stack([y, 0.5 * y], axis=1)
        sf.write(str(path), y, rate, subtype=subtype)

    for r in train_rows:
        write_clip("train", r["fname"], r["label"])
    for f in test_fnames:
        write_clip("test", f, test_labels[f])

    if hard_cases:
        # unusable clips, added on top of the regular ones
        empty = new_name()
        sf.write(str(root / "audio_train" / empty), np.zeros(0, dtype=np.float32), sr, subtype="PCM_16")
        silent = new_name()
        sf.write(str(root / "audio_train" / silent), np.zeros(int(0.5 * sr), dtype=np.float32), sr, subtype="PCM_16")
        for case, fname in (("empty", empty), ("silent", silent)):
            row = {"fname": fname, "label": labels[0], "manually_verified": 1}
            train_rows.append(row)
            ds.hard[case] = ("train", fname)
            ds.bad[fname] = ("train", BAD_CASES[case][1])
        corrupt = new_name()
        (root / "audio_test" / corrupt).write_bytes(b"RIFF\x00\x01garbage, not audio" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
        test_fnames.append(corrupt)
        test_labels[corrupt] = labels[1 % n_classes]
        ds.hard["corrupt"] = ("test", corrupt)
        ds.bad[corrupt] = ("test", "unreadable")

    _write_csv(root / "train.csv", ["fname", "label", "manually_verified"],
               [[r["fname"], r["label"], r["manually_verified"]] for r in train_rows])
    _write_csv(root / "sample_submission.csv", ["fname", "label"],
               [[f, " ".join(ds.classes[:3])] for f in test_fnames])
    _write_csv(root / "test_labels.csv", ["fname", "label"], [[f, test_labels[f]] for f in test_fnames])
    return ds


def tiny_config(**feature_overrides) -> dict:
    """A small preset for stage tests: two cheap features, one worker, small chunks, no
    pseudo-labelling; resolved over the schema's defaults, as ``load_config`` returns it."""
    from pipeline.config import resolve
    features = {
        "logmel": {"kind": "logmel", "sr": 16000, "n_fft": 512, "hop_length": 256, "n_mels": 16,
                   "fmin": 20, "fmax": 8000, "delta_width": 9, "dtype": "float16"},
        "wave": {"kind": "wave", "sr": 8000, "dtype": "float32"},
    }
    for name, params in feature_overrides.items():
        features[name] = {**features.get(name, {}), **params}
    cfg = resolve({
        "seed": 2018,
        "audio": {"trim_top_db": 60, "silence_peak": 1.0e-4},
        "feature_extraction": {"n_jobs": 1, "chunk_size": 8},
        "folds": {"n_folds": 3},
        "training": {"smoothing_verified": 0.05, "smoothing_unverified": 0.3},
        "models": {"m_logmel": {"builder": "cnn_ref", "feature": "logmel", "window": 16},
                   "m_wave": {"builder": "wave1d", "feature": "wave", "window": 2048}},
        "run": {"models": ["m_logmel", "m_wave"]},
        "pseudo_label": {"enabled": False},
        "labels": {"source": "given"},
        "stacking": {"mfcc_feature": None},
    })
    cfg["features"] = features  # only these two (not merged with the default features)
    cfg["models"] = {k: v for k, v in cfg["models"].items() if k in ("m_logmel", "m_wave")}
    return cfg


# ---------------------------------------------------------------------------
# the FSDKaggle2018 release as downloaded from Zenodo

ZENODO_META = "FSDKaggle2018.meta"
ZENODO_TRAIN_CSV = f"{ZENODO_META}/train_post_competition.csv"
ZENODO_TEST_CSV = f"{ZENODO_META}/test_post_competition_scoring_clips.csv"
ZENODO_AUDIO = {"train": "FSDKaggle2018.audio_train", "test": "FSDKaggle2018.audio_test"}


@dataclass
class ZenodoDataset:
    root: Path
    classes: list[str]                       # sorted
    train: list[dict]                        # rows of train_post_competition.csv (manually_verified as int)
    test_fnames: list[str]                   # scoring clips, in file order
    test_labels: dict[str, str]              # fname -> label (every scoring clip)
    usage: dict[str, str]                    # fname -> "Public" / "Private"
    padding: list[str] = field(default_factory=list)   # in the test audio folder but not scored

    @property
    def train_csv(self) -> Path:
        return self.root / ZENODO_TRAIN_CSV

    @property
    def test_csv(self) -> Path:
        return self.root / ZENODO_TEST_CSV

    def audio_dir(self, split: str) -> Path:
        return self.root / ZENODO_AUDIO[split]

    def path(self, split: str, fname: str) -> Path:
        return self.audio_dir(split) / fname

    @property
    def train_fnames(self) -> list[str]:
        return [r["fname"] for r in self.train]


def make_zenodo_layout(root, n_classes: int = 3, clips_per_class: int = 4, n_test: int = 4, n_padding: int = 2,
                       sr: int = 16000, seed: int = 0) -> ZenodoDataset:
    """Write a tiny dataset in the Zenodo FSDKaggle2018 layout under ``root``::

        FSDKaggle2018.audio_train/*.wav
        FSDKaggle2018.audio_test/*.wav     scoring clips + ``n_padding`` unscored ones
        FSDKaggle2018.meta/train_post_competition.csv             fname,label,manually_verified,freesound_id,license
        FSDKaggle2018.meta/test_post_competition_scoring_clips.csv fname,label,usage,freesound_id,license

    Built from :func:`make_tiny_dataset` (no hard cases) in a staging folder
    whose audio folders are moved into place; nothing else is left behind.
    Scoring clips alternate Public / Private usage."""
    import shutil

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / "_kaggle_staging"
    tiny = make_tiny_dataset(staging, n_classes=n_classes, clips_per_class=clips_per_class, n_test=n_test + n_padding,
                             sr=sr, hard_cases=False, seed=seed)
    for split, folder in ZENODO_AUDIO.items():
        (staging / f"audio_{split}").rename(root / folder)
    shutil.rmtree(staging)
    (root / ZENODO_META).mkdir(exist_ok=True)
    scored, padding = tiny.test_fnames[:n_test], tiny.test_fnames[n_test:]
    usage = {f: ("Public" if i % 2 == 0 else "Private") for i, f in enumerate(scored)}
    _write_csv(root / ZENODO_TRAIN_CSV, ["fname", "label", "manually_verified", "freesound_id", "license"],
               [[r["fname"], r["label"], r["manually_verified"], 1000 + i, "Attribution"]
                for i, r in enumerate(tiny.train)])
    _write_csv(root / ZENODO_TEST_CSV, ["fname", "label", "usage", "freesound_id", "license"],
               [[f, tiny.test_labels[f], usage[f], 5000 + i, "Creative Commons 0"] for i, f in enumerate(scored)])
    return ZenodoDataset(root=root, classes=tiny.classes, train=tiny.train, test_fnames=scored,
                         test_labels={f: tiny.test_labels[f] for f in scored}, usage=usage, padding=padding)


def assert_defaults_read_without_keras(*names: str) -> None:
    """``models.builder_defaults`` of these builders, in a fresh interpreter, imports neither Keras nor TF."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, models\n"
            f"for name in {list(names)!r}:\n"
            "    models.builder_defaults(name)\n"
            "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={"PYTHONPATH": str(root), "PATH": ""}, timeout=60)
    assert out.returncode == 0, out.stderr
