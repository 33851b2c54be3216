"""Typed configuration tree: YAML file + `key=value` overrides, validated with clear one-line errors."""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Sequence, Tuple, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator,
                      model_validator)

from ctrkit.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Adam's (beta1, beta2): torch needs each in [0, 1).
Betas = Annotated[List[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]


class FeatureSpec(_Strict):
    """One input column of a generic CSV/Parquet dataset."""

    # (also a file name: vocab/<name>.arrow)
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$", max_length=200)
    type: Literal["categorical", "numeric"]
    source: Optional[str] = None          # raw column name (default: name)
    fill: Optional[Union[str, float]] = None  # value for missing entries (numeric default 0)
    transform: Optional[Literal["none", "log", "criteo_bucket"]] = None  # numeric only; default data.dense_transform
    min_count: Optional[int] = Field(default=None, ge=1)


class DataConfig(_Strict):
    format: Literal["criteo_tsv", "criteo_csv", "avazu_csv", "csv", "parquet"] = "criteo_tsv"
    train: Optional[str] = None
    valid: Optional[str] = None
    test: Optional[str] = None
    header: Literal["auto", True, False] = "auto"
    delimiter: Optional[str] = Field(default=None, min_length=1, max_length=1)  # csv only; default ','
    features: Optional[List[FeatureSpec]] = None
    label: str = "label"
    min_count: int = Field(default=1, ge=1)
    dense_transform: Literal["none", "log", "criteo_bucket"] = "log"
    prepared_dir: str = "data/prepared"
    overwrite: bool = False                  # rebuild even an up-to-date prepared_dir (only ctrkit's files)
    skip_bad_rows: bool = False              # count and skip malformed rows instead of failing
    shard_rows: int = Field(default=1_000_000, ge=1)
    read_block_mb: int = Field(default=16, ge=1)
    read_whole_mb: int = Field(default=1024, ge=0)   # files up to this size are parsed in one parallel read

    @model_validator(mode="after")
    def _generic_needs_features(self) -> "DataConfig":
        if self.format in ("csv", "parquet") and not self.features:
            raise ValueError(f"data.features is required for format '{self.format}'")
        names = [f.name for f in self.features or []]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"data.features: feature name {twice[0]!r} is used twice")
        return self


class ModelConfig(BaseModel):
    """`name` picks a registered model; every other key is passed to its constructor (checked
    against the constructor's signature by `Config`, see `_model_keys_fit_the_constructor`)."""

    model_config = ConfigDict(extra="allow")
    name: str = "deepfm"


class SparseOptConfig(_Strict):
    name: Literal["adam", "amsgrad", "rowwise_adagrad", "adagrad", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: Betas = [0.9, 0.999]
    eps: float = Field(default=1e-8, gt=0)
    rowwise: bool = False   # adam/amsgrad: one second-moment scalar per row
    lr_overrides: Dict[str, PositiveFloat] = {}   # {module-path prefix: lr}, e.g. {linear: 1.0e-2}
    fused: bool = False     # fbgemm TBE with the update fused into backward (rowwise_adagrad, adagrad, sgd)

    @model_validator(mode="after")
    def _fused_needs_fbgemm_optimizer(self) -> "SparseOptConfig":
        if self.fused and self.name not in ("rowwise_adagrad", "adagrad", "sgd"):
            raise ValueError(f"fused=true needs rowwise_adagrad, adagrad or sgd: fbgemm's CPU "
                             f"kernels have no '{self.name}'")
        return self


class DenseOptConfig(_Strict):
    name: Literal["adam", "adamw", "sgd", "adagrad"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: Betas = [0.9, 0.999]
    eps: float = Field(default=1e-8, gt=0)


class ScheduleConfig(_Strict):
    """Per-step learning-rate schedule for every optimizer (dense, tables, fused tables)."""
    name: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)      # linear ramp from lr / warmup_steps to lr
    total_steps: int = Field(default=0, ge=0)       # 0: epochs x steps per epoch (max_steps does not count)
    final_ratio: float = Field(default=0.1, ge=0, le=1)   # lr at total_steps / peak lr

    @model_validator(mode="after")
    def _warmup_ends_before_the_decay(self) -> "ScheduleConfig":
        if self.name != "constant" and 0 < self.total_steps <= self.warmup_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below "
                             f"total_steps ({self.total_steps}): nothing would be left to decay")
        return self


