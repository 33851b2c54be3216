"""Moved to ctrkit/metrics.py (AUC and logloss sit below the layers that evaluate: sharding,
strategies, the trainer); this name stays for code that imports it from here."""
from ctrkit.metrics import auc_logloss, evaluate_split, predict  # noqa: F401
