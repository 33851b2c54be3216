"""Seeded synthetic Criteo-like CTR data in the Criteo Kaggle DAC TSV format.

Why: the real Criteo files are large and licence-bound, yet tests, demos and
benchmarks need data with the same shape (13 dense + 26 hashed categorical
fields, heavy tails, power-law ids, missing values) and a *known* ceiling, so
that a training run can be judged against the best achievable AUC.

Each line is ``label \\t I1..I13 \\t C1..C26`` with no header: dense values
are non-negative integers, categorical values are 8 lowercase hex chars, and
an empty field means missing.  Labels come from a hidden logistic model with
first-order id effects, low-rank pairwise interactions and dense effects;
missingness is applied after the logit, so it hides information.

Output depends only on the arguments: rows are drawn in fixed-size chunks
from ``default_rng([seed, split_id, chunk_idx])`` and the hidden model from
``default_rng([seed, 12345])``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctrkit.errors import ConfigError, CtrkitError
from ctrkit.ownership import OwnedFolder, atomic_path, atomic_write_text

__all__ = ["write_synthetic", "CRITEO_CARDINALITIES"]

N_DENSE = 13
N_CAT = 26
N_FIELDS = 1 + N_DENSE + N_CAT
CHUNK_ROWS = 100_000
PARAM_STREAM = 12345
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
CALIB_ROWS = 50_000

# Rough vocabulary sizes of C1..C26 in the Criteo Kaggle DAC training file.
CRITEO_CARDINALITIES = (
    1460, 583, 10_131_227, 2_202_608, 305, 24, 12517, 633, 3, 93145,
    5683, 8_351_593, 3194, 27, 14992, 5_461_306, 10, 5652, 2173, 4,
    7_046_547, 18, 15, 286_181, 105, 142_572,
)
# Missing rates of C1..C26.  C19, C20, C25, C26 go missing together (one draw),
# as they tend to in the real data.
CAT_MISSING = (
    0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.03,
    0.0, 0.03, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.0, 0.0,
    0.03, 0.40, 0.0, 0.03, 0.0, 0.0,
)
CAT_MISSING_GROUP = (18, 19, 24, 25)
CAT_MISSING_GROUP_RATE = 0.44
# Dense I1..I13: value = max(0, floor(exp(N(mu, sigma)) - 1)), and missing rate.
DENSE_MU_SIGMA = (
    (0.5, 1.2), (2.5, 1.9), (2.0, 1.3), (1.5, 1.0), (7.5, 2.0), (3.5, 1.8), (1.5, 1.5),
    (2.2, 1.0), (3.5, 1.3), (0.3, 0.6), (1.0, 1.0), (0.2, 1.0), (1.5, 1.0),
)
DENSE_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.001, 0.04, 0.45, 0.04, 0.75, 0.22)
DENSE_MAX = 999_999_999  # at most 9 digits per dense field
DENSE_DIGITS = 9

# Hidden label model (0-based feature indices).
FIRST_ORDER = (0, 1, 2, 5, 8, 10, 13, 16)          # C features with per-id effects
FIRST_ORDER_STD = 0.35
PAIRS = ((1, 5), (4, 13), (0, 8), (7, 19))          # C feature pairs, rank-4 dot products
PAIR_RANK = 4
PAIR_STD = 0.5
DENSE_EFFECT = (0, 1, 4, 6, 10)                     # I features, linear on z(log1p(x))
DENSE_EFFECT_STD = 0.3

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_NIBBLE_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)
_POW10 = 10 ** np.arange(DENSE_DIGITS - 1, -1, -1, dtype=np.int64)  # 1e8 .. 1


@dataclass
class _Model:
    """Everything the row generator needs; built once from the seed."""

    cards: list[int]
    cdfs: list[np.ndarray]          # per C feature: cumulative Zipf weights over ranks
    hash_keys: np.ndarray           # (26, 2) uint32 keys of the rank -> id bijection
    first_order: dict[int, np.ndarray]
    latent: dict[int, np.ndarray]   # per C feature in PAIRS: (card, PAIR_RANK)
    dense_w: np.ndarray             # weights of DENSE_EFFECT
    dense_mean: np.ndarray
    dense_std: np.ndarray
    intercept: float = 0.0


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _validate(rows, valid_rows, test_rows, seed, pos_rate, card_scale, max_card) -> None:
    _check_int("rows", rows, 1)
    _check_int("valid_rows", valid_rows, 0)
    _check_int("test_rows", test_rows, 0)
    _check_int("seed", seed, 0)
    _check_int("max_card", max_card, 2)
    if max_card > 2**32:
        raise ConfigError(f"max_card must be <= 2**32 (8 hex chars), got {max_card}")
    if not isinstance(pos_rate, (int, float)) or isinstance(pos_rate, bool) or not 0 < pos_rate < 1:
        raise ConfigError(f"pos_rate must be a number with 0 < pos_rate < 1, got {pos_rate!r}")
    if (not isinstance(card_scale, (int, float)) or isinstance(card_scale, bool)
            or not math.isfinite(card_scale) or card_scale <= 0):
        raise ConfigError(f"card_scale must be a finite number > 0, got {card_scale!r}")


def _cardinalities(card_scale: float, max_card: int) -> list[int]:
    """Criteo-like vocab sizes, scaled (at least 2) and capped, so tests can shrink them."""
    return [int(min(max(2, round(c * card_scale)), max_card)) for c in CRITEO_CARDINALITIES]


def _hash_ranks(ranks: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Bijective uint32 mix of Zipf ranks: distinct ranks give distinct ids, ids look random."""
    x = ranks.astype(np.uint32) ^ keys[0]
    x = x * np.uint32(0x9E3779B1)
    x ^= x >> np.uint32(16)
    x = x * np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    return x + keys[1]