class OptimizerConfig(_Strict):
    dense: DenseOptConfig = DenseOptConfig()
    sparse: SparseOptConfig = SparseOptConfig()
    schedule: ScheduleConfig = ScheduleConfig()


class EarlyStopConfig(_Strict):
    monitor: Literal["valid_auc", "valid_logloss"] = "valid_auc"
    patience: int = Field(default=2, ge=1)   # evaluations without improvement before stopping
    enabled: bool = True


class PlateauConfig(_Strict):
    factor: float = Field(default=0.1, gt=0, lt=1)
    patience: int = Field(default=1, ge=0)
    min_lr: float = Field(default=1e-6, ge=0)
    enabled: bool = True


class TrainConfig(_Strict):
    batch_size: int = Field(default=4096, ge=1)
    eval_batch_size: int = Field(default=16384, ge=1)
    epochs: int = Field(default=1, ge=1)
    eval_every: int = Field(default=0, ge=0)          # steps; 0 = once per epoch
    max_steps: int = Field(default=0, ge=0)           # 0 = no limit; stops (and checkpoints) after N steps
    checkpoint_every: int = Field(default=0, ge=0)    # steps; 0 = at each evaluation; always at the end
    early_stop: EarlyStopConfig = EarlyStopConfig()
    lr_plateau: PlateauConfig = PlateauConfig()
    threads: int = Field(default=0, ge=0)             # torch intra-op threads; 0 = leave torch's default
    # auto: the GPU when torch sees one (rank r of a node takes cuda:<local rank>), else the CPU;
    # cpu; cuda; cuda:N (every rank on GPU N: only with gloo, e.g. several ranks on one GPU).
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    seed: int = Field(default=0, ge=0, lt=2**32)      # numpy's global seed is 32 bits
    shuffle: bool = True
    prefetch: int = Field(default=4, ge=0)            # batches prepared ahead in a background thread
    run_dir: str = "runs/default"
    resume: bool = False
    # Start from a saved model's weights (a `.pt` checkpoint, or the torch.distributed.checkpoint
    # folder of a sharded run, which loads into any shard group size); optimizer state starts fresh.
    init_from: Optional[str] = None
    overwrite: bool = False                           # start over in a run_dir (removes only ctrkit's files)
    log_every: int = Field(default=50, ge=1)
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    # > 0: evaluate, keep as best and export an exponential moving average of the weights (decay
    # per step; table rows averaged lazily, ctrkit/train/ema.py). 0.95 averages the last ~20
    # steps: +0.002-0.003 valid AUC after one epoch on the reference data. 0 = the last step's weights.
    ema_decay: float = Field(default=0.0, ge=0, lt=1)


