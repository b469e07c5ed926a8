"""One build of the demo dataset, and the cache around it: marker, lock, atomic swap into place."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from data.common import swap_into_place
from data.demo.classes import CLASSES, LABELS
from data.demo.cut import finish, slot_segments
from data.demo.hard_cases import write_clip
from data.demo.layout import CSV_NAMES, readme_text, write_tables, wrong_label_count
from data.demo.midi import write_midi
from data.demo.plan import make_plan
from data.demo.render import SAMPLE_RATE, find_fluidsynth, find_soundfont, fluidsynth_version, render

LOG = logging.getLogger("data.build_demo")  # named after the command, as the log lines always were

# Bump when the output for a given set of parameters changes, so old caches are rebuilt.
BUILDER_VERSION = 1
MARKER_NAME = ".complete"
# Names the builder writes; anything else in an existing --out dir means "not ours, do not replace".
OUTPUT_ENTRIES = frozenset({*CSV_NAMES, "audio_train", "audio_test", "README.md", MARKER_NAME})


def build_params(seed: int = 2018, clips_per_class: int = 20, test_clips_per_class: int = 6) -> dict:
    """The parameters that define a build; a cache is reused only when they match exactly."""
    return {
        "builder_version": BUILDER_VERSION,
        "seed": int(seed),
        "clips_per_class": int(clips_per_class),
        "test_clips_per_class": int(test_clips_per_class),
        "sample_rate": SAMPLE_RATE,
        "classes": list(LABELS),
    }


def is_complete(out_dir: str | os.PathLike, params: dict) -> bool:
    """True only for a finished build with these parameters (the marker is written last)."""
    try:
        marker = json.loads((Path(out_dir) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("params") == params


def _build_into(directory: Path, params: dict, soundfont: Path, fluidsynth: str) -> dict:
    """Write the whole dataset into `directory` (a fresh temporary dir). Returns build statistics."""
    started = time.perf_counter()
    plan = make_plan(params["seed"], params["clips_per_class"], params["test_clips_per_class"])
    scratch = directory / "render"
    scratch.mkdir()
    midi_path, wav_path = scratch / "all_clips.mid", scratch / "all_clips.wav"
    write_midi(plan.clips, midi_path)
    audio_seconds = plan.clips[-1].slot_start_s + plan.clips[-1].slot_length_s
    LOG.info(
        "rendering %d clips (%.0f s of audio) with %s in one fluidsynth call", len(plan.clips), audio_seconds, soundfont
    )
    render_started = time.perf_counter()
    render(fluidsynth, soundfont, midi_path, wav_path)
    render_seconds = time.perf_counter() - render_started

    (directory / "audio_train").mkdir()
    (directory / "audio_test").mkdir()
    durations: dict[str, float] = {}
    for clip, segment in slot_segments(wav_path, plan.clips):
        audio = finish(segment, clip)
        durations[clip.fname] = len(audio) / SAMPLE_RATE
        write_clip(directory / f"audio_{clip.split}" / clip.fname, audio, clip.hard_case, plan.rng)
    shutil.rmtree(scratch)

    write_tables(directory, plan)
    version = fluidsynth_version(fluidsynth)
    train_durations = [durations[clip.fname] for clip in plan.train]
    (directory / "README.md").write_text(readme_text(params, plan, train_durations, version))

    for spec in CLASSES:
        LOG.info(
            "  %-20s train %2d  test %2d", spec.label,
            sum(clip.label == spec.label for clip in plan.train), sum(clip.label == spec.label for clip in plan.test),
        )  # fmt: skip
    return {
        "train_clips": len(plan.train),
        "test_clips": len(plan.test),
        "classes": len(CLASSES),
        "unverified": int((plan.verified_flags == 0).sum()),
        "wrong_labels": wrong_label_count(plan),
        "audio_seconds": round(sum(durations.values()), 1),
        "render_seconds": round(render_seconds, 2),
        "build_seconds": round(time.perf_counter() - started, 2),
        "fluidsynth": version,
        "soundfont": str(soundfont),
    }


def _remove_leftovers(out_dir: Path) -> None:
    """Delete temporary siblings of crashed builds; safe because the caller holds the build lock."""
    for pattern in (f".{out_dir.name}.building-*", f".{out_dir.name}.old-*"):
        for leftover in out_dir.parent.glob(pattern):
            LOG.info("removing leftover of an interrupted build: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory holding files this builder never writes (e.g. --out .)."""
    if out_dir.is_dir():
        foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in OUTPUT_ENTRIES)
        if foreign:
            raise RuntimeError(
                f"Refusing to replace {out_dir}: it holds files the demo builder did not write "
                f"({', '.join(foreign[:5])}). Choose another --out directory."
            )
    elif out_dir.exists():
        raise RuntimeError(f"Refusing to replace {out_dir}: it is not a directory")


def build_demo_dataset(
    out_dir: str | os.PathLike,
    seed: int = 2018,
    force: bool = False,
    *,
    soundfont: str | os.PathLike | None = None,
    clips_per_class: int = 20,
    test_clips_per_class: int = 6,
) -> Path:
    """Build the demo dataset into `out_dir` unless a complete build with the same parameters is there.

    The build goes to a temporary sibling directory that is renamed into place only when
    complete, so an interrupted build never looks finished. A lock file next to `out_dir`
    serialises concurrent builders. The soundfont is not part of the cache key: pass
    force=True after changing it.
    """
    if clips_per_class < 1 or test_clips_per_class < 1:
        raise ValueError("clips_per_class and test_clips_per_class must be at least 1")
    out_dir = Path(out_dir).absolute()
    params = build_params(seed, clips_per_class, test_clips_per_class)
    if not force and is_complete(out_dir, params):
        LOG.info("demo dataset already built in %s (seed %d)", out_dir, seed)
        return out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_complete(out_dir, params):  # another process finished it meanwhile
            return out_dir
        _check_replaceable(out_dir)
        _remove_leftovers(out_dir)
        fluidsynth = find_fluidsynth()
        soundfont_path = find_soundfont(soundfont)
        building = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
        try:
            stats = _build_into(building, params, soundfont_path, fluidsynth)
            (building / MARKER_NAME).write_text(json.dumps({"params": params, "stats": stats}, indent=2) + "\n")
            swap_into_place(building, out_dir)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    LOG.info(
        "built %d train + %d test clips (%d classes, %d unverified, %d wrong labels, %.0f s audio) "
        "in %.1f s (render %.1f s) into %s",
        stats["train_clips"], stats["test_clips"], stats["classes"], stats["unverified"],
        stats["wrong_labels"], stats["audio_seconds"], stats["build_seconds"], stats["render_seconds"], out_dir,
    )  # fmt: skip
    return out_dir
