"""Stage: per-fold embeddings of every clip patch from a trained model's fold
extractors, the input of ``mla`` (VGGish's) and ``hierarchical`` (its sources').

``python -m pipeline.embeddings --config quick --data DIR --work DIR [--source vggish]``

Which extractor embeds which clip, and how they are stored: :mod:`pipeline.embedding_store`.
The training stage computes missing embeddings itself; this stage does it ahead.
"""
from __future__ import annotations

from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.dataset import load_dataset
from pipeline.embedding_store import default_sources, embedding_store
from pipeline.executor import make_executor


def main(argv=None):
    def extra(p):
        p.add_argument("--source", action="append", default=None,
                       help="model whose fine-tuned extractors embed the clips (repeatable; default: every "
                            "embeddings_from and hierarchy.sources of run.models, else vggish)")
    args, cfg, work = start_stage("Embed every clip patch with the trained fold extractors.", "embeddings", argv,
                                  extra)
    dataset = load_dataset(args.data)
    with make_executor(cfg, work, "embeddings") as executor:  # run.executor ray: each fold a Ray job
        for source in args.source or default_sources(cfg):
            with timed_stage(work, f"embeddings:{source}"):
                embedding_store(cfg, work, source, dataset=dataset, executor=executor)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
