"""Typed configuration tree: YAML file + `key=value` overrides, validated with clear one-line errors."""
from __future__ import annotations

import difflib
import inspect
import os
import re
from collections.abc import Hashable
from pathlib import Path
from typing import (Annotated, Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, Union,
                    get_args, get_type_hints)

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, create_model,
                      field_validator, model_validator)

from ctrkit.errors import ConfigError
from ctrkit.registry import FORMATS, MODELS, STRATEGIES, compressor_parts


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Adam's (beta1, beta2): torch needs each in [0, 1).
Betas = Annotated[List[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]

# Every field carries a one-line `description`: docs/config.md is generated from them
# (`python -m ctrkit.config_doc > docs/config.md`; tests/test_config_doc.py checks it is current).


class FeatureSpec(_Strict):
    """One input column of a generic CSV/Parquet dataset."""

    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$", max_length=200,
                      description="Feature name; also a file name (vocab/<name>.arrow).")
    type: Literal["categorical", "numeric", "multi_categorical"] = Field(
        description="`categorical`: ids from a vocabulary; `numeric`: a float input (or "
                    "buckets, with transform criteo_bucket); `multi_categorical`: several values "
                    "in one field joined by `separator` (e.g. `a|b|c`), one bag of ids per row.")
    source: Optional[str] = Field(default=None, description="Raw column name (default: `name`).")
    fill: Optional[Union[str, float]] = Field(
        default=None, description="Value for missing entries (numeric default 0; categorical "
                                  "default: the missing id 1).")
    transform: Optional[Literal["none", "log", "criteo_bucket"]] = Field(
        default=None, description="Numeric only, as data.dense_transform (default: "
                                  "data.dense_transform).")
    min_count: Optional[int] = Field(default=None, ge=1, description="As data.min_count, for this "
                                                                     "feature (default: data.min_count).")
    vocab: Optional[Literal["count", "hash"]] = Field(default=None, description=(
        "As data.vocab, for this feature (default: data.vocab)."))
    separator: Optional[str] = Field(default=None, min_length=1, description=(
        "multi_categorical: what joins the values of a field (required there); empty values "
        "are dropped, an empty field is missing."))
    max_len: Optional[int] = Field(default=None, ge=1, description=(
        "multi_categorical: keep the first max_len values of a field (null: all)."))
    pooling: Optional[Literal["sum", "mean"]] = Field(default=None, description=(
        "multi_categorical: how a row's embeddings become one (default sum)."))

    @model_validator(mode="after")
    def _multi_keys_only_on_multi(self) -> "FeatureSpec":
        given = [k for k in ("separator", "max_len", "pooling") if getattr(self, k) is not None]
        if self.type != "multi_categorical" and given:
            raise ValueError(f"data.features.{self.name}.{given[0]}: only for type "
                             f"multi_categorical, not {self.type}")
        if self.type == "multi_categorical" and self.separator is None:
            raise ValueError(f"data.features.{self.name}: type multi_categorical needs a "
                             "separator")
        return self
    max_size: Optional[int] = Field(default=None, ge=1, description=(
        "As data.max_size, for this feature (default: data.max_size)."))
    hash_buckets: Optional[int] = Field(default=None, ge=1, le=2_000_000_000, description=(
        "As data.hash_buckets, for this feature (default: data.hash_buckets)."))


