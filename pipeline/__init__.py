"""Audio I/O, features, folds, metrics, the shared fold trainer and stage scripts."""
