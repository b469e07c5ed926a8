"""The FSDKaggle2018 layout around the audio: the four CSVs and the README describing the build."""

from __future__ import annotations

import csv
from pathlib import Path

from data.demo.classes import CLASSES, LABELS
from data.demo.cut import SILENCE_DB
from data.demo.hard_cases import SHORT_CLIP_S
from data.demo.plan import MAX_DURATION_S, MIN_DURATION_S, Plan
from data.demo.render import SAMPLE_RATE

HARD_CASE_TEXT = {
    "short": f"train clip cut to {SHORT_CLIP_S} s (below the {MIN_DURATION_S} s minimum)",
    "stereo": "train clip stored with 2 channels",
    "rate_44100": "train clip resampled to 44100 Hz",
    "pcm_24": "train clip stored as 24-bit PCM",
    "corrupt": "test file of garbage bytes that no audio reader can open (still listed in both test CSVs)",
    "float": "test clip stored as 32-bit float",
    "rate_16000": "test clip resampled to 16000 Hz",
}
CSV_NAMES = ("train.csv", "train_clean_labels.csv", "test_labels.csv", "sample_submission.csv")


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_tables(directory: Path, plan: Plan) -> None:
    """train.csv (noisy labels), train_clean_labels.csv, test_labels.csv and sample_submission.csv, by fname."""
    train, noisy_labels, verified_flags = plan.train, plan.noisy_labels, plan.verified_flags
    train_order = sorted(range(len(train)), key=lambda index: train[index].fname)
    write_csv(
        directory / "train.csv",
        ("fname", "label", "manually_verified"),
        [(train[i].fname, noisy_labels[i], int(verified_flags[i])) for i in train_order],
    )
    write_csv(directory / "train_clean_labels.csv", ("fname", "label"), [(train[i].fname, train[i].label) for i in train_order])
    test_sorted = sorted(plan.test, key=lambda clip: clip.fname)
    write_csv(directory / "test_labels.csv", ("fname", "label"), [(clip.fname, clip.label) for clip in test_sorted])
    placeholder = " ".join(sorted(LABELS)[:3])
    write_csv(directory / "sample_submission.csv", ("fname", "label"), [(clip.fname, placeholder) for clip in test_sorted])


def wrong_label_count(plan: Plan) -> int:
    return sum(noisy != clip.label for noisy, clip in zip(plan.noisy_labels, plan.train))


def readme_text(params: dict, plan: Plan, train_durations: list[float], version: str) -> str:
    """Human-readable description of what was built, written next to the data."""
    train, test, noisy_labels, verified_flags = plan.train, plan.test, plan.noisy_labels, plan.verified_flags
    unverified, wrong = int((verified_flags == 0).sum()), wrong_label_count(plan)
    lines = [
        "# Demo dataset (FSDKaggle2018 layout)",
        "",
        "Built by `python -m data.build_demo` from the FluidR3 General MIDI soundfont, rendered",
        f"with fluidsynth ({version}) at {SAMPLE_RATE} Hz, reverb and chorus off.",
        f"Seed {params['seed']}, builder version {params['builder_version']}.",
        "Rebuild: `python -m data.build_demo --out DIR --seed N --force`.",
        "",
        "Each clip is one event: a single note, a short melody, a chord (strings: double stops;",
        "monophonic winds: a long note with an expression swell), a drum hit or a drum pattern on one",
        "of 7 GM drum kits, applause, gunfire bursts or telephone rings. Pitch, velocity, duration,",
        "peak level (-20 to -1 dBFS) and light coloured noise (25-45 dB SNR) vary per clip.",
        f"Clips are trimmed where the level falls {SILENCE_DB:.0f} dB below the peak and kept within",
        f"{MIN_DURATION_S}-{MAX_DURATION_S} s (train durations {min(train_durations):.2f}-{max(train_durations):.2f} s"
        " including the planted short clip).",
        "",
        "## Files",
        "- `train.csv`: fname,label,manually_verified (labels of unverified rows may be wrong)",
        "- `train_clean_labels.csv`: fname,label with the true label of every train clip",
        "- `test_labels.csv`: fname,label (true test labels)",
        "- `sample_submission.csv`: fname,label with a placeholder label",
        "- `audio_train/`, `audio_test/`: the WAV files",
        "",
        "## Label noise",
        f"{unverified} of {len(train)} train rows have manually_verified=0; {wrong} of those carry a wrong label",
        "(drawn uniformly from the other classes). Verified rows are always correct.",
        "",
        "## Classes",
        "| label | GM source | train | test | unverified | wrong label |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for spec in CLASSES:
        rows = [index for index, clip in enumerate(train) if clip.label == spec.label]
        lines.append(
            f"| {spec.label} | {spec.source} | {len(rows)} | "
            f"{sum(clip.label == spec.label for clip in test)} | "
            f"{sum(verified_flags[index] == 0 for index in rows)} | "
            f"{sum(noisy_labels[index] != spec.label for index in rows)} |"
        )
    lines += [
        f"| total | | {len(train)} | {len(test)} | {unverified} | {wrong} |",
        "",
        "## Hard cases (planted on purpose)",
    ]
    for clip in train + test:
        if clip.hard_case:
            lines.append(f"- `{clip.split}` `{clip.fname}` ({clip.label}): {HARD_CASE_TEXT[clip.hard_case]}")
    lines += [
        "",
        "## Reproducibility",
        "All random choices (file names, events, splits, label noise, hard cases, gain and noise) come from",
        "a numpy generator seeded with the seed above, so the same seed gives identical CSVs. fluidsynth's",
        "offline render is deterministic for a given fluidsynth version and soundfont, so the audio files",
        "are byte-identical too on the same installation (checked by tests/test_demo_data.py); only the",
        "build timings in `.complete` differ.",
        "",
    ]
    return "\n".join(lines)
