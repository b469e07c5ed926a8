"""Write notebooks/exploration.ipynb and notebooks/results.ipynb.

The notebooks are generated from the cell sources below so that changes are
reviewed here, as plain Python, and the committed .ipynb files carry no
outputs. Run ``python notebooks/make_notebooks.py`` after editing a cell
(``--out DIR`` writes them elsewhere).

- exploration.ipynb reads the dataset folder named by ``AT_DATA`` (default:
  the demo dataset ``demo_data/`` at the repo root, built on first use).
- results.ipynb reads the work directory named by ``AT_WORK`` (default
  ``work/`` at the repo root) through the functions of ``pipeline/reporting/``.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Every notebook starts by finding the repo root (the notebook may be run from
# notebooks/ or from the root) and putting it on sys.path.
SETUP = '''\
%matplotlib inline
import os
import sys
from pathlib import Path

REPO = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pipeline" / "report.py").is_file()), Path.cwd())
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

pd.set_option("display.float_format", "{:.4f}".format)
pd.set_option("display.max_rows", 100)'''

EXPLORATION = [
    new_markdown_cell(
        "# Dataset exploration\n\n"
        "Class balance, verified share, clip durations and example log-mel spectrograms of an "
        "FSDKaggle2018-layout dataset folder. Set `AT_DATA` to the folder; by default the demo "
        "dataset `demo_data/` at the repo root is used (built on first use, as the stages do)."),
    new_code_cell(SETUP + '''

import soundfile as sf

from pipeline.audio import AudioError, preprocess, read_audio
from pipeline.cli import resolve_data_dir
from pipeline.config import load_config
from pipeline.dataset import load_dataset
from pipeline.spectral import log_mel

DATA = resolve_data_dir(os.environ.get("AT_DATA") or None)
ds = load_dataset(DATA, check_files=False)
train = ds.train
print(f"dataset: {DATA}")
print(f"{len(train)} train clips, {len(ds.test_fnames)} test clips, {len(ds.classes)} classes; "
      f"test labels: {'yes' if ds.test_labels is not None else 'no'}")'''),
    new_markdown_cell("## Class balance and verified share"),
    new_code_cell('''\
counts = (train.groupby(["label", "manually_verified"]).size().unstack(fill_value=0)
          .reindex(columns=[1, 0], fill_value=0).rename(columns={1: "verified", 0: "not verified"}))
counts["total"] = counts.sum(axis=1)
counts["verified share"] = counts["verified"] / counts["total"]
counts = counts.sort_values("total")
print(f"verified: {int(train['manually_verified'].sum())} of {len(train)} train clips "
      f"({100 * train['manually_verified'].mean():.1f}%)")

fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(counts) + 1)))
ax.barh(counts.index, counts["verified"], color="tab:blue", label="verified")
ax.barh(counts.index, counts["not verified"], left=counts["verified"], color="tab:gray", label="not verified")
ax.set_xlabel("train clips")
ax.set_title("Clips per class")
ax.tick_params(axis="y", labelsize=8)
ax.legend()
plt.show()
counts.sort_values("total", ascending=False)'''),
    new_markdown_cell("## Clip durations\n\nRead from the file headers; files that cannot be read are listed."),
    new_code_cell('''\
def header_duration(path):
    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate if info.samplerate else 0.0
    except Exception:
        return float("nan")

durations = pd.DataFrame(
    [{"split": "train", "fname": f, "duration_s": header_duration(ds.audio_path("train", f))} for f in train["fname"]]
    + [{"split": "test", "fname": f, "duration_s": header_duration(ds.audio_path("test", f))} for f in ds.test_fnames])
display(durations.groupby("split")["duration_s"].agg(["count", "sum", "median", "min", "max"]))
unreadable = durations[durations["duration_s"].isna()]
print(f"{len(unreadable)} file(s) whose header cannot be read:", ", ".join(unreadable["fname"]) or "none")

fig, ax = plt.subplots(figsize=(7, 3.5))
for split, d in durations.dropna().groupby("split"):
    ax.hist(d["duration_s"], bins=30, alpha=0.6, label=f"{split} ({len(d)})")
ax.set_xlabel("duration (s)")
ax.set_ylabel("clips")
ax.set_title("Clip durations")
ax.legend()
plt.show()'''),
    new_markdown_cell(
        "## Log-mel spectrograms, one clip per class\n\n"
        "The pipeline's own preprocessing (`pipeline.audio.read_audio` -> `preprocess`: mono, resample, "
        "trim, peak-normalise) and `pipeline.spectral.log_mel` with the quick preset's `logmel` settings; "
        "the first verified clip of each class that decodes (unverified when a class has none)."),
    new_code_cell('''\
spec = load_config("quick")["features"]["logmel"]
mel_args = {k: spec[k] for k in ("n_fft", "hop_length", "n_mels", "fmin", "fmax")}
SR, MAX_SECONDS = spec["sr"], 5.0

examples = {}
for label, rows in train.sort_values("manually_verified", ascending=False, kind="stable").groupby("label"):
    for fname in rows["fname"]:
        try:
            y, sr = read_audio(ds.audio_path("train", fname))
            y = preprocess(y, sr, SR)[: int(MAX_SECONDS * SR)]
        except AudioError as exc:
            print(f"skipped {fname}: {exc.reason} {exc.detail}")
            continue
        examples[label] = (fname, log_mel(y, SR, **mel_args))
        break

n_cols = max(1, min(4, len(examples)))
n_rows = max(1, -(-len(examples) // n_cols))
fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.4 * n_rows), squeeze=False)
for ax in axes.flat:
    ax.axis("off")
for ax, (label, (fname, mel)) in zip(axes.flat, sorted(examples.items())):
    ax.axis("on")
    ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma",
              extent=[0, len(mel) * mel_args["hop_length"] / SR, 0, mel.shape[1]])
    ax.set_title(f"{label}\\n{fname}", fontsize=8)
    ax.set_xlabel("s", fontsize=7)
    ax.set_ylabel("mel band", fontsize=7)
    ax.tick_params(labelsize=6)
fig.tight_layout()
plt.show()
print(f"{len(examples)} of {len(ds.classes)} classes shown")'''),
]

RESULTS = [
    new_markdown_cell(
        "# Results of a run\n\n"
        "Scores, per-class MAP@3, the confusion matrix and the clips the final learner gets most wrong, "
        "read from the work directory named by `AT_WORK` (default `work/` at the repo root) with the "
        "functions of `pipeline/reporting/` (the same numbers as `report.md`)."),
    new_code_cell(SETUP + '''

from pipeline import reporting as report

WORK = Path(os.environ.get("AT_WORK") or REPO / "work")
if not WORK.is_dir():
    raise FileNotFoundError(f"{WORK} is not a work directory: set AT_WORK or run ./run_all.sh first")
scores = report.collect_scores(WORK)
final = report.final_oof(WORK)
print(f"work directory: {WORK}")'''),
    new_markdown_cell("## Scores"),
    new_code_cell('''\
if len(scores.models):
    display(Markdown("**Single models** (OOF MAP@3 over folds.csv, all / verified rows)"))
    display(report.models_score_table(scores))
else:
    print("no model has been trained yet")
if scores.stacking is not None:
    display(Markdown(f"**Stacking** (cross-validated); chosen final learner: **{scores.final}**"))
    display(report.stacking_score_table(scores))
else:
    print("stacking was not run")'''),
    new_markdown_cell("## Per-class MAP@3 of the final OOF predictions"),
    new_code_cell('''\
if final is None:
    print("no OOF predictions in this work directory")
else:
    print(f"final: {final.name} ({final.kind}, {final.source}); OOF MAP@3 {final.map3:.4f} on {len(final.y)} clips, "
          f"{final.map3_verified:.4f} on {int(final.verified.sum())} verified")
    per_class = report.per_class_table(final)
    display(report.plot_per_class(per_class, title=f"{final.name}: per-class OOF MAP@3"))
    display(per_class)'''),
    new_markdown_cell("## Confusion matrix (top-1 vs given label)"),
    new_code_cell('''\
if final is not None:
    print(f"{int((~final.verified).sum())} of the {len(final.y)} clips are not manually verified "
          "(their given label may be wrong)")
    display(report.plot_confusion(final))'''),
    new_markdown_cell(
        "## Clips the final learner gets most wrong\n\n"
        "Lowest final OOF probability on the given label. Non-verified rows near the top are often "
        "label noise rather than model errors: listen to them."),
    new_code_cell('''\
if final is not None:
    display(report.most_wrong(final, 25))'''),
    new_markdown_cell("## Pseudo-labelling and time per stage"),
    new_code_cell('''\
pseudo = report.pseudo_label_table(WORK)
if pseudo is None:
    print("pseudo-labelling was not run")
else:
    display(pseudo)
timings = report.timings_table(WORK)
if timings is None:
    print("no timings.json")
else:
    display(timings)'''),
]


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    return nb


NOTEBOOKS = {"exploration.ipynb": EXPLORATION, "results.ipynb": RESULTS}


def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(description="Write the notebooks from their cell sources.")
    p.add_argument("--out", default=str(HERE), help="folder to write them to (default: notebooks/)")
    out = Path(p.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nb = build(cells)
        nbformat.validate(nb)
        path = out / name
        text = nbformat.writes(nb)
        path.write_text(text if text.endswith("\n") else text + "\n")
        print(path)


if __name__ == "__main__":
    main()
