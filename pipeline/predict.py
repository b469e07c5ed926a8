"""Stage: tag new audio with a finished run (or an exported tagger).

``python -m pipeline.predict --work W (FILES... | --audio-dir DIR) [--out PATH.csv|.json] [--top-k 3]
[--sample-submission CSV] [--model NAME]``

Every fold model of every level-1 model the final learner uses, and the
final learner itself, tag each file as the run's test clips were tagged
(:mod:`pipeline.tagger`). Without ``--out`` one line per file is printed
(its top classes); ``--out`` writes one row per file: fname, the top-k
labels (space-separated), its error (empty when usable), one probability
per class. ``--sample-submission`` writes a validated Kaggle submission in
that file's order instead. ``--model`` tags with one level-1 model alone.
Nothing is written into the work directory.
"""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline.cli import run_main
from pipeline.tagger import tag


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.predict", description="Tag audio files with a finished run.")
    p.add_argument("--work", required=True, help="a finished work directory, or an exported tagger (pipeline.export)")
    p.add_argument("files", nargs="*", metavar="FILES", help="audio files to tag")
    p.add_argument("--audio-dir", default=None, help="tag every file in this folder (by name)")
    p.add_argument("--out", default=None, help="write the table to PATH.csv or PATH.json (default: print a summary)")
    p.add_argument("--top-k", type=int, default=3, help="labels per file in the label column (default 3)")
    p.add_argument("--sample-submission", default=None, metavar="CSV",
                   help="write a Kaggle submission (--out PATH.csv) with this file's fnames, in its order")
    p.add_argument("--model", default=None, help="tag with this level-1 model alone instead of the final learner")
    p.add_argument("--batch-files", type=int, default=256, help="files decoded and predicted together (default 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # the extractors' predict (embedding_store.embed_arrays) retraces for each batch's size: expected, not news
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    tag(args.work, args.files, args.audio_dir, args.out, args.top_k, args.sample_submission, args.model,
        args.batch_files, progress=not args.no_progress)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