def _draw_values(rng: np.random.Generator, model: _Model, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Complete (pre-missingness) rows: Zipf ranks (n, 26) and dense integers (n, 13)."""
    ranks = np.empty((n, N_CAT), dtype=np.int64)
    for f, cdf in enumerate(model.cdfs):
        ranks[:, f] = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    np.minimum(ranks, np.asarray(model.cards) - 1, out=ranks)  # guard float edge at u*total
    mu = np.array([m for m, _ in DENSE_MU_SIGMA])
    sigma = np.array([s for _, s in DENSE_MU_SIGMA])
    z = rng.standard_normal((n, N_DENSE))
    dense = np.floor(np.exp(np.minimum(mu + sigma * z, 21.0)) - 1.0)
    dense = np.clip(dense, 0, DENSE_MAX).astype(np.int64)
    return ranks, dense


def _raw_logit(model: _Model, ranks: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """Hidden-model logit without intercept: first-order + low-rank pairs + dense terms."""
    logit = np.zeros(len(ranks))
    for f, eff in model.first_order.items():
        logit += eff[ranks[:, f]]
    for a, b in PAIRS:
        logit += np.einsum("ij,ij->i", model.latent[a][ranks[:, a]], model.latent[b][ranks[:, b]])
    zd = (np.log1p(dense[:, list(DENSE_EFFECT)]) - model.dense_mean) / model.dense_std
    logit += zd @ model.dense_w
    return logit


def _build_model(seed: int, pos_rate: float, card_scale: float, max_card: int) -> _Model:
    """Draw the hidden model from default_rng([seed, 12345]) and calibrate its intercept."""
    rng = np.random.default_rng([seed, PARAM_STREAM])
    cards = _cardinalities(card_scale, max_card)
    exponents = rng.uniform(1.05, 1.2, N_CAT)
    cdfs = [np.cumsum(np.arange(1, c + 1, dtype=np.float64) ** -a) for c, a in zip(cards, exponents)]
    hash_keys = rng.integers(0, 2**32, size=(N_CAT, 2), dtype=np.uint64).astype(np.uint32)
    first_order = {f: rng.normal(0.0, FIRST_ORDER_STD, cards[f]) for f in FIRST_ORDER}
    latent: dict[int, np.ndarray] = {}
    for pair in PAIRS:
        for f in pair:
            if f not in latent:
                latent[f] = rng.normal(0.0, PAIR_STD, (cards[f], PAIR_RANK)).astype(np.float32)
    dense_w = rng.normal(0.0, DENSE_EFFECT_STD, len(DENSE_EFFECT))
    model = _Model(cards, cdfs, hash_keys, first_order, latent, dense_w,
                   np.zeros(len(DENSE_EFFECT)), np.ones(len(DENSE_EFFECT)))
    # A fixed calibration sample from the same stream: standardizes the dense
    # terms and sets the intercept so that mean(sigmoid(logit)) == pos_rate.
    ranks, dense = _draw_values(rng, model, CALIB_ROWS)
    ld = np.log1p(dense[:, list(DENSE_EFFECT)])
    model.dense_mean = ld.mean(axis=0)
    model.dense_std = np.maximum(ld.std(axis=0), 1e-6)
    logit = _raw_logit(model, ranks, dense)
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _sigmoid(logit + mid).mean() > pos_rate:
            hi = mid
        else:
            lo = mid
    model.intercept = 0.5 * (lo + hi)
    return model


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _draw_chunk(model: _Model, seed: int, split_id: int, chunk_idx: int, n: int):
    """One chunk: TSV bytes, labels and true probabilities (for the ceiling metrics)."""
    rng = np.random.default_rng([seed, split_id, chunk_idx])
    ranks, dense = _draw_values(rng, model, n)
    prob = _sigmoid(_raw_logit(model, ranks, dense) + model.intercept)
    labels = (rng.random(n) < prob).astype(np.uint8)
    # Missingness comes after the logit: the label still depends on hidden values.
    dense_missing = rng.random((n, N_DENSE)) < np.asarray(DENSE_MISSING)
    cat_missing = rng.random((n, N_CAT)) < np.asarray(CAT_MISSING)
    cat_missing[:, list(CAT_MISSING_GROUP)] |= (rng.random(n) < CAT_MISSING_GROUP_RATE)[:, None]
    return _format_tsv(labels, dense, dense_missing, ranks, cat_missing, model.hash_keys), labels, prob


def _format_tsv(labels, dense, dense_missing, ranks, cat_missing, hash_keys) -> bytes:
    """Vectorized TSV: fill a zero byte matrix (n, width) field by field, then drop the zeros.

    Zero bytes act as padding (numbers are right-aligned in 9 slots, missing
    fields are all zeros), so ``buf[buf != 0]`` yields the lines in order.
    """
    n = len(labels)
    width = 1 + N_DENSE * DENSE_DIGITS + N_CAT * 8 + N_FIELDS  # fields + 39 tabs + newline
    buf = np.zeros((n, width), dtype=np.uint8)
    buf[:, 0] = labels + ord("0")
    pos = 1
    # Dense: digits of each value, zeroing the leading zeros (but keep "0" for 0).
    dense_bytes = np.empty(dense.shape + (DENSE_DIGITS,), dtype=np.uint8)  # (n, 13, 9)
    v = dense.astype(np.int32)  # < 1e9; scalar divisors on int32 are fast
    for k in range(DENSE_DIGITS - 1, -1, -1):
        dense_bytes[:, :, k] = v % 10 + ord("0")
        v //= 10
    keep = (dense[:, :, None] >= _POW10) | (_POW10 == 1)
    keep &= ~dense_missing[:, :, None]
    dense_bytes[~keep] = 0
    for j in range(N_DENSE):
        buf[:, pos] = ord("\t")
        buf[:, pos + 1:pos + 1 + DENSE_DIGITS] = dense_bytes[:, j]
        pos += 1 + DENSE_DIGITS
    for f in range(N_CAT):
        ids = _hash_ranks(ranks[:, f], hash_keys[f])
        hexed = _HEX[(ids[:, None] >> _NIBBLE_SHIFTS) & np.uint32(0xF)]  # (n, 8)
        hexed[cat_missing[:, f]] = 0
        buf[:, pos] = ord("\t")
        buf[:, pos + 1:pos + 9] = hexed
        pos += 9
    buf[:, pos] = ord("\n")
    return buf[buf != 0].tobytes()


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; sklearn when available, else the rank-sum (Mann-Whitney) formula with ties."""
    if labels.min() == labels.max():
        return float("nan")
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        order = np.argsort(scores, kind="mergesort")
        s = scores[order]
        ranks = np.empty(len(s))
        # average ranks over ties
        starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
        ends = np.r_[starts[1:], len(s)]
        avg = (starts + ends + 1) / 2.0
        ranks[order] = np.repeat(avg, ends - starts)
        n_pos = int(labels.sum())
        n_neg = len(labels) - n_pos
        return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(roc_auc_score(labels, scores))


def _logloss(labels: np.ndarray, prob: np.ndarray) -> float:
    p = np.clip(prob.astype(np.float64), 1e-15, 1 - 1e-15)
    return float(-np.mean(np.where(labels == 1, np.log(p), np.log1p(-p))))


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="rows", unit_scale=True)


