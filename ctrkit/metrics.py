"""AUC and logloss of a model over a split (the two numbers every CTR paper reports)."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from ctrkit.data.loader import BatchLoader
from ctrkit.errors import CtrkitError


@torch.no_grad()
def predict(model: nn.Module, loader: BatchLoader) -> tuple:
    """(labels, probabilities) as numpy arrays, in loader order."""
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    ys, ps = [], []
    try:
        for batch in loader:
            ps.append(torch.sigmoid(batch.to(device).logits(model)).double().cpu().numpy())
            ys.append(batch.labels.numpy())
    finally:
        model.train(was_training)
    return np.concatenate(ys), np.concatenate(ps)


def auc_logloss(y: np.ndarray, p: np.ndarray) -> dict:
    if not np.isfinite(p).all():
        raise CtrkitError(f"{int((~np.isfinite(p)).sum())} of {len(p)} predictions are not finite: "
                          "the model diverged; lower the learning rate")
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    logloss = float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)))
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    return {"auc": auc, "logloss": logloss, "rows": int(len(y))}


def evaluate_split(model: nn.Module, loader: BatchLoader) -> dict:
    y, p = predict(model, loader)
    return auc_logloss(y, p)
