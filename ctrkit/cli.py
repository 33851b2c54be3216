"""`ctrkit synth | prepare | train | eval | demo | predict | export` — a thin layer over the
Python API.

Every command takes an optional YAML config and `key=value` overrides. User errors (bad config,
bad input files) print one line and exit with status 2, never a traceback. The benchmarks are
programs of their own in bench/ (bench/README.md), not ctrkit commands.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ctrkit.errors import CtrkitError, Interrupted, report_rank_error
from ctrkit.ownership import is_disk_error

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _config_path(items: Sequence[str]) -> Optional[str]:
    """The one positional argument that is not an override: the config file."""
    if len(items) > 1:
        raise CtrkitError(f"unexpected argument '{items[1]}' (overrides look like key=value)")
    return items[0] if items else None


def _print(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=1, default=float))
        return
    for split in ("valid", "test"):
        m = obj.get(split)
        if isinstance(m, dict):
            print(f"{split:5s}  AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  ({m['rows']} rows)")
    ceiling = obj.get("ceiling_auc")
    if isinstance(ceiling, dict) and ceiling:
        print("ceiling AUC of the generating model: " +
              ", ".join(f"{k} {v:.4f}" for k, v in ceiling.items()))
    if "samples_per_s" in obj:
        print(f"trained on {obj['samples']} samples in {obj['wall_seconds']:.1f} s "
              f"({obj['samples_per_s']:,.0f} samples/s); run folder {obj['run_dir']}")


def cmd_synth(cfg, args) -> dict:
    from ctrkit.data.synth import write_synthetic
    s = cfg.synth
    return write_synthetic(s.out_dir, s.rows, s.valid_rows, s.test_rows, seed=s.seed,
                           pos_rate=s.pos_rate, card_scale=s.card_scale, max_card=s.max_card,
                           overwrite=s.overwrite, progress=not args.quiet, files=s.files,
                           workers=s.workers)


def cmd_prepare(cfg, args) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # a rank of torchrun: the ranks share the work
        from ctrkit.distributed.prepare import prepare_under_torchrun as prepare
    else:
        from ctrkit.data.preprocess import prepare
    schema = prepare(cfg, progress=not args.quiet)
    return {"prepared_dir": str(schema.root), "seconds": schema.seconds,
            "features": {f.name: f.vocab_size for f in schema.features},
            "splits": {k: {"rows_read": v.rows_read, "rows_written": v.rows_written,
                           "rows_skipped": v.rows_skipped, "skipped": v.skipped}
                       for k, v in schema.splits.items()}}


def cmd_train(cfg, args) -> dict:
    from ctrkit.train.run import train
    return train(cfg, progress=False if args.quiet else None).metrics


def cmd_eval(cfg, args) -> dict:
    from ctrkit.train.run import evaluate
    return evaluate(cfg, checkpoint=args.checkpoint, progress=False if args.quiet else None)


def cmd_demo(cfg, args) -> dict:
    """synth -> prepare -> train -> eval on data the project generates itself."""
    from ctrkit.data.preprocess import prepare
    from ctrkit.train.run import evaluate, train
    meta_path = Path(cfg.synth.out_dir) / "meta.json"
    if not meta_path.is_file():
        cmd_synth(cfg, args)
    meta = json.loads(meta_path.read_text())
    # the demo owns its prepared folder: rebuild it (a few seconds) so it always matches this version
    prepare(cfg.model_copy(update={"data": cfg.data.model_copy(update={"overwrite": True})}),
            progress=not args.quiet)
    tc = cfg.train.model_copy(update={"overwrite": True, "resume": False})
    result = train(cfg.model_copy(update={"train": tc}), progress=False if args.quiet else None)
    out = evaluate(cfg)
    out["ceiling_auc"] = meta.get("ceiling_auc", {})
    out.update({k: result.metrics[k] for k in ("samples", "wall_seconds", "samples_per_s", "run_dir")})
    return out


def cmd_predict(args) -> dict:
    """Score raw files with a run's model (ctrkit/serving/predict.py)."""
    from ctrkit.serving.predict import Predictor
    p = Predictor.load(args.run, checkpoint=args.checkpoint, batch_rows=args.batch_rows,
                       precision=args.precision)
    if args.threads:
        from ctrkit.train.setup import set_threads
        set_threads(args.threads)
    s = p.predict_files(args.input, args.output, columns=args.columns or (),
                        skip_bad_rows=True if args.skip_bad_rows else None, progress=not args.quiet)
    out = s.as_dict()
    out["checkpoint"] = str(p.checkpoint)
    return out


def cmd_export(args) -> dict:
    """A run's model as a program that runs with torch alone (ctrkit/serving/export.py)."""
    from ctrkit.serving.export import export_model
    from ctrkit.serving.predict import Predictor
    p = Predictor.load(args.run, checkpoint=args.checkpoint)
    out = export_model(p.model, p.schema, Path(args.out))
    out["checkpoint"] = str(p.checkpoint)
    return out


def _print_predict(out: dict) -> None:
    skipped = f", {out['rows_skipped']} skipped {out['skipped']}" if out["rows_skipped"] else ""
    print(f"scored {out['rows_written']} of {out['rows_read']} rows{skipped} in "
          f"{out['seconds']:.1f} s ({out['rows_per_s'] or 0:,.0f} rows/s) -> {out['output']}")
    m = out.get("metrics")
    if m:
        print(f"labels in the input: AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  "
              f"({m['rows']} rows)")


