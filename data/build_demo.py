"""Build the demo dataset: FSDKaggle2018 layout, clips rendered from the FluidR3 GM soundfont.

Usage: python -m data.build_demo --out DIR [--seed N] [--force] [--soundfont PATH]
       [--clips-per-class N] [--test-clips-per-class N]

Prints the dataset's path on stdout (run_all.sh reads it). The builder itself is
the package `data.demo` (its docstring explains the design); this is only the command.
"""

from __future__ import annotations

import argparse
import logging
import sys

from data.demo.build import LOG, build_demo_dataset
from data.demo.render import SOUNDFONT_CANDIDATES

__all__ = ["build_demo_dataset", "main"]


def main(argv: list[str] | None = None) -> int:
    """CLI: build (or reuse) the demo dataset and print its path on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m data.build_demo",
        description="Render a small FSDKaggle2018-style dataset from the FluidR3 GM soundfont.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=2018, help="random seed (default 2018)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    parser.add_argument("--soundfont", help=f"soundfont path (default: first of {SOUNDFONT_CANDIDATES[0]} and similar)")
    parser.add_argument("--clips-per-class", type=int, default=20, help="train clips per class (default 20)")
    parser.add_argument("--test-clips-per-class", type=int, default=6, help="test clips per class (default 6)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = build_demo_dataset(
            args.out,
            seed=args.seed,
            force=args.force,
            soundfont=args.soundfont,
            clips_per_class=args.clips_per_class,
            test_clips_per_class=args.test_clips_per_class,
        )
    except (RuntimeError, ValueError) as error:
        LOG.error("%s", error)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
