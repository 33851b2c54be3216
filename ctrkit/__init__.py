"""ctrkit: config-driven sparse CTR training on torchrec/fbgemm.

Python API: `load_config(path, overrides) -> Config`, `prepare(cfg) -> Schema`,
`train(cfg) -> RunResult`, `evaluate(cfg, checkpoint) -> metrics`,
`Predictor.load(run).predict(rows) -> probabilities` (ctrkit/serving/predict.py).
"""
import logging as _logging

# torchrec's import triggers a torch.fx deprecation warning on every run; it is not actionable here.
_logging.getLogger("torch.fx._symbolic_trace").setLevel(_logging.ERROR)

from ctrkit.config import Config, load_config  # noqa: E402
from ctrkit.errors import ConfigError, CtrkitError, DataError  # noqa: E402
# The subpackage ctrkit.train, imported before `def train` below: importing it later (the first
# train() call does) would rebind `ctrkit.train` from the function to the package, so a second
# ctrkit.train(cfg) in the same process failed with "'module' object is not callable".
import ctrkit.train as _train_package  # noqa: E402,F401  (an empty __init__: no torch import)

from ctrkit.version import __version__  # noqa: E402


def prepare(cfg, progress: bool = True):
    from ctrkit.data.preprocess import prepare as _prepare
    return _prepare(cfg, progress=progress)


def train(cfg, progress=None):
    from ctrkit.train.run import train as _train
    return _train(cfg, progress=progress)


def evaluate(cfg, checkpoint=None):
    from ctrkit.train.run import evaluate as _evaluate
    return _evaluate(cfg, checkpoint=checkpoint)


def synth(out_dir, rows, **kwargs):
    from ctrkit.data.synth import write_synthetic
    return write_synthetic(out_dir, rows, **kwargs)


def __getattr__(name):
    if name == "Predictor":   # (imported on first use: `import ctrkit` stays free of torch)
        from ctrkit.serving.predict import Predictor
        return Predictor
    raise AttributeError(f"module 'ctrkit' has no attribute {name!r}")


__all__ = ["Predictor", "Config", "load_config", "prepare", "train", "evaluate", "synth", "CtrkitError",
           "ConfigError", "DataError"]