class DataConfig(_Strict):
    """Raw input files and how `prepare` turns them into vocabularies and encoded shards."""

    format: str = Field(
        default="criteo_tsv", json_schema_extra={"enum": FORMATS.names()},
        description="Raw format: Criteo (label, I1-I13, C1-C26) as TSV or CSV, Avazu CSV, or "
                    "generic csv/parquet described by `features` (a plug-in registers more: "
                    "ctrkit.registry.FORMATS).")
    train: Optional[str] = Field(default=None, description="Training split: a path or a glob "
                                 "(relative paths resolve against the config file's folder).")
    valid: Optional[str] = Field(default=None, description="Validation split (path or glob); "
                                 "without it nothing is evaluated during training.")
    test: Optional[str] = Field(default=None, description="Test split (path or glob), evaluated "
                                "with the best checkpoint at the end.")
    valid_fraction: Optional[float] = Field(default=None, gt=0, lt=1, description=(
        "The validation split is the last fraction of the training files' rows, in file order "
        "(before test_fraction's rows), as CTR logs are usually evaluated; vocabularies are "
        "fitted on the rows before it. Not with data.valid. Costs one more read of the files."))
    test_fraction: Optional[float] = Field(default=None, gt=0, lt=1, description=(
        "The test split is the last fraction of the training files' rows. Not with data.test."))
    header: Literal["auto", True, False] = Field(
        default="auto", description="Whether files start with a header line; `auto` guesses from "
                                    "the first line.")
    delimiter: Optional[str] = Field(default=None, min_length=1, max_length=1, description=(
        "Field separator of the CSV formats (default `,`); criteo_tsv is tab-separated."))
    features: Optional[List[FeatureSpec]] = Field(default=None, description=(
        "csv/parquet: the features to build (required there; names unique)."))
    label: str = Field(default="label", description="Label column of csv/parquet files (Criteo's "
                                                    "is `label`, Avazu's `click`).")
    min_count: int = Field(default=1, ge=1, description="Values seen fewer times in the training "
                           "split share the out-of-vocabulary id 0.")
    vocab: Literal["count", "hash"] = Field(default="count", description=(
        "How categorical values get ids. `count`: a vocabulary fitted on the training split "
        "(values seen min_count times, the max_size most frequent; the rest share id 0); `hash`: "
        "id 2 + FNV-1a-64(value) mod hash_buckets, no fitting pass and no vocabulary in memory "
        "(ctrkit/data/hashing.py)."))
    max_size: Optional[int] = Field(default=None, ge=1, description=(
        "vocab count: keep at most this many values per feature, the most frequent (null: all "
        "seen min_count times)."))
    hash_buckets: Optional[int] = Field(default=None, ge=1, le=2_000_000_000, description=(
        "vocab hash: ids per feature (its table has hash_buckets + 2 rows); required there."))
    dense_transform: Literal["none", "log", "criteo_bucket"] = Field(
        default="log", description="Numeric features: `log` sign(x)·log1p|x| as a dense input; "
                                   "`criteo_bucket` floor(ln(x)^2) buckets as a categorical "
                                   "feature; `none`.")
    prepared_dir: str = Field(default="data/prepared", description=(
        "Folder for vocabularies, shards and schema.json; reused while the data keys and input "
        "files are unchanged."))
    overwrite: bool = Field(default=False, description="Rebuild even an up-to-date prepared_dir "
                                                       "(removes only ctrkit's files).")
    skip_bad_rows: bool = Field(default=False, description="Count and skip malformed rows instead "
                                                           "of failing.")
    shard_rows: int = Field(default=1_000_000, ge=1, description="Rows per encoded shard "
                                                                 "(part-NNNNN folder).")
    read_block_mb: int = Field(default=16, ge=1, description="Block size of the CSV reader for "
                               "files read in blocks (speed only).")
    prepare_workers: int = Field(default=1, ge=1, description=(
        "Processes preparing a split of several files, one file at a time each: counts merged "
        "in file order, so the same vocabularies, ids and rows in the same order; each file gets "
        "shards of its own (part-f<file>-<k>). Under torchrun the ranks share the files (P "
        "processes each) and rank 0 merges."))
    read_whole_mb: int = Field(default=64, ge=0, description="Files up to this size are parsed "
                               "in one parallel read (speed only; larger files stream in blocks of "
                               "read_block_mb, so memory does not grow with them).")

    @field_validator("format")
    @classmethod
    def _registered_format(cls, v: str) -> str:
        return FORMATS.check(v, "format")

    @model_validator(mode="after")
    def _a_split_is_files_or_a_fraction(self) -> "DataConfig":
        for split in ("valid", "test"):
            if getattr(self, split) and getattr(self, f"{split}_fraction"):
                raise ValueError(f"data.{split} and data.{split}_fraction: give one of them")
        if (self.valid_fraction or 0) + (self.test_fraction or 0) >= 1:
            raise ValueError("data.valid_fraction + data.test_fraction must be < 1 (the rest "
                             "is the training split)")
        return self

    @model_validator(mode="after")
    def _hash_needs_buckets(self) -> "DataConfig":
        for where, f in [("data", self)] + [(f"data.features.{x.name}", x)
                                            for x in self.features or []]:
            vocab = f.vocab or self.vocab
            if vocab == "hash" and (f.hash_buckets or self.hash_buckets) is None:
                raise ValueError(f"{where}.vocab=hash needs data.hash_buckets (or the feature's "
                                 "hash_buckets): the number of ids")
            if vocab == "hash" and f.max_size is not None:
                raise ValueError(f"{where}.max_size is for vocab=count (hashed ids have "
                                 "hash_buckets)")
        return self

    @model_validator(mode="after")
    def _generic_needs_features(self) -> "DataConfig":
        if FORMATS.get(self.format).needs_features and not self.features:
            raise ValueError(f"data.features is required for format '{self.format}'")
        names = [f.name for f in self.features or []]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"data.features: feature name {twice[0]!r} is used twice")
        return self