def write_synthetic(out_dir: str | Path, rows: int, valid_rows: int = 0, test_rows: int = 0, seed: int = 0,
                    pos_rate: float = 0.25, card_scale: float = 1.0, max_card: int = 1_000_000,
                    overwrite: bool = False, progress: bool = True, files: int = 1,
                    workers: int = 1) -> dict:
    """Write train.tsv (+ valid.tsv / test.tsv when their counts are > 0) and meta.json.

    Why: gives every test and demo Criteo-shaped data whose best achievable
    AUC/logloss (``ceiling_auc`` / ``ceiling_logloss`` in the returned meta,
    from the true generating probabilities) is known.  Same arguments give the
    same bytes.  Raises ConfigError on bad arguments and CtrkitError, before
    writing anything, when a target file exists and ``overwrite`` is false.

    ``files`` > 1 splits the training rows into train-00000.tsv ... (day files, in order: their
    concatenation is the train.tsv of files=1); ``workers`` processes write files in parallel.
    """
    _validate(rows, valid_rows, test_rows, seed, pos_rate, card_scale, max_card)
    _check_int("files", files, 1)
    _check_int("workers", workers, 1)
    out = Path(out_dir)
    splits = {"train": int(rows), "valid": int(valid_rows), "test": int(test_rows)}
    todo = {name: n for name, n in splits.items() if n > 0}
    if files > -(-int(rows) // CHUNK_ROWS):
        raise ConfigError(f"files={files}: a file holds whole chunks of {CHUNK_ROWS:,} rows, so "
                          f"{rows:,} rows make at most {-(-int(rows) // CHUNK_ROWS)} file(s)")
    jobs = _jobs(out, todo, int(files))
    targets = [path for path, *_ in jobs] + [out / "meta.json"]
    _claim(out, targets, overwrite)

    model = _build_model(int(seed), float(pos_rate), float(card_scale), int(max_card))
    meta: dict = {
        "format": "criteo_tsv",
        "seed": int(seed),
        "rows": splits,
        "files": {name: [p.name for p, split, *_ in jobs if split == name] for name in todo},
        "cardinalities": model.cards,
        "target_pos_rate": float(pos_rate),
        "card_scale": float(card_scale),
        "max_card": int(max_card),
        "pos_rate": {},
        "ceiling_auc": {},
        "ceiling_logloss": {},
    }
    args = (int(seed), float(pos_rate), float(card_scale), int(max_card))
    results = _run_jobs(jobs, args, model, int(workers), progress)
    for name in todo:
        labels = np.concatenate([results[i][0] for i, j in enumerate(jobs) if j[1] == name])
        probs = np.concatenate([results[i][1] for i, j in enumerate(jobs) if j[1] == name])
        meta["pos_rate"][name] = float(labels.mean())
        meta["ceiling_auc"][name] = _auc(labels, probs)
        meta["ceiling_logloss"][name] = _logloss(labels, probs)
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def _jobs(out: Path, todo: dict, files: int) -> list:
    """(path, split, first row, rows) per file: the training split's chunks dealt to `files`
    files in order (a file holds whole chunks, so the rows do not depend on `files`)."""
    jobs = []
    for name, n in todo.items():
        k = files if name == "train" else 1
        chunks = -(-n // CHUNK_ROWS)
        bounds = [min(n, (i * chunks // k) * CHUNK_ROWS) for i in range(k)] + [n]
        for i in range(k):
            path = out / (f"{name}.tsv" if k == 1 else f"{name}-{i:05d}.tsv")
            jobs.append((path, name, bounds[i], bounds[i + 1] - bounds[i]))
    return jobs


def _run_jobs(jobs: list, args: tuple, model, workers: int, progress: bool) -> list:
    """Each job's (labels, probabilities), in job order; files written by `workers` processes."""
    if workers == 1 or len(jobs) == 1:
        return [_write_split(path, model, args[0], name, start, n, progress)
                for path, name, start, n in jobs]
    from concurrent.futures import ProcessPoolExecutor
    bar = _progress_bar(sum(j[3] for j in jobs), "synth", progress)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_write_file, j, args) for j in jobs]
        results = []
        for f, j in zip(futures, jobs):
            results.append(f.result())
            if bar is not None:
                bar.update(j[3])
    if bar is not None:
        bar.close()
    return results


def _write_file(job: tuple, args: tuple):
    """One file in a worker process (the hidden model is rebuilt: it is deterministic)."""
    path, name, start, n = job
    return _write_split(path, _build_model(*args), args[0], name, start, n, False)


def _claim(out: Path, targets: list, overwrite: bool) -> None:
    """Record `targets` as synth's in `out`; an existing file is replaced only with `overwrite`
    and only when synth wrote it."""
    folder = OwnedFolder(out, "synthetic data folder")
    for path in targets:
        if path.exists():
            if not overwrite:
                raise CtrkitError(f"{path} exists; pass overwrite=true to replace it")
            if not folder.owns(path.name):   # overwrite replaces only what synth wrote
                raise CtrkitError(f"{path} was not written by ctrkit synth; overwrite never "
                                  "replaces it: choose another synth.out_dir")
    try:
        folder.record(files=[p.name for p in targets])
    except (OSError, CtrkitError) as e:
        raise CtrkitError(f"cannot create {out}: {getattr(e, 'strerror', None) or e}") from None


def _write_split(path: Path, model, seed: int, name: str, start: int, n: int, progress: bool):
    """Rows start..start+n of split `name`, atomically into `path`; their (labels, true
    probabilities). `start` is a multiple of CHUNK_ROWS."""
    labels = np.empty(n, dtype=np.uint8)
    probs = np.empty(n, dtype=np.float32)
    bar = _progress_bar(n, path.name, progress)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:   # never a partial final file
            for pos in range(0, n, CHUNK_ROWS):
                m = min(CHUNK_ROWS, n - pos)
                chunk_idx = (start + pos) // CHUNK_ROWS
                data, y, p = _draw_chunk(model, seed, SPLIT_IDS[name], chunk_idx, m)
                fh.write(data)
                labels[pos:pos + m] = y
                probs[pos:pos + m] = p
                if bar is not None:
                    bar.update(m)
    finally:
        if bar is not None:
            bar.close()
    return labels, probs
