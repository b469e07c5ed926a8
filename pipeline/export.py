"""Stage: export a finished run as a self-contained tagger folder.

``python -m pipeline.export --work W --out DIR``

Writes DIR with every fold model the final learner uses, the learner, each
feature's exact settings and statistics, the class list and prior, a format
version and the run's scores (:mod:`pipeline.export_tagger`);
``python -m pipeline.predict --work DIR ...`` and ``Tagger.load(DIR)`` then
tag audio without the work directory. An unfinished run is refused.
"""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline.cli import run_main
from pipeline.export_tagger import export_tagger


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description="Export a finished run as a tagger.")
    p.add_argument("--work", required=True, help="the finished work directory")
    p.add_argument("--out", required=True, help="the new tagger folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    done = export_tagger(args.work, args.out)
    print(f"{done['path']}\t{done['files']} files\t{done['bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