class ModelConfig(BaseModel):
    """`name` picks a registered model; every other key of the section is passed to its
    constructor, and checked against the constructor's signature when the config loads."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(default="deepfm", description=(
        "A registered model (`lr`, `fm`, `deepfm`, or your own: docs/extending.md); every other "
        "key of the section goes to its constructor."))


class SparseOptConfig(_Strict):
    """The embedding tables' row-sparse optimizer: a step changes only the rows (and their
    state) that the batch touched."""

    name: Literal["adam", "amsgrad", "rowwise_adagrad", "adagrad", "sgd"] = Field(
        default="adam", description="Optimizer of the tables (lazy: only touched rows).")
    lr: float = Field(default=1e-3, gt=0, description="Learning rate of the tables.")
    weight_decay: float = Field(default=0.0, ge=0, description="L2 weight decay, applied to "
                                                               "touched rows only.")
    betas: Betas = Field(default=[0.9, 0.999], description="adam/amsgrad: (beta1, beta2).")
    eps: float = Field(default=1e-8, gt=0, description="Term added to the denominator "
                                                       "(adam, amsgrad, adagrad).")
    rowwise: bool = Field(default=False, description="adam/amsgrad: one second-moment scalar per "
                                                     "row.")
    lr_overrides: Dict[str, PositiveFloat] = Field(default={}, description=(
        "{module-path prefix: lr} for some tables, e.g. {linear: 1.0e-2}; the rest keep `lr`."))
    fused: bool = Field(default=False, description=(
        "fbgemm TBE with the update fused into backward (rowwise_adagrad, adagrad, sgd only; "
        "tables whose dimension is not a multiple of 4 stay row-sparse)."))

    @model_validator(mode="after")
    def _fused_needs_fbgemm_optimizer(self) -> "SparseOptConfig":
        if self.fused and self.name not in ("rowwise_adagrad", "adagrad", "sgd"):
            raise ValueError(f"fused=true needs rowwise_adagrad, adagrad or sgd: fbgemm's CPU "
                             f"kernels have no '{self.name}'")
        return self


class DenseOptConfig(_Strict):
    """The optimizer of every parameter that is not an embedding table (MLP, dense weights)."""

    name: Literal["adam", "adamw", "sgd", "adagrad"] = Field(
        default="adam", description="Optimizer of the dense parameters (torch's).")
    lr: float = Field(default=1e-3, gt=0, description="Learning rate of the dense parameters.")
    weight_decay: float = Field(default=0.0, ge=0, description="Weight decay (adamw: decoupled).")
    betas: Betas = Field(default=[0.9, 0.999], description="adam/adamw: (beta1, beta2).")
    eps: float = Field(default=1e-8, gt=0, description="Term added to the denominator (adam, "
                                                       "adamw, adagrad).")


class ScheduleConfig(_Strict):
    """Per-step learning-rate schedule for every optimizer (dense, tables, fused tables)."""
    name: Literal["constant", "cosine", "linear"] = Field(
        default="constant", description="After the warmup: constant, or a cosine/linear decay "
                                        "to final_ratio x lr at total_steps.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear ramp from lr / warmup_steps "
                                                           "to lr over this many steps.")
    total_steps: int = Field(default=0, ge=0, description=(
        "End of the decay, above warmup_steps; 0: epochs x steps per epoch (max_steps does not "
        "count)."))
    final_ratio: float = Field(default=0.1, ge=0, le=1, description="lr at total_steps / peak lr.")

    @model_validator(mode="after")
    def _warmup_ends_before_the_decay(self) -> "ScheduleConfig":
        if self.name != "constant" and 0 < self.total_steps <= self.warmup_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below "
                             f"total_steps ({self.total_steps}): nothing would be left to decay")
        return self


class OptimizerConfig(_Strict):
    """Optimizers and learning-rate schedule. dpsgd, damsgrad and choco (and base_optimizer
    amsgrad) step with their own rule: they take only dense.lr, sparse.lr and sparse.betas (for
    both parts) from here."""

    dense: DenseOptConfig = Field(default=DenseOptConfig(), description="The dense parameters' "
                                                                        "optimizer.")
    sparse: SparseOptConfig = Field(default=SparseOptConfig(), description="The embedding "
                                                                           "tables' optimizer.")
    schedule: ScheduleConfig = Field(default=ScheduleConfig(), description=(
        "Per-step schedule of every optimizer; composes with train.lr_plateau's cuts."))


class EarlyStopConfig(_Strict):
    """Which evaluation is best, and when to stop."""

    monitor: Literal["valid_auc", "valid_logloss"] = Field(
        default="valid_auc", description="Metric that picks the best checkpoint and drives early "
                                         "stopping and lr_plateau.")
    patience: int = Field(default=2, ge=1, description="Evaluations without improvement before "
                                                       "stopping.")
    enabled: bool = Field(default=True, description="Stop early (the best checkpoint is kept "
                                                    "either way).")


class PlateauConfig(_Strict):
    """Learning-rate cuts when the monitored metric stops improving (torch's ReduceLROnPlateau)."""

    factor: float = Field(default=0.1, gt=0, lt=1, description="Multiply the learning rates by "
                                                               "this at a plateau.")
    patience: int = Field(default=1, ge=0, description="Evaluations without improvement before "
                                                       "a cut.")
    min_lr: float = Field(default=1e-6, ge=0, description="Lower bound of the learning rates.")
    enabled: bool = Field(default=True, description="Cut learning rates at plateaus.")


class TrainConfig(_Strict):
    """The training loop: batches, evaluation, checkpoints, logging, device."""

    batch_size: int = Field(default=4096, ge=1, description="Training samples per step and rank.")
    eval_batch_size: int = Field(default=16384, ge=1, description="Samples per evaluation batch.")
    epochs: int = Field(default=1, ge=1, description="Passes over the training split.")
    eval_every: int = Field(default=0, ge=0, description=(
        "Evaluate every this many steps; 0 = once per epoch (each epoch's end is always "
        "evaluated)."))
    max_steps: int = Field(default=0, ge=0, description="0 = no limit; stops (and checkpoints) "
                                                        "after N steps.")
    checkpoint_every: int = Field(default=0, ge=0, description="Save `last` every N steps; 0 = at "
                                                               "each evaluation; always at the end.")
    early_stop: EarlyStopConfig = Field(default=EarlyStopConfig(), description=(
        "Best-checkpoint metric and early stopping."))
    lr_plateau: PlateauConfig = Field(default=PlateauConfig(), description=(
        "Learning-rate cuts at plateaus."))
    threads: int = Field(default=0, ge=0, description="torch intra-op threads; 0 = leave torch's "
                                                      "default.")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description=(
        "auto: the GPU when torch sees one (rank r of a node takes cuda:<local rank>), else the "
        "CPU; cpu; cuda; cuda:N (every rank on GPU N: only with gloo, e.g. several ranks on one "
        "GPU)."))
    seed: int = Field(default=0, ge=0, lt=2**32, description=(
        "Seed of torch, numpy and random, the same on every rank (numpy's global seed is 32 "
        "bits)."))
    shuffle: bool = Field(default=True, description="Shuffle the training split every epoch.")
    prefetch: int = Field(default=4, ge=0, description="Batches prepared ahead in a background "
                                                       "thread.")
    run_dir: str = Field(default="runs/default", description="Run folder: config, metrics, "
                                                             "curves, TensorBoard, checkpoints.")
    resume: bool = Field(default=False, description="Continue from run_dir's last checkpoint "
                                                    "(bit for bit).")
    init_from: Optional[str] = Field(default=None, description=(
        "Start from a saved model's weights (a `.pt` checkpoint, or the "
        "torch.distributed.checkpoint folder of a sharded run, which loads into any shard group "
        "size); optimizer state starts fresh."))
    overwrite: bool = Field(default=False, description="Start over in a run_dir (removes only "
                                                       "ctrkit's files).")
    log_every: int = Field(default=50, ge=1, description="Log the training loss every N steps "
                                                         "(metrics.csv, TensorBoard).")
    progress: bool = Field(default=True, description="Show progress bars.")
    tensorboard: bool = Field(default=True, description="Write TensorBoard scalars to run_dir/tb.")
    plot: bool = Field(default=True, description="Draw run_dir/curves.png.")
    ema_decay: float = Field(default=0.0, ge=0, lt=1, description=(
        "> 0: evaluate, keep as best and export an exponential moving average of the weights "
        "(decay per step; table rows averaged lazily: ctrkit/train/ema.py); "
        "0 = the last step's weights. Not with dpsgd/damsgrad/choco, shard groups or fused "
        "tables."))