class DistributedConfig(_Strict):
    workers: int = Field(default=1, ge=1)   # >1: `ctrkit train` launches this many ranks (torchrun)
    algorithm: Literal["local", "allreduce", "dpsgd", "damsgrad", "choco"] = "local"
    topology: Literal["ring", "torus", "exponential", "complete", "edges"] = "ring"
    edges: Optional[List[List[int]]] = None     # topology: edges
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(default=300.0, gt=0)   # a dead or hung peer ends the run after this
    # damsgrad/choco: step m / sqrt(max(u, eps)); 1e-16 floors the denominator at 1e-8, as
    # Adam's eps does (1e-8 floored it at 1e-4, above most embedding rows' sqrt(u)).
    eps: float = Field(default=1e-16, gt=0)
    rowwise_tracker: bool = False                # damsgrad: one second moment per embedding row
    # damsgrad/choco: Adam's bias correction (step x sqrt(1 - b2^t) / (1 - b1^t), t the global
    # step), as torch's Adam(amsgrad=True) has; DESIGN.md's equations have none.
    bias_correction: bool = False
    # allreduce/local: step with "config"'s optimizers (optimizer.dense/sparse), or with "amsgrad",
    # damsgrad's local step (m / sqrt(max(vhat, eps)), eps, rowwise_tracker and bias_correction as
    # above) after the gradient average, so allreduce at n = 1 is bit-identical to damsgrad at n = 1.
    base_optimizer: Literal["config", "amsgrad"] = "config"
    max_restarts: int = Field(default=0, ge=0)   # torchrun restarts (resume from the last checkpoint)
    # Learning rates x n^0 / n^0.5 / n for n workers; auto: sqrt for Adam-type allreduce, linear
    # for SGD, min(sqrt(n), 2) for Adam-type damsgrad/choco (optim/build.py: worker_lr_scale).
    lr_scaling: Literal["none", "sqrt", "linear", "auto"] = "none"
    # choco: C(x - x_hat) goes to the neighbours (see ctrkit/comm/compress.py for the specs),
    # x += gamma (s - x_hat); the tracker u is compressed too, or sent exactly every k steps.
    compressor: str = "topk:0.01+int8"
    # The MLP's vector (and its tracker) as signs, 1 bit per entry and a scale per group: on the
    # reference data choco then matches allreduce at n = 4 on 10 % of its wire bytes, int8 needed
    # 45 % (bench/RESULTS.md). None: the same as `compressor`.
    dense_compressor: Optional[str] = "sign"
    gamma: float = Field(default=0.3, gt=0, le=1)
    tracker: Literal["compressed", "exact"] = "compressed"
    tracker_every: int = Field(default=1, ge=1)
    # damsgrad/dpsgd/choco tables: a row travels when its unsent difference |x - x_hat| exceeds
    # gossip_tol * |x| (row norms); the rest stays in x - x_hat (error feedback) and a row whose
    # consensus step is below the tolerance too leaves the send set until touched or received
    # (docs: optim/decentralized.py). 0: every row that differs at all, every round.
    gossip_tol: float = Field(default=0.01, ge=0, lt=1)
    # Ranks per shard group: k ranks split the tables with torchrec (table-/column-wise) and act as
    # one decentralized worker fed the union of their batches; the workers/k groups gossip.
    # 1: every rank holds all tables; workers: pure model parallelism, no gossip.
    shard_group_size: int = Field(default=1, ge=1)

    @field_validator("compressor", "dense_compressor")
    @classmethod
    def _known_compressor(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            from ctrkit.comm.compress import build_compressor
            build_compressor(v)   # ValueError -> a one-line config error naming the key
        return v


class SynthConfig(_Strict):
    out_dir: str = "data/synth"
    rows: int = Field(default=200_000, ge=1)
    valid_rows: int = Field(default=20_000, ge=0)
    test_rows: int = Field(default=20_000, ge=0)
    seed: int = Field(default=0, ge=0)
    pos_rate: float = Field(default=0.25, gt=0, lt=1)
    card_scale: float = Field(default=1.0, gt=0)
    max_card: int = Field(default=1_000_000, ge=2, le=2**32)   # ids are 8 hex characters
    overwrite: bool = False


class Config(_Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    synth: SynthConfig = SynthConfig()

    @model_validator(mode="after")
    def _model_keys_fit_the_constructor(self) -> "Config":
        """Validate the model section's keys with `constructor_arguments` and keep the validated
        values (e.g. '16' -> 16), so a bad value fails here, naming its key, not inside torch."""
        from ctrkit.models.registry import constructor_arguments   # lazy: imports torch and this module
        try:
            arguments = constructor_arguments(self.model.name)
        except ConfigError as e:   # unknown model name
            raise ValueError(str(e)) from None
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


def base_optimizer_conflict(cfg: Config) -> Optional[str]:
    """Why distributed.base_optimizer cannot be used with this config, or None (also checked by
    the trainer, for a config changed after validation)."""
    dc = cfg.distributed
    if dc.base_optimizer == "amsgrad" and dc.algorithm in ("dpsgd", "damsgrad", "choco"):
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
    if cfg.distributed.algorithm in ("dpsgd", "damsgrad", "choco"):
        return (f"train.ema_decay: not with distributed.algorithm={cfg.distributed.algorithm} "
                "(gossip moves rows a step did not touch; the averaged replicas are already an "
                "average)")
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
