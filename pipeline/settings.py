"""Every setting once: its type, default and one-line doc (the typed config schema).

Why pydantic rather than dataclasses: the checks a user needs on load (an
unknown key, a wrong type, an out-of-range value, each with its dotted path)
come with it -- ``extra="forbid"``, strict types, ``ge``/``le`` bounds and
error locations -- and each field's docstring is its documentation
(``use_attribute_docstrings``), which ``python -m pipeline.config`` prints.

The defaults are the ``quick`` settings (a run without a preset works on a
laptop CPU); ``config/full.yaml`` lists what the papers change. The rest of
the code reads the resolved plain dict (``Config.model_dump()``), so a
default lives here and nowhere else.

Model hyperparameters (``models.<name>.params``) belong to the builder:
a network's are the keyword arguments of its ``build`` function (their
defaults are read from the signature, see :func:`models.builder_defaults`),
the handcrafted models' are :class:`StatsLgbmParams` / :class:`StatsLrParams`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_KW = dict(extra="forbid", strict=True, use_attribute_docstrings=True, validate_default=True)


class Section(BaseModel):
    """A group of settings: unknown keys and wrong types are refused."""
    model_config = ConfigDict(**_KW)


def _listify(value):
    """YAML users write ``verifiers: cnn_ref`` for a one-element list."""
    return [value] if isinstance(value, str) else value


# ---------------------------------------------------------------- audio and features
class Audio(Section):
    """Preprocessing shared by every feature (part of every feature's cache key)."""
    trim_top_db: float | None = Field(60.0, ge=0)
    """trim leading/trailing audio this far below the loudest frame (dB; null: no trimming)"""
    silence_peak: float = Field(1.0e-4, ge=0)
    """a clip whose peak amplitude is below this is "silent" and left out"""


class FeatureExtraction(Section):
    n_jobs: int = -1
    """joblib workers for feature extraction (-1: all cores)"""
    chunk_size: int = Field(64, ge=1)
    """clips per worker task (one shard file each)"""


Dtype = Literal["float16", "float32"]


class _HopFeature(Section):
    """Settings every framed time-frequency feature shares."""
    kind: str
    sr: int = Field(16000, ge=1)
    """sample rate the audio is resampled to (Hz)"""
    hop_length: int = Field(256, ge=1)
    """hop between frames (samples)"""


class _FrameFeature(_HopFeature):
    """An STFT-based feature: its FFT size too."""
    n_fft: int = Field(1024, ge=16)
    """FFT size (samples)"""


class LogmelFeature(_FrameFeature):
    """3-channel log-mel + delta + delta-delta, (T, n_mels, 3)."""
    kind: Literal["logmel"] = "logmel"
    n_mels: int = Field(48, ge=1)
    """mel bands"""
    fmin: float = Field(20.0, ge=0)
    """lowest mel frequency (Hz)"""
    fmax: float | None = 8000.0
    """highest mel frequency (Hz; null: sr / 2)"""
    delta_width: int = Field(9, ge=3)
    """frames of the delta regression (odd)"""
    dtype: Dtype = "float16"
    """storage type in the cache"""


class MfccFeature(_FrameFeature):
    """MFCC, (T, n_mfcc): DCT of the dB log-mel."""
    kind: Literal["mfcc"] = "mfcc"
    n_mels: int = Field(40, ge=1)
    """mel bands before the DCT"""
    n_mfcc: int = Field(20, ge=1)
    """coefficients kept"""
    fmin: float = Field(20.0, ge=0)
    """lowest mel frequency (Hz)"""
    fmax: float | None = None
    """highest mel frequency (Hz; null: sr / 2)"""
    dtype: Dtype = "float32"
    """storage type in the cache"""


class WaveFeature(Section):
    """The resampled waveform, (N, 1), for 1D ConvNets."""
    kind: Literal["wave"] = "wave"
    sr: int = Field(8000, ge=1)
    """sample rate (Hz; paper: 44100, quick: 8000 for CPU speed)"""
    dtype: Dtype = "float32"
    """storage type in the cache (float16 halves it; converted per batch)"""


class VggishFeature(Section):
    """VGGish frames (T, 64): the AudioSet reference's fixed settings (16 kHz, 64 bands)."""
    kind: Literal["vggish"] = "vggish"


class CqtFeature(_HopFeature):
    """Constant-Q log-magnitude spectrogram (librosa.cqt, dB), (T, n_bins); hop_length must be a multiple of
    2^(octaves - 1), octaves = ceil(n_bins / bins_per_octave)."""
    kind: Literal["cqt"] = "cqt"
    n_bins: int = Field(84, ge=1)
    """frequency bins (84 at 12 per octave: 7 octaves, C1 to B7)"""
    bins_per_octave: int = Field(12, ge=1)
    """bins per octave"""
    fmin: float = Field(32.703195662574764, gt=0)
    """centre of the lowest bin (Hz; C1)"""
    dtype: Dtype = "float16"
    """storage type in the cache"""

    @model_validator(mode="after")
    def _librosa_limits(self):
        n_octaves = -(-self.n_bins // self.bins_per_octave)
        step = 2 ** (n_octaves - 1)
        if self.hop_length % step:
            raise ValueError(f"hop_length: {self.hop_length} is not a multiple of 2^{n_octaves - 1} = {step}, which "
                             f"a {n_octaves}-octave CQT needs to halve the rate and the hop once per octave (librosa "
                             f"< 0.9 refuses other hops, later ones compute the lower octaves at the full rate, ~3x "
                             f"slower); use e.g. {max(step, round(self.hop_length / step) * step)}")
        # librosa's limit: the top bin's filter, f (1 + 0.5 * 1.50018 (Hann bandwidth) * alpha), under Nyquist
        ratio = 2.0 ** (2.0 / self.bins_per_octave)
        alpha = (ratio - 1.0) / (ratio + 1.0)
        f_top = self.fmin * 2.0 ** ((self.n_bins - 1) / self.bins_per_octave)
        cutoff = f_top * (1.0 + 0.5 * 1.50018310546875 * alpha)
        if cutoff > self.sr / 2.0:
            raise ValueError(f"n_bins: the top bin ({f_top:.0f} Hz) has a filter reaching {cutoff:.0f} Hz, above the "
                             f"Nyquist frequency sr / 2 = {self.sr / 2:g} Hz; use fewer bins, a lower fmin or a "
                             f"higher sr")
        return self


class GammatoneFeature(_HopFeature):
    """Gammatone log-power spectrogram (dB), (T, n_bands): ERB-spaced 4th-order IIR gammatone filters."""
    kind: Literal["gammatone"] = "gammatone"
    win_length: int = Field(1024, ge=2)
    """frame over which each band's power is averaged (samples)"""
    n_bands: int = Field(64, ge=1)
    """gammatone filters (bands)"""
    fmin: float = Field(50.0, gt=0)
    """centre of the lowest band (Hz)"""
    fmax: float = Field(7500.0, gt=0)
    """centre of the highest band (Hz; below sr / 2)"""
    dtype: Dtype = "float16"
    """storage type in the cache"""

    @model_validator(mode="after")
    def _band_limits(self):
        if self.fmax >= self.sr / 2.0:
            raise ValueError(f"fmax: {self.fmax:g} Hz is not below the Nyquist frequency sr / 2 = {self.sr / 2:g} Hz "
                             f"(a gammatone centre must be)")
        if self.fmin >= self.fmax:
            raise ValueError(f"fmin: {self.fmin:g} Hz is not below fmax = {self.fmax:g} Hz")
        return self


Feature = Annotated[Union[LogmelFeature, MfccFeature, WaveFeature, VggishFeature, CqtFeature, GammatoneFeature],
                    Field(discriminator="kind")]
FEATURE_KINDS = {"logmel": LogmelFeature, "mfcc": MfccFeature, "wave": WaveFeature, "vggish": VggishFeature,
                 "cqt": CqtFeature, "gammatone": GammatoneFeature}


def _default_features() -> dict:
    return {"logmel": LogmelFeature(), "mfcc": MfccFeature(), "wave": WaveFeature(), "vggish": VggishFeature(),
            "cqt": CqtFeature(), "gammatone": GammatoneFeature()}


class Folds(Section):
    n_folds: int = Field(5, ge=2)
    """cross-validation folds, stratified on label x manually_verified"""


# ---------------------------------------------------------------- training
class SpecAugment(Section):
    """Time and frequency masks for 2D inputs."""
    time_masks: int = Field(1, ge=0)
    """masks along time"""
    time_width: int = Field(8, ge=0)
    """largest time mask (frames)"""
    freq_masks: int = Field(1, ge=0)
    """masks along frequency"""
    freq_width: int = Field(6, ge=0)
    """largest frequency mask (bins)"""


class Training(Section):
    """Defaults for every model; a model's ``train`` section overrides any of them."""
    epochs: int = Field(8, ge=1)
    """training epochs per fold"""
    batch_size: int = Field(32, ge=1)
    """clips per batch"""
    steps_per_epoch: int | None = Field(None, ge=1)
    """batches per epoch (null: one pass over the training clips)"""
    lr: float = Field(1.0e-3, gt=0)
    """Adam learning rate"""
    lr_factor: float = Field(0.5, gt=0, le=1)
    """reduce-on-plateau factor (on held-out MAP@3)"""
    lr_patience: int = Field(3, ge=1)
    """epochs without gain before the learning rate is reduced"""
    min_lr: float = Field(1.0e-6, ge=0)
    """floor of the learning rate"""
    early_stop_patience: int = Field(5, ge=1)
    """epochs without gain before the fold stops"""
    mixup_alpha: float = Field(0.0, ge=0)
    """mixup Beta(a, a); 0 disables mixup"""
    spec_augment: SpecAugment | None = None
    """time/frequency masks for 2D inputs (null: none)"""
    class_weight: Literal["balanced"] | None = None
    """null or balanced (inverse class frequency)"""
    smoothing_verified: float | None = Field(0.05, ge=0, le=1)
    """label smoothing epsilon of manually verified rows (given labels)"""
    smoothing_unverified: float | None = Field(0.3, ge=0, le=1)
    """label smoothing epsilon of non-verified rows (given labels)"""
    loss_masking: float | None = Field(None, ge=0, le=1)
    """null, or drop non-verified losses above this ratio x the batch max (1st place: 0.8)"""
    eval_hop_fraction: float = Field(0.5, gt=0, le=1)
    """sliding-window hop at inference, as a fraction of the window"""
    eval_batch_size: int = Field(128, ge=1)
    """windows per inference batch"""
    strict_determinism: bool = False
    """TF op determinism (bit-exact reruns, ~2x slower on CPU)"""
    bn_momentum: float | None = Field(0.9, ge=0, le=1)
    """BatchNorm moving-average momentum (null: the builder's 0.99); quick runs are short"""
    batch_policy: Literal["balanced", "unbalanced", "pairs"] | None = None
    """null/unbalanced: random clips; balanced: one clip of every class per batch; pairs: batch_size / 2 classes
    with two clips each (what the triplet loss needs; chosen for it when null)"""
    early_stopping_split: Literal["heldout", "inner"] = "heldout"
    """heldout: the fold's held-out clips pick the best epoch (papers); inner: a seeded slice of the training folds"""
    inner_fraction: float = Field(0.15, gt=0, le=0.5)
    """inner: share of the training clips in the early-stopping slice"""
    loss: Literal["crossentropy", "focal", "triplet"] = "crossentropy"
    """crossentropy; focal (multi-scale Xception paper); triplet: crossentropy + triplet_weight x a triplet loss on
    the model's embedding output (factorized-CNN paper; needs a builder with embedding_output)"""
    focal_gamma: float = Field(2.0, ge=0)
    """focal: focusing exponent (paper: 3 on subtask A, 1 on B; 0 = cross-entropy)"""
    focal_alpha: list[float] | Literal["balanced"] | None = None
    """focal: per-class weights: null (all 1), one per class, or balanced (inverse class frequency of the training
    rows, mean 1, clipped to [0.25, 4])"""
    triplet_margin: float = Field(0.2, ge=0)
    """triplet: hinge margin on squared Euclidean distances (paper: 0.2)"""
    triplet_weight: float = Field(10.0, ge=0)
    """triplet: gamma of crossentropy + gamma x triplet (paper: 10)"""
    triplet_normalize: bool = True
    """triplet: L2-normalise the embedding before the triplet loss (FaceNet; the paper does not say; demo,
    factorized_cnn: test MAP@3 0.531 raw vs 0.779 normalised, crossentropy alone 0.755)"""
    triplet_strategy: Literal["paper", "batch_all", "batch_hard", "semi_hard"] = "paper"
    """triplet: how triplets are formed in a batch: paper (every anchor-positive pair of a class from different
    clips, a random negative of another class each), batch_all, batch_hard or semi_hard"""
    callbacks: list[dict[str, Any]] = []
    """extra Keras callbacks per fold: [{class: CSVLogger or pkg.module.Class, args: {...}}]; "{fold_dir}" in a
    string argument is the fold's folder"""
    loader_workers: int | None = Field(None, ge=0, le=64)
    """workers making batches ahead of the step (training and sliding-window prediction); 0: each batch made in
    the loop when its step comes; null: one per core beyond one, at most 8 (results never depend on it)"""
    prefetch_batches: int | None = Field(None, ge=1, le=256)
    """batches made ahead at most (the prefetch queue's bound; null: 2 x loader_workers)"""
    loader_kind: Literal["auto", "thread", "process"] = "auto"
    """training workers: threads, processes (each with a copy of the batch maker), or auto: threads (measured
    faster for every feature kind here, README); prediction always uses threads"""

    @model_validator(mode="after")
    def _no_mixed_triplets(self):
        if self.loss == "triplet" and self.mixup_alpha > 0:
            raise ValueError("mixup_alpha: mixup and the triplet loss do not mix (mixed labels have no anchor or "
                             "positive); set mixup_alpha: 0 (the paper trains the triplet model without mixup)")
        return self


def check_train_overrides(value: dict, where: str) -> dict:
    """A ``train`` section holds some of :class:`Training`'s fields: each is checked as there."""
    if not isinstance(value, dict):
        raise ValueError("must be a mapping of training settings")
    try:
        Training.model_validate(value)  # unknown keys, types and ranges
    except ValidationError as exc:
        raise ValueError(describe_error(exc, model=Training)) from None
    return value


# ---------------------------------------------------------------- models
class StatsParams(Section):
    """Per-clip statistics over time (both handcrafted models)."""
    stats: list[str] = ["mean", "std", "min", "max", "skew"]
    """statistics per coefficient / band / delta channel: mean, std, var, min, max, skew, p<q> (percentile)"""
    mfcc_deltas: bool = True
    """add statistics of the MFCC deltas"""
    delta_width: int = Field(9, ge=3)
    """frames of the MFCC delta regression"""
    length: bool = True
    """one column log(1 + frames): the clip's duration"""
    unverified_weight: float = Field(0.3, ge=0)
    """sample weight of non-verified rows (fsdd: 0 .8782, 0.3 .8788, 1 .8684 OOF MAP@3 for stats_lr)"""
    n_jobs: int = 1
    """threads (1: on a busy 2-core machine two OpenMP threads spun, 35 s vs 8 s CPU per fsdd fold)"""


class StatsLgbmParams(StatsParams):
    """LightGBM on the statistics: small trees, a fixed number of rounds."""
    n_estimators: int = Field(150, ge=1)
    """boosting rounds"""
    learning_rate: float = Field(0.1, gt=0)
    """shrinkage"""
    num_leaves: int = Field(15, ge=2)
    """leaves per tree"""
    max_depth: int = -1
    """tree depth (-1: unlimited)"""
    min_child_samples: int = Field(10, ge=1)
    """rows per leaf at least"""
    colsample_bytree: float = Field(0.2, gt=0, le=1)
    """share of columns per tree"""
    subsample: float = Field(0.8, gt=0, le=1)
    """share of rows per tree"""
    reg_lambda: float = Field(1.0, ge=0)
    """L2 regularisation"""
    max_bin: int = Field(63, ge=2)
    """histogram bins"""


class StatsLrParams(StatsParams):
    """Multinomial logistic regression on the standardised statistics."""
    C: float | Literal["auto"] = 0.01
    """inverse regularisation, or auto: LogisticRegressionCV over Cs (fsdd: 0.01 .8788, auto .8745 OOF MAP@3)"""
    Cs: list[float] = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    """candidates for C: auto"""
    cv: int = Field(3, ge=2)
    """inner folds for C: auto"""
    max_iter: int = Field(2000, ge=1)
    """solver iterations"""


HANDCRAFTED_PARAMS = {"stats_lgbm": StatsLgbmParams, "stats_lr": StatsLrParams}


class Hierarchy(Section):
    """Two-level classification on frozen per-fold embeddings (builder: hierarchical; training: epochs, batch_size,
    lr of its train section)."""
    sources: list[str] = ["cnn_ref", "cnn_ref_gammatone", "cnn_ref_cqt"]
    """models whose fold extractors embed the clips (penultimate layer, mean over windows); one classifier per
    source, their posteriors summed (one source: that representation alone)"""
    meta_classes: dict[str, list[str]] | None = None
    """meta-class name -> its classes (each class exactly once); null: derived per fold by clustering the class
    confusion of the sources' out-of-fold predictions"""
    n_meta: int | None = Field(None, ge=1)
    """derived meta-classes: how many (null: round(sqrt(classes)), 3 for 10 classes as the paper's scenes)"""
    gamma: float = Field(0.2, ge=0, le=1)
    """loss = gamma x KL + (1 - gamma) x triplet in the output space (paper: 0.2)"""
    margin: float = Field(0.3, ge=0)
    """triplet margin on squared Euclidean distances between distributions (paper: 0.3)"""

    _check_sources = field_validator("sources", mode="before")(lambda cls, v: _listify(v))

    @field_validator("sources")
    @classmethod
    def _some_sources(cls, value):
        if not value or len(set(value)) != len(value):
            raise ValueError(f"must name one or more distinct models, got {value!r}")
        return value


class JobResources(Section):
    """What one Ray job (a fold, a verifier fold, a fold's embeddings) asks the scheduler for."""
    num_cpus: float = Field(1.0, ge=0, le=1024)
    """CPU cores Ray reserves per job (a scheduling request: TensorFlow still uses the node's cores, as locally)"""
    num_gpus: float = Field(0.0, ge=0, le=64)
    """GPUs per job (a fraction shares one: 0.5 runs two jobs per GPU)"""


class ResourceOverrides(Section):
    """One model's jobs' requests, over ``run.resources`` (null: as there)."""
    num_cpus: float | None = Field(None, ge=0, le=1024)
    """CPU cores reserved per job of this model (null: run.resources.num_cpus)"""
    num_gpus: float | None = Field(None, ge=0, le=64)
    """GPUs per job of this model (null: run.resources.num_gpus)"""


class ModelSpec(Section):
    """One trainable model: a builder, its input, its hyperparameters and training overrides."""
    builder: str | None = None
    """builder name (models.BUILDERS, stats_lgbm, stats_lr); null: the entry's own name"""
    feature: str | None = None
    """cached feature (a name in features) the network reads"""
    features: list[str] | None = None
    """cached features a handcrafted model reads"""
    embeddings_from: str | None = None
    """read per-fold embeddings of this model's extractors instead of a feature"""
    normalize: bool = True
    """standardise the input with the training clips' statistics"""
    window: int = Field(0, ge=0)
    """input length along time (frames, samples or embeddings); 0 for handcrafted models"""
    params: dict[str, Any] = {}
    """the builder's hyperparameters (defaults: the builder's signature)"""
    train: dict[str, Any] = {}
    """training overrides (any training setting)"""
    hierarchy: Hierarchy | None = None
    """builder hierarchical only: its sources, meta-classes and loss (null: the defaults)"""
    resources: ResourceOverrides | None = None
    """run.executor ray: what each of this model's jobs requests, over run.resources (not part of any fingerprint)"""

    _check_features = field_validator("features", mode="before")(lambda cls, v: _listify(v))

    @field_validator("train")
    @classmethod
    def _train(cls, value):
        return check_train_overrides(value, "train")


#: builder parameters the trainer sets, never the user
TRAINER_SET_PARAMS = {"embedding_output": "set by the trainer from train.loss (triplet: on)",
                      "groups": "set per fold from hierarchy.meta_classes or the derived meta-classes"}


def _resolve_params(name: str, spec: dict) -> dict:
    """The builder's hyperparameters with its defaults filled in; unknown names refused."""
    import models  # cheap: reads signatures without importing Keras
    builder = spec.get("builder") or name
    params = dict(spec.get("params") or {})
    if builder in HANDCRAFTED_PARAMS:
        return HANDCRAFTED_PARAMS[builder].model_validate(params).model_dump()
    if builder not in models.BUILDERS:
        known = sorted(models.BUILDERS) + sorted(HANDCRAFTED_PARAMS)
        raise ValueError(f"builder: unknown builder {builder!r}{closest(builder, known)}")
    defaults = models.builder_defaults(builder)
    for key, why in TRAINER_SET_PARAMS.items():
        defaults.pop(key, None)
        if key in params:
            raise ValueError(f"params.{key}: {why}, not here")
    for key, value in params.items():
        if key not in defaults:
            raise ValueError(f"params.{key}: not a parameter of {builder}{closest(key, defaults)}")
        models.check_param_type(builder, key, value, defaults[key])
    return {**defaults, **params}


def _default_models() -> dict:
    return {
        "cnn_ref": {"feature": "logmel", "window": 64, "params": {"filters": [16, 32, 64, 128], "dropout": 0.2}},
        "wave1d": {"feature": "wave", "window": 8192, "train": {"mixup_alpha": 1.0}},
        # quick: no mixup and 128 frames -- in 8 epochs mixup 1.0 underfits (test MAP@3 over three datasets:
        # 0.59 with mixup 1.0 and 64 frames, 0.71 without mixup, 0.77 without mixup at 128 frames; README)
        "inception2d": {"feature": "logmel", "window": 128, "params": {"width": 0.25},
                        "train": {"mixup_alpha": 0.0, "spec_augment": {"time_masks": 1, "time_width": 8,
                                                                       "freq_masks": 1, "freq_width": 6}}},
        "vggish": {"feature": "vggish", "window": 96, "params": {"width": 0.125, "hidden": 100},
                   "train": {"eval_hop_fraction": 1.0, "batch_policy": "balanced"}},
        "mla": {"embeddings_from": "vggish", "normalize": False, "window": 6,
                "params": {"units": 128, "levels": 3, "dropout": 0.4},
                "train": {"mixup_alpha": 0.2, "eval_hop_fraction": 0.5}},
        "xception_ms": {"feature": "logmel", "window": 64, "params": {"width": 0.25, "middle_blocks": 2},
                        "train": {"loss": "focal"}},
        "factorized_cnn": {"feature": "logmel", "window": 64,
                           "train": {"loss": "triplet", "mixup_alpha": 0.0,
                                     "spec_augment": {"time_masks": 1, "time_width": 8, "freq_masks": 1,
                                                      "freq_width": 6}}},
        "mini_segnet": {"feature": "logmel", "window": 64, "params": {"width": 0.5}},
        "stats_lgbm": {"features": ["mfcc", "logmel"], "window": 0},
        "stats_lr": {"features": ["mfcc", "logmel"], "window": 0},
        # the hierarchical model's extractors on the other two representations (cnn_ref on logmel is the third)
        "cnn_ref_gammatone": {"builder": "cnn_ref", "feature": "gammatone", "window": 64,
                              "params": {"filters": [16, 32, 64, 128], "dropout": 0.2}},
        "cnn_ref_cqt": {"builder": "cnn_ref", "feature": "cqt", "window": 64,
                        "params": {"filters": [16, 32, 64, 128], "dropout": 0.2}},
        "hierarchical": {"normalize": True, "window": 0, "params": {"hidden": [128, 256, 256], "dropout": 0.3},
                         "train": {"epochs": 60, "batch_size": 100, "lr": 1.0e-3},
                         "hierarchy": {}},
    }


# ---------------------------------------------------------------- labels, pseudo-labels, run
class Labels(Section):
    source: Literal["given", "pseudo"] = "pseudo"
    """given: train.csv labels smoothed by status; pseudo: <work>/labels.csv from the pseudo_label stage"""


class PseudoLabel(Section):
    """Noisy labels: ``python -m pipeline.pseudo_label`` writes <work>/labels.csv (fname, label, status, epsilon)."""
    enabled: bool = True
    """false: the stage is skipped (labels.csv = the given labels with training.smoothing_*)"""
    mode: Literal["verify", "smoothing", "loss_masking", "self_verify"] = "verify"
    """verify: the pseudo-label loop; smoothing: given labels, eps by status; loss_masking: as smoothing, the
    trainer drops large non-verified losses (set training.loss_masking); self_verify: the 2nd-place rule"""
    verifiers: list[str] = ["cnn_ref"]
    """verifier ensemble (geometric mean): names in models or pseudo_label.models"""
    models: dict[str, ModelSpec] = {}
    """verifier-only model entries (same format as models)"""
    train: dict[str, Any] = {}
    """training overrides for the verifiers, e.g. {epochs: 6}"""
    accept_threshold: float = Field(0.5, ge=0, le=1)
    """accept a row whose top class is its given label with p above this"""
    final_accept_threshold: float = Field(0.1, ge=0, le=1)
    """on the last iteration: accept at this lower p"""
    relabel_threshold: float = Field(0.5, ge=0, le=1)
    """on the last iteration: relabel a row whose top class is another with p above this"""
    max_iterations: int = Field(2, ge=1)
    """training rounds at most (iterations 0 .. max_iterations-1)"""
    unresolved_epsilon: list[float] = [0.1, 0.3]
    """per-row label smoothing of unresolved rows ~ U(low, high), seeded"""
    crops: int = Field(25, ge=1)
    """self_verify: random crops per clip"""
    self_verify_threshold: float = Field(0.95, ge=0, le=1)
    """self_verify: mean probability of the label over the crops"""
    per_class_cap: int = Field(40, ge=1)
    """self_verify: accepted clips per class per round at most"""
    guard: bool = True
    """verify: thresholds only where the verifiers' out-of-fold precision on verified rows supports them;
    fall back to the given labels if accepted rows hurt"""
    accept_precision: float = Field(0.95, gt=0, le=1)
    """guard: precision the accept threshold must reach on verified rows"""
    relabel_precision: float = Field(0.9, gt=0, le=1)
    """guard: precision the relabel threshold must reach (else no relabelling)"""
    min_support: int = Field(20, ge=1)
    """guard: verified rows above a threshold needed to trust its precision"""
    fallback_margin: float = Field(0.01, ge=0)
    """guard: MAP@3 drop on verified rows (vs iteration 0) that triggers the fallback"""

    _verifiers = field_validator("verifiers", mode="before")(lambda cls, v: _listify(v))

    @field_validator("train")
    @classmethod
    def _train(cls, value):
        return check_train_overrides(value, "train")

    @field_validator("unresolved_epsilon")
    @classmethod
    def _eps(cls, value):
        if len(value) != 2 or not 0.0 <= value[0] <= value[1] <= 1.0:
            raise ValueError(f"must be [low, high] with 0 <= low <= high <= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _needs_verifiers(self):
        if self.mode in ("verify", "self_verify") and not self.verifiers:
            raise ValueError("verifiers is empty: name at least one model")
        return self


class Run(Section):
    models: list[str] = ["stats_lgbm", "stats_lr", "cnn_ref", "wave1d", "inception2d", "xception_ms",
                         "factorized_cnn", "mini_segnet", "vggish", "mla", "cnn_ref_gammatone", "cnn_ref_cqt",
                         "hierarchical"]
    """models trained, in this order (a model on embeddings after its source); stats_*: handcrafted baselines"""
    # How the work is run, never what it computes: no fingerprint includes the executor settings
    # (pipeline.config.EXECUTOR_ONLY), so switching executors or resources retrains nothing.
    executor: Literal["local", "ray"] = "local"
    """local: every job in this process, in order; ray: (model, fold) trainings, verifier folds, per-fold
    embeddings and feature chunks as Ray tasks placed by their resources (README, "Running on Ray")"""
    ray_address: str = ""
    """ray: empty = start a Ray on this machine for the stage; auto = join the cluster started here with
    `ray start`; ray://host:10001 = join a remote cluster through Ray Client"""
    resources: JobResources = JobResources()
    """ray: what one job requests (a model's `resources` overrides it)"""
    max_retries: int = Field(3, ge=0, le=100)
    """ray: times a job whose worker died (node lost, killed, out of memory) is run again; it resumes from its
    last epoch checkpoint"""


# ---------------------------------------------------------------- stacking
class LearnedBlend(Section):
    l2: float = Field(0.0, ge=0)
    """L2 pull of the per-model weights towards equal"""


class LightgbmStacker(Section):
    n_estimators: int = Field(400, ge=1)
    """boosting rounds at most (the number is picked by inner CV)"""
    learning_rate: float = Field(0.05, gt=0)
    """shrinkage"""
    max_depth: int = 3
    """tree depth"""
    num_leaves: int | list[int] = 8
    """leaves per tree (a list: a grid chosen by inner CV; cost 3-5x and did not help on the demo)"""
    min_child_samples: int | list[int] = 20
    """rows per leaf at least (a list: a grid, as num_leaves)"""
    n_jobs: int = 1
    """threads"""
    inner_folds: int = Field(3, ge=0)
    """inner CV folds that pick the number of trees (< 2: n_estimators trees, no inner CV)"""
    early_stopping_rounds: int = Field(30, ge=1)
    """inner CV: stop after this many rounds without gain"""


class LogregStacker(Section):
    C: list[float] | float = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    """inverse regularisation; a list is searched by inner CV in each outer fold"""
    per_model_weights: bool = True
    """true: one weight per model (+ class bias), the LR-fusion paper's form; false: full multinomial"""
    class_bias: bool = True
    """per-class intercept"""
    inner_folds: int = Field(3, ge=2)
    """inner CV folds for C"""


class Stacking(Section):
    """Level-2 learning on the out-of-fold tables (``python -m stacking.stack``)."""
    models: list[str] | None = None
    """models stacked (null: run.models)"""
    learners: list[str] | None = None
    """learners evaluated (null: all registered: mean, geomean, rank, learned, logreg, lightgbm)"""
    final: str = "auto"
    """auto: keep `default` unless a candidate's paired CV advantage exceeds switch_margin_se SEs; best: highest
    CV; or a name to force"""
    default: str = "learned"
    """the declared default final learner (README: chosen from measurements)"""
    switch_margin_se: float = Field(1.0, ge=0)
    """auto: SEs of the paired difference a challenger must lead by"""
    switch_se: Literal["rows", "folds", "max"] = "max"
    """auto: SE over rows, over folds, or the larger"""
    unverified_weight: float | None = Field(0.6, ge=0)
    """sample weight of non-verified rows in every level-2 fit (null: 1)"""
    weights: dict[str, float] | None = None
    """model -> weight for the fixed blends (null: equal)"""
    mfcc_feature: str | None = "mfcc"
    """feature whose per-clip statistics the stackers may read (null: none)"""
    learned: LearnedBlend = LearnedBlend()
    """the learned-weight geometric blend"""
    lightgbm: LightgbmStacker = LightgbmStacker()
    """the LightGBM stacker"""
    logreg: LogregStacker = LogregStacker()
    """the logistic-regression stacker"""


# ---------------------------------------------------------------- the whole config
class Config(Section):
    """A resolved run configuration."""
    preset: str | None = None
    """the preset it was loaded from (set by the loader)"""
    seed: int = Field(2018, ge=0)
    """folds, crops, augmentation and weight init"""
    audio: Audio = Audio()
    """preprocessing shared by every feature"""
    feature_extraction: FeatureExtraction = FeatureExtraction()
    """parallel feature extraction"""
    features: dict[str, Feature] = Field(default_factory=_default_features)
    """name -> settings; the cache folder is named by a hash of these"""
    folds: Folds = Folds()
    """the shared cross-validation folds"""
    training: Training = Training()
    """defaults for every model"""
    models: dict[str, ModelSpec] = Field(default_factory=lambda: {
        k: ModelSpec.model_validate(v) for k, v in _default_models().items()})
    """every model the run knows; run.models picks which train"""
    labels: Labels = Labels()
    """which labels the final models train on"""
    pseudo_label: PseudoLabel = PseudoLabel()
    """pseudo-label verification and label smoothing"""
    run: Run = Run()
    """what runs"""
    stacking: Stacking = Stacking()
    """level-2 learning"""

    @model_validator(mode="after")
    def _cross_checks(self):
        everything = {**self.models, **self.pseudo_label.models}
        for section, table in (("models", self.models), ("pseudo_label.models", self.pseudo_label.models)):
            for name, spec in table.items():
                where = f"{section}.{name}"
                spec.builder = spec.builder or name
                try:
                    spec.params = _resolve_params(name, spec.model_dump())
                except ValueError as exc:
                    raise ValueError(f"{where}.{exc}") from None
                for feat in ([spec.feature] if spec.feature else []) + list(spec.features or []):
                    if feat not in self.features:
                        raise ValueError(f"{where}: feature {feat!r} is not defined in features"
                                         f"{closest(feat, self.features)}")
                merged = Training.model_validate(merge_dicts(self.training.model_dump(), spec.train))
                if merged.loss == "triplet":
                    import models
                    if spec.builder in HANDCRAFTED_PARAMS or not models.embedding_capable(spec.builder):
                        raise ValueError(f"{where}.train.loss: the triplet loss needs an embedding output, which "
                                         f"{spec.builder} has none of (builders with one: "
                                         f"{', '.join(n for n in models.BUILDERS if models.embedding_capable(n))})")
                self._check_hierarchy(where, name, spec, everything)
                if spec.embeddings_from and spec.embeddings_from not in everything:
                    raise ValueError(f"{where}.embeddings_from: {spec.embeddings_from!r} is not a model"
                                     f"{closest(spec.embeddings_from, everything)}")
        for name in self.run.models:
            if name not in self.models:
                raise ValueError(f"run.models: {name!r} is not defined in models{closest(name, self.models)}")
        for i, name in enumerate(self.run.models):
            spec = self.models[name]
            needs = list(spec.hierarchy.sources) if spec.hierarchy else []
            needs += [spec.embeddings_from] if spec.embeddings_from else []
            for src in needs:
                if src not in self.run.models[:i]:
                    raise ValueError(f"run.models: {name!r} reads the embeddings of {src!r}, which must be trained "
                                     f"before it: list {src!r} earlier in run.models")
        for name in self.pseudo_label.verifiers if self.pseudo_label.enabled else []:
            if name not in everything:
                raise ValueError(f"pseudo_label.verifiers: {name!r} is not defined in models or "
                                 f"pseudo_label.models{closest(name, everything)}")
        mf = self.stacking.mfcc_feature
        if mf and mf not in self.features:
            raise ValueError(f"stacking.mfcc_feature: {mf!r} is not defined in features{closest(mf, self.features)}")
        return self


    @staticmethod
    def _check_hierarchy(where: str, name: str, spec: ModelSpec, everything: dict) -> None:
        """builder hierarchical: a hierarchy section (defaults filled in), sources that are networks on a feature."""
        if spec.builder != "hierarchical":
            if spec.hierarchy is not None:
                raise ValueError(f"{where}.hierarchy: only a model with builder hierarchical has one")
            return
        if spec.hierarchy is None:
            spec.hierarchy = Hierarchy()
        if spec.feature or spec.features or spec.embeddings_from:
            raise ValueError(f"{where}: a hierarchical model reads its hierarchy.sources' embeddings; remove "
                             f"feature / features / embeddings_from")
        for src in spec.hierarchy.sources:
            other = everything.get(src)
            if other is None:
                raise ValueError(f"{where}.hierarchy.sources: {src!r} is not a model{closest(src, everything)}")
            builder = other.builder or src
            if not other.feature or other.embeddings_from or builder in HANDCRAFTED_PARAMS or src == name:
                raise ValueError(f"{where}.hierarchy.sources: {src!r} is not a network on a cached feature, so it "
                                 f"has no extractor to embed clips with")


def merge_dicts(base: dict, override: dict) -> dict:
    """``override`` over ``base``, recursively for mappings (pipeline.config.deep_merge is this)."""
    out = dict(base)
    for key, value in (override or {}).items():
        out[key] = (merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


def closest(name: str, known) -> str:
    """' (did you mean a, b?)' or ' (known: ...)' for an error message."""
    import difflib
    known = [str(k) for k in known]
    near = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(near)}?)" if near else f" (known: {', '.join(sorted(known))})"


_TYPE_TAGS = ("float", "int", "str", "bool", "none", "list", "dict", "literal[", "function-")


def _model_of(node):
    """The pydantic model class inside an annotation (X, X | None, Annotated[...]), if any."""
    if isinstance(node, type) and issubclass(node, BaseModel):
        return node
    for arg in getattr(node, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def clean_location(loc: tuple) -> tuple[list[str], list[str] | None]:
    """(the user's dotted key parts, the valid keys of the innermost section) for an error location:
    pydantic adds union-member tags (``float``, ``logmel``) that are not keys the user wrote."""
    node: Any = Config
    keys: list[str] = []
    known: list[str] | None = list(Config.model_fields)
    for part in loc:
        if isinstance(part, int):
            keys[-1:] = [f"{keys[-1]}[{part}]"] if keys else [f"[{part}]"]
            node = None
            continue
        model = _model_of(node)
        if getattr(node, "__origin__", None) is dict:
            keys.append(str(part))
            node = node.__args__[1]
            known = None
            continue
        if model is None:
            if str(part).lower().startswith(_TYPE_TAGS):
                continue
            keys.append(str(part))
            continue
        if model is not Config and node is not model and part in FEATURE_KINDS and \
                _model_of(node) in FEATURE_KINDS.values():
            node = FEATURE_KINDS[part]
            continue
        known = list(model.model_fields)
        if part not in model.model_fields:
            if str(part).lower().startswith(_TYPE_TAGS):
                continue
            keys.append(str(part))
            node = None
            continue
        keys.append(str(part))
        node = Training if part == "train" else model.model_fields[part].annotation
    return keys, known


_REL_KEY = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.*)$", re.S)


def describe_error(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line for the first problem: ``dotted.key: what is wrong (did you mean ...)``."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    if model is not None and model is not Config:  # a sub-section validated on its own (a train section)
        keys = [str(p) for p in loc if not str(p).lower().startswith(_TYPE_TAGS)]
        known = list(model.model_fields)
    else:
        keys, known = clean_location(loc)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        text = "unknown setting" + (closest(keys[-1], known) if known and keys else "")
    elif err["type"] == "value_error":
        text = msg.removeprefix("Value error, ")
        m = _REL_KEY.match(text)
        if m:  # a validator that names the key relative to where it ran
            keys, text = keys + [m.group(1)], m.group(2)
    else:
        value = err.get("input")
        text = msg[0].lower() + msg[1:]
        if err["type"] == "missing":
            text = "required setting missing"
        elif not isinstance(value, dict):
            return f"{'.'.join(keys)} = {value!r}: {text}"
    key = ".".join(keys)
    return f"{key}: {text}" if key else text


def _doc(model: type[BaseModel], key: str) -> str:
    field = model.model_fields.get(key)
    return " ".join((field.description or "").split()) if field else ""


def _flow(value) -> str:
    import yaml
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("...").strip()


def describe_config(cfg: dict) -> str:
    """The resolved config as YAML with each setting's doc as a comment (``python -m pipeline.config``)."""
    lines: list[str] = []

    def section(model: type[BaseModel], values: dict, indent: int) -> None:
        pad = "  " * indent
        for key, value in values.items():
            doc = _doc(model, key)
            comment = f"  # {doc}" if doc else ""
            sub = _model_of(model.model_fields[key].annotation) if key in model.model_fields else None
            origin = getattr(model.model_fields[key].annotation, "__origin__", None) if key in model.model_fields \
                else None
            if isinstance(value, dict) and sub is not None and origin is not dict and value:
                lines.append(f"{pad}{key}:{comment}")
                section(sub, value, indent + 1)
            elif isinstance(value, dict) and origin is dict and value and key != "params" and key != "train" \
                    and key != "weights":
                lines.append(f"{pad}{key}:{comment}")
                for name, entry in value.items():
                    entry_model = FEATURE_KINDS.get(entry.get("kind")) if key == "features" else ModelSpec
                    lines.append(f"{pad}  {name}:")
                    section(entry_model, entry, indent + 2)
            else:
                lines.append(f"{pad}{key}: {_flow(value)}{comment}")

    section(Config, cfg, 0)
    return "\n".join(lines)