RUN_COMMANDS = {"predict": cmd_predict, "export": cmd_export}   # (they take a run, not a config)
COMMANDS = {"synth": cmd_synth, "prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval,
            "demo": cmd_demo}
BENCH_MOVED = ("`ctrkit bench` was removed: the benchmarks are programs in bench/, run as "
               "python bench/throughput.py CONFIG (also gossip_compression.py, sharding.py, "
               "scaling.py; see bench/README.md)")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line, like every other error (argparse prints its usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ctrkit", description="Sparse CTR training on torchrec/fbgemm.",
                epilog="Benchmarks: the programs in bench/ (bench/README.md).")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"synth": "write synthetic Criteo-format data (synth.* keys)",
             "prepare": "raw files -> vocabularies, encoded shards, schema.json",
             "train": "train (prepares the data first if needed); writes metrics.json",
             "eval": "evaluate a checkpoint on valid/test; writes metrics.json",
             "demo": "synth -> prepare -> train -> eval with configs/demo.yaml"}
    for name, h in helps.items():
        sp = sub.add_parser(name, help=h)
        sp.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
        sp.add_argument("--json", action="store_true", help="print the result as JSON")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "eval":
            sp.add_argument("--checkpoint", default=None, help="checkpoint file (default: best)")
    sp = sub.add_parser("predict", help="score raw files with a trained run's model")
    sp.add_argument("run", help="run folder (or a checkpoint inside one)")
    sp.add_argument("--input", nargs="+", required=True,
                    help="CSV/TSV/Parquet files or globs, the run's data format; label optional")
    sp.add_argument("--output", required=True, help=".parquet, .csv or .tsv file (must not exist)")
    sp.add_argument("--columns", nargs="*", default=[],
                    help="input columns copied to the output before `probability` (an id column)")
    sp.add_argument("--skip-bad-rows", action="store_true",
                    help="skip and count bad rows instead of stopping at the first")
    sp.add_argument("--checkpoint", default=None, help="checkpoint file (default: the run's best)")
    sp.add_argument("--batch-rows", type=int, default=65536, help="rows encoded and written per batch (the model scores 4096 at a time)")
    sp.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    sp.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="fp32: the scores training's evaluation gives; bf16: batch norm folded, "
                         "the MLP in bfloat16, faster on CPUs with bf16 units, scores agree to ~2e-3")
    sp = sub.add_parser("export", help="a trained run's model as a torch.export program")
    sp.add_argument("run", help="run folder (or a checkpoint inside one)")
    sp.add_argument("--out", required=True, help="output folder (new, or one export wrote)")
    sp.add_argument("--checkpoint", default=None, help="checkpoint file (default: the run's best)")
    for sp in (sub.choices["predict"], sub.choices["export"]):
        sp.add_argument("--json", action="store_true", help="print the result as JSON")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _resume_command(argv: Sequence[str]) -> str:
    keep = [a for a in argv if not a.startswith(("train.resume=", "train.overwrite="))]
    return shlex.join(["ctrkit", *keep, "train.resume=true"])


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides may sit anywhere on the line, also after options (not for the
    # commands that take a run: their arguments are paths)
    overrides = [] if argv and argv[0] in RUN_COMMANDS else \
        [a for a in argv if "=" in a and not a.startswith("-")]
    if next((a for a in argv if a not in overrides and not a.startswith("-")), None) == "bench":
        print(f"ctrkit: error: {BENCH_MOVED}", file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args([a for a in argv if a not in overrides])
    except SystemExit as e:   # --help, or a usage error (already printed)
        return e.code if isinstance(e.code, int) else 2
    launched = os.environ.get("CTRKIT_LAUNCHED") == "1"   # a rank started by `ctrkit train`
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        if args.command in RUN_COMMANDS:
            result = RUN_COMMANDS[args.command](args)
            if args.json:
                _print(result, True)
            elif args.command == "predict":
                _print_predict(result)
            else:
                print(f"exported to {result.get('out', args.out)}")
            return 0
        from ctrkit.config import load_config
        config = _config_path(args.args)
        if config is None and args.command == "demo":
            config = str(DEMO_CONFIG)
        cfg = load_config(config, overrides)
        result = COMMANDS[args.command](cfg, args)
    except Interrupted as e:
        if rank0 and not launched:   # (the launcher says it once for all ranks)
            print(f"ctrkit {args.command}: {e}; resume with: {_resume_command(argv)}",
                  file=sys.stderr)
        return e.exit_code
    except (CtrkitError, OSError) as e:
        if isinstance(e, OSError) and not (is_disk_error(e) or e.filename):
            raise   # (an OSError about no file is a bug: its traceback helps)
        msg = str(e) if isinstance(e, CtrkitError) else \
            f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}"
        report_rank_error(msg)
        print(f"ctrkit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctrkit {args.command}: interrupted", file=sys.stderr)
        return 130
    if rank0 and not launched:   # under torchrun only rank 0 reports, once
        _print(result, args.json or args.command not in ("train", "eval", "demo"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