class DistributedConfig(_Strict):
    """Several ranks: the algorithm, its graph, compression and shard groups
    (docs/decentralized.md, docs/compression.md, docs/sharding.md)."""

    workers: int = Field(default=1, ge=1, description=">1: `ctrkit train` launches this many "
                                                      "ranks (torchrun).")
    algorithm: str = Field(
        default="local", json_schema_extra={"enum": STRATEGIES.names()}, description=(
            "A registered strategy (ctrkit/registry.py). local: no communication; allreduce: "
            "averaged gradients; dpsgd: SGD + gossip; damsgrad: decentralized AMSGrad with a "
            "gossiped tracker; choco: damsgrad with compressed gossip."))
    topology: Literal["ring", "torus", "exponential", "complete", "edges"] = Field(
        default="ring", description="Gossip graph of the workers (`edges`: the `edges` list).")
    edges: Optional[List[List[int]]] = Field(default=None, description=(
        "topology edges: [[i, j], ...] pairs of workers (undirected; the graph must be "
        "connected)."))
    backend: Literal["auto", "gloo", "nccl"] = Field(default="auto", description=(
        "auto: NCCL for ranks with a GPU each, gloo for CPU ranks and ranks sharing one GPU."))
    timeout_s: float = Field(default=300.0, gt=0, description="A dead or hung peer ends the run "
                                                              "after this many seconds.")
    eps: float = Field(default=1e-16, gt=0, description=(
        "damsgrad/choco (and base_optimizer amsgrad): step m / sqrt(max(u, eps)); 1e-16 floors "
        "the denominator at 1e-8, as Adam's eps does."))
    rowwise_tracker: bool = Field(default=False, description=(
        "damsgrad/choco (and base_optimizer amsgrad): one second moment per embedding row."))
    bias_correction: bool = Field(default=False, description=(
        "damsgrad/choco: Adam's bias correction (step x sqrt(1 - b2^t) / (1 - b1^t), t the "
        "global step), as torch's Adam(amsgrad=True) has; DESIGN.md's equations have none."))
    base_optimizer: Literal["config", "amsgrad"] = Field(default="config", description=(
        "allreduce/local: step with optimizer.dense/sparse (`config`), or with damsgrad's AMSGrad "
        "step after the gradient average (`amsgrad`; eps, rowwise_tracker, bias_correction as "
        "damsgrad's)."))
    max_restarts: int = Field(default=0, ge=0, description="torchrun restarts (resume from the "
                                                           "last checkpoint).")
    lr_scaling: Literal["none", "sqrt", "linear", "auto"] = Field(default="none", description=(
        "Learning rates x n^0 / n^0.5 / n for n workers; auto: by algorithm and optimizer "
        "(ctrkit/strategies/lr_scaling.py)."))
    compressor: str = Field(default="topk:0.01+int8", description=(
        "choco: C(x - x_hat) of the tables (and their tracker), a spec such as topk:0.01+int8 "
        "(docs/compression.md)."))
    dense_compressor: Optional[str] = Field(default="sign", description=(
        "choco: the compressor of the dense vector and its tracker; null: the same as "
        "`compressor`."))
    gamma: float = Field(default=0.5, gt=0, le=1, description="choco: consensus step, "
                                                              "x += gamma (s - x_hat).")
    tracker: Literal["compressed", "exact"] = Field(default="compressed", description=(
        "choco: the tracker u goes through the compressed gossip, or exactly every "
        "tracker_every steps."))
    tracker_every: int = Field(default=1, ge=1, description="choco with tracker exact: gossip the "
                                                            "tracker every k steps.")
    gossip_tol: float = Field(default=0.1, ge=0, lt=1, description=(
        "Gossip of dpsgd/damsgrad/choco tables (and dpsgd/damsgrad dense blocks): a row travels "
        "while |x - x_hat| > gossip_tol x |x|; 0: every row that differs, every round."))
    shard_group_size: int = Field(default=1, ge=1, description=(
        "Ranks per shard group (divides workers; dpsgd/damsgrad/choco): they split the tables "
        "and act as one worker; 1: replicas; workers: model parallelism."))

    @field_validator("algorithm")
    @classmethod
    def _registered_algorithm(cls, v: str) -> str:
        return STRATEGIES.check(v, "algorithm")

    @field_validator("compressor", "dense_compressor")
    @classmethod
    def _known_compressor(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            compressor_parts(v)   # ValueError -> a one-line config error naming the key
        return v


class SynthConfig(_Strict):
    """`ctrkit synth`: Criteo-format TSV files from a hidden logistic model whose ceiling AUC is
    known (ctrkit/data/synth.py)."""

    out_dir: str = Field(default="data/synth", description="Folder of train/valid/test.tsv and "
                                                           "meta.json.")
    rows: int = Field(default=200_000, ge=1, description="Training rows.")
    valid_rows: int = Field(default=20_000, ge=0, description="Validation rows (0: no file).")
    test_rows: int = Field(default=20_000, ge=0, description="Test rows (0: no file).")
    seed: int = Field(default=0, ge=0, description="Seed; the same arguments give the same bytes.")
    pos_rate: float = Field(default=0.25, gt=0, lt=1, description="Mean click probability of the "
                                                                  "hidden model.")
    card_scale: float = Field(default=1.0, gt=0, description="Factor on Criteo's vocabulary "
                                                             "sizes of C1-C26.")
    max_card: int = Field(default=1_000_000, ge=2, le=2**32, description=(
        "Largest vocabulary of a feature (ids are 8 hex characters)."))
    overwrite: bool = Field(default=False, description="Replace files synth wrote before.")
    files: int = Field(default=1, ge=1, description=(
        "Training rows split into this many files, train-00000.tsv ... in order (day files; "
        "their concatenation is files=1's train.tsv)."))
    workers: int = Field(default=1, ge=1, description="Processes writing files in parallel.")


class Config(_Strict):
    """The whole tree: one section per part of a run."""

    data: DataConfig = Field(default=DataConfig(), description="Input data and preparation.")
    model: ModelConfig = Field(default=ModelConfig(), description="The model and its "
                                                                  "constructor's keys.")
    optimizer: OptimizerConfig = Field(default=OptimizerConfig(), description="Optimizers and "
                                                                              "schedule.")
    train: TrainConfig = Field(default=TrainConfig(), description="The training loop.")
    distributed: DistributedConfig = Field(default=DistributedConfig(), description=(
        "Several workers: algorithm, graph, compression, shard groups."))
    synth: SynthConfig = Field(default=SynthConfig(), description="Synthetic data "
                                                                  "(`ctrkit synth`).")

    @model_validator(mode="after")
    def _model_keys_fit_the_constructor(self) -> "Config":
        """Validate the model section's keys with `constructor_arguments` and keep the validated
        values (e.g. '16' -> 16), so a bad value fails here, naming its key, not inside torch."""
        name = self.model.name
        if name not in MODELS:
            raise ValueError(f"model.name: unknown model '{name}' (known: "
                             f"{', '.join(sorted(MODELS.names()))})")
        arguments = constructor_arguments(MODELS.get(name))
        given = self.model.model_extra or {}
        try:
            checked = arguments.model_validate(given)
        except ValidationError as e:
            known = ["name", *arguments.model_fields]
            raise ValueError(_describe(e.errors()[0], ("model",), known,
                                       f" for model '{self.model.name}'")) from None
        for key in given:
            setattr(self.model, key, getattr(checked, key))
        return self

    @model_validator(mode="after")
    def _ema_needs_row_sparse_local_steps(self) -> "Config":
        problem = ema_conflict(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _base_optimizer_is_for_allreduce_and_local(self) -> "Config":
        problem = base_optimizer_conflict(self)
        if problem:
            raise ValueError(problem)
        return self


def constructor_arguments(cls: type) -> Type[BaseModel]:
    """A pydantic model of the keyword arguments `cls`'s constructor takes after its first
    parameter (a model's schema), read from its signature: values must fit the annotations,
    constraints such as `Annotated[int, Field(ge=1)]` included; a parameter without a default is
    required; a key that is no parameter is an error unless the constructor takes **kwargs. The
    config checks the `model:` section with it."""
    try:
        hints = get_type_hints(cls.__init__, include_extras=True)
    except Exception:   # an annotation that does not resolve at run time: check no types
        hints = {}
    params = list(inspect.signature(cls).parameters.values())[1:]
    fields: Dict[str, Any] = {
        p.name: (hints.get(p.name, Any), ... if p.default is p.empty else p.default)
        for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    extra = "allow" if any(p.kind == p.VAR_KEYWORD for p in params) else "forbid"
    config = ConfigDict(extra=extra, allow_inf_nan=False, arbitrary_types_allowed=True,
                        protected_namespaces=())
    return create_model(f"{cls.__name__}Arguments", __config__=config, **fields)


def base_optimizer_conflict(cfg: Config) -> Optional[str]:
    """Why distributed.base_optimizer cannot be used with this config, or None (also checked by
    the trainer, for a config changed after validation)."""
    dc = cfg.distributed
    if dc.base_optimizer == "amsgrad" and not STRATEGIES.get(dc.algorithm).takes_base_optimizer:
        return (f"distributed.base_optimizer=amsgrad: only with algorithm allreduce or local, not "
                f"{dc.algorithm} (which has its own update rule: damsgrad and choco step with "
                "AMSGrad already, dpsgd with SGD)")
    return None


def ema_conflict(cfg: Config) -> Optional[str]:
    """Why train.ema_decay cannot be used with this config, or None. The lazy average assumes a
    step changes only the rows its gradient touched (also checked by the trainer, for a config
    changed after validation)."""
    if not cfg.train.ema_decay:
        return None
    reason = STRATEGIES.get(cfg.distributed.algorithm).weight_average_conflict
    if reason:
        return f"train.ema_decay: not with distributed.algorithm={cfg.distributed.algorithm} ({reason})"
    if cfg.distributed.shard_group_size > 1:
        return "train.ema_decay: not with distributed.shard_group_size > 1"
    if cfg.optimizer.sparse.fused:
        return ("train.ema_decay: not with optimizer.sparse.fused=true (fbgemm updates the tables "
                "inside backward)")
    return None


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):   # the base class reports it
                continue
            if key in seen:
                raise _DuplicateKey(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_KEY = re.compile(r"[^.\s]+(\.[^.\s]+)*")   # a.b.c
_WORD = re.compile(r"[^\s\[\]{}\"',]+")    # one word without YAML flow or quote characters


def _parse_override(ov: str) -> Tuple[str, Any]:
    """`key=value`; values are YAML (`1e-3`, `true`, `[400,400]`, `null`). A value that is not
    valid YAML is an error unless it is one word (`@home`, `*.tsv`, kept as the string)."""
    if "=" not in ov:
        raise ConfigError(f"override '{ov}' must look like key=value")
    key, text = ov.split("=", 1)
    key = key.strip()
    if not _KEY.fullmatch(key):
        raise ConfigError(f"override '{ov}': the key must be a dotted path such as train.epochs")
    if text in ("|", ">"):   # YAML block indicators, i.e. an empty string; meant: the character
        return key, text
    try:
        return key, yaml.load(text, Loader=_Loader)
    except _DuplicateKey as e:
        raise ConfigError(f"override '{ov}': {e.problem}") from None
    except yaml.YAMLError as e:
        if _WORD.fullmatch(text):
            return key, text
        raise ConfigError(f"override '{ov}': invalid YAML value ({getattr(e, 'problem', None) or e})") from None


def _set_path(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def _section_keys(loc: Sequence[Any]) -> List[str]:
    """The keys of the config section at `loc` (list indices and union tags skipped)."""
    node: Any = Config
    for part in loc:
        field = node.model_fields.get(part) if isinstance(part, str) else None
        if field is not None:
            node = _model_in(field.annotation)
    return list(node.model_fields)


def _model_in(tp: Any) -> Any:
    """The config section class in an annotation such as Optional[List[FeatureSpec]]."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    return next((m for m in map(_model_in, get_args(tp)) if m is not None), None)


def _describe(e: Dict[str, Any], prefix: Tuple[str, ...] = (), known: Optional[Sequence[str]] = None,
              owner: str = "") -> str:
    """One line for a pydantic error of the keys under `prefix`; an unknown key gets the closest
    of `known` (default: the keys of its config section) as a suggestion."""
    parts = prefix + tuple(x for x in e["loc"] if not str(x).startswith("function-"))
    loc = ".".join(str(x) for x in parts) or "(root)"
    if e["type"] == "extra_forbidden":
        known = _section_keys(parts[:-1]) if known is None else known
        close = difflib.get_close_matches(str(parts[-1]), known, n=1)
        section = "".join(f"{x}." for x in parts[:-1])
        hint = f"did you mean '{section}{close[0]}'?" if close else f"known: {', '.join(known)}"
        return f"unknown key '{loc}'{owner} ({hint})"
    got = e.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    msg = e["msg"].removeprefix("Value error, ")
    return msg if loc == "(root)" else f"{loc}: {msg}{got_s}"


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults) and apply `a.b.c=value` overrides.

    Relative data paths in the file are resolved against the config file's folder, so a config
    works from any working directory.
    """
    tree: Dict[str, Any] = {}
    origin = "config"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            tree = yaml.load(p.read_text(), Loader=_Loader) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", e)
            what = problem if isinstance(e, _DuplicateKey) else f"invalid YAML ({problem})"
            raise ConfigError(f"{p}{line}: {what}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        _resolve_paths(tree, p.resolve().parent)
    for ov in overrides:
        _set_path(tree, *_parse_override(ov))
        origin = origin if path else "overrides"
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"{origin}: {_describe(e.errors()[0])}") from None
    # Paths from overrides and defaults are relative to the working directory; made absolute
    # here so a config dumped into a run folder (e.g. for the launcher's ranks) still points at
    # the same files.
    for section, keys in _PATH_KEYS.items():
        part = getattr(cfg, section)
        for key in keys:
            setattr(part, key, _absolute(getattr(part, key), Path.cwd()))
    return cfg


_PATH_KEYS = {"data": ("train", "valid", "test", "prepared_dir"), "synth": ("out_dir",),
              "train": ("run_dir", "init_from")}


def _resolve_paths(tree: Dict[str, Any], base: Path) -> None:
    for section, keys in _PATH_KEYS.items():
        part = tree.get(section)
        if isinstance(part, dict):
            for key in keys:
                if key in part:
                    part[key] = _absolute(part[key], base)


def _absolute(value: Any, base: Path) -> Any:
    """A relative path string joined to `base`; anything else (None, absolute) unchanged."""
    if isinstance(value, str) and not Path(value).expanduser().is_absolute():
        return os.path.normpath(base / Path(value).expanduser())
    return value


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
