"""`export_model`: a trained model as a torch.export program that runs with torch alone, plus the
spec and vocabularies a server needs to encode raw rows (ctrkit/serving/export.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrkit.config import load_config
from ctrkit.data.loader import BatchLoader
from ctrkit.data.preprocess import prepare
from ctrkit.data.synth import write_synthetic
from ctrkit.errors import CtrkitError
from ctrkit.metrics import predict
from ctrkit.models.fused import FusedEmbeddingBags
from ctrkit.ownership import MANIFEST
from ctrkit.serving.export import export_model
from ctrkit.train.setup import build_training_model
from tests.conftest import LAPIS_AVAZU, LAPIS_CRITEO

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "serve_exported.py"
# Run first in every subprocess: ctrkit, torchrec and fbgemm cannot be imported there.
BLOCK = """import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('ctrkit', 'torchrec', 'fbgemm_gpu'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, _Blocked())
"""
LOAD = BLOCK + """import numpy as np, torch
m = torch.export.load('model.pt2').module()
for b in (1, 7):
    with torch.no_grad():
        p = m(torch.from_numpy(np.load(f'dense{b}.npy')), torch.from_numpy(np.load(f'ids{b}.npy')))
    assert p.dtype == torch.float32 and p.shape == (b,)
    np.save(f'p{b}.npy', p.numpy())
assert not any(k.split('.')[0] in ('ctrkit', 'torchrec') for k in sys.modules)
"""


def _isolated(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`code` in a fresh `python -I` outside the repository, ctrkit not importable."""
    r = subprocess.run([sys.executable, "-I", "-c", code, *args], cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _model(name: str, schema, seed: int = 0):
    """A model as training builds it (`deepfm_fused`: fbgemm's fused tables), with weights far
    from their tiny initial values so that outputs differ."""
    keys = {"lr": [], "fm": ["model.embedding_dim=8"],
            "deepfm": ["model.embedding_dim=8", "model.hidden_units=[16,8]"],
            "deepfm_fused": ["model.embedding_dim=8", "model.hidden_units=[16,8]",
                             "optimizer.sparse.name=rowwise_adagrad", "optimizer.sparse.fused=true"]}
    cfg = load_config(None, [f"model.name={name.split('_')[0]}", *keys[name]])
    torch.manual_seed(seed)
    model = build_training_model(cfg, schema)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        for m in model.modules():
            if isinstance(m, FusedEmbeddingBags):
                for i in range(len(m.tables)):
                    m.table_weight(i).normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    write_synthetic(root / "raw", 800, valid_rows=60, seed=11, card_scale=0.01, progress=False)
    cfg = load_config(None, [f"data.train={root / 'raw' / 'train.tsv'}",
                             f"data.valid={root / 'raw' / 'valid.tsv'}",
                             f"data.prepared_dir={root / 'prep'}"])
    return prepare(cfg, progress=False), root / "raw" / "valid.tsv"


@pytest.mark.parametrize("name", ["lr", "fm", "deepfm", "deepfm_fused"])
def test_exported_program_gives_the_models_probabilities_without_ctrkit(name, synthetic, tmp_path):
    schema, _ = synthetic
    model = _model(name, schema)
    out = tmp_path / "served"
    res = export_model(model, schema, out)
    assert res["model"] == type(model).__name__ and (out / "model.pt2").is_file()
    assert (out / "model.ts").is_file() == res["torchscript"]
    for b in (1, 7):
        batch = next(iter(BatchLoader(schema, "valid", b, prefetch=0)))
        ids = batch.sparse.values().view(len(schema.sparse), b).t().contiguous()
        np.save(out / f"dense{b}.npy", batch.dense.numpy())
        np.save(out / f"ids{b}.npy", ids.numpy())
        with torch.no_grad():
            np.save(out / f"want{b}.npy", torch.sigmoid(batch.logits(model)).numpy())
    _isolated(LOAD, out)
    for b in (1, 7):
        np.testing.assert_allclose(np.load(out / f"p{b}.npy"), np.load(out / f"want{b}.npy"),
                                   rtol=0, atol=1e-6)
    assert model.training is False
    if name == "deepfm_fused":   # the exported copy had plain tables; the model keeps its own
        assert any(isinstance(m, FusedEmbeddingBags) for m in model.modules())
    if name == "lr":   # no autograd Function inside: TorchScript works at any batch size
        assert res["torchscript"] and res["torchscript_skipped"] is None


def test_export_folder_holds_the_spec_and_vocabularies(synthetic, tmp_path):
    schema, _ = synthetic
    out = tmp_path / "served"
    export_model(_model("deepfm", schema), schema, out)
    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["format"] == "ctrkit-preprocess" and spec["version"] == 1
    dense_in, ids_in = spec["program"]["inputs"]
    assert dense_in["columns"] == [f.name for f in schema.dense] == [d["name"] for d in spec["dense"]]
    assert ids_in["columns"] == [f.name for f in schema.sparse] == [s["name"] for s in spec["sparse"]]
    assert spec["ids"]["oov"] == 0 and spec["ids"]["missing"] == 1
    assert {d["transform"] for d in spec["dense"]} == {"log"} and spec["raw"]["delimiter"] == "\t"
    # DeepFM's FM term is an autograd Function: TorchScript cannot save it, and the spec says so
    assert spec["program"]["torchscript"] is None and "torch.jit.trace" in spec["program"]["torchscript_skipped"]
    for f in schema.sparse:
        copy = out / "vocab" / f"{f.name}.arrow"
        assert copy.read_bytes() == (schema.root / "vocab" / f"{f.name}.arrow").read_bytes()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    # exporting again replaces what ctrkit wrote there
    export_model(_model("lr", schema), schema, out)
    assert json.loads((out / "preprocess.json").read_text())["program"]["torch_export"] == "model.pt2"


def test_export_refuses_a_folder_ctrkit_did_not_write(synthetic, tmp_path):
    schema, _ = synthetic
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CtrkitError) as e:
        export_model(_model("lr", schema), schema, out)
    assert "\n" not in str(e.value) and "notes.txt" in str(e.value)
    assert (out / "notes.txt").read_text() == "keep me" and not (out / MANIFEST).exists()


class _ValueBranch(torch.nn.Module):
    """Branches on a value in its input: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, dense, sparse):
        if dense.sum() > 0:
            return self.w * dense.sum(1)
        return -self.w * dense.sum(1)


def test_a_model_with_value_dependent_control_flow_is_one_line(synthetic, tmp_path):
    schema, _ = synthetic
    with pytest.raises(CtrkitError) as e:
        export_model(_ValueBranch().eval(), schema, tmp_path / "served")
    msg = str(e.value)
    assert "\n" not in msg and "_ValueBranch" in msg and "forward(dense, sparse)" in msg
    assert "control flow" in msg
    assert not (tmp_path / "served" / "model.pt2").exists()


def _example_matches_prepare(schema, model, raw: Path, tmp_path: Path) -> None:
    """The example script on the raw file gives what the model gives on `prepare`'s encoding of
    the same file (its `valid` split)."""
    out = tmp_path / "served"
    export_model(model, schema, out)
    _, want = predict(model, BatchLoader(schema, "valid", 100, prefetch=0))
    code = BLOCK + "import runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    _isolated(code, tmp_path, str(EXAMPLE), str(out), str(raw), str(tmp_path / "p.txt"))
    got = np.loadtxt(tmp_path / "p.txt", ndmin=1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_example_script_scores_a_raw_file_like_the_model(synthetic, tmp_path):
    schema, raw = synthetic
    _example_matches_prepare(schema, _model("deepfm", schema), raw, tmp_path)


def _spread_hours(src: Path, dst: Path) -> Path:
    """The Avazu file with its `hour` column (all one date-hour in the slice) spread over a week,
    Monday 2014-10-20 to Sunday 2014-10-26, so every weekday and both weekend values occur."""
    lines = src.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        f = line.split(",")
        if f[2] != "hour":
            f[2] = f"1410{20 + i % 7:02d}{(5 * i) % 24:02d}"
        out.append(",".join(f))
    dst.write_text("\n".join(out) + "\n")
    return dst


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["criteo", "avazu"])
def test_example_script_on_the_real_slices(name, tmp_path):
    """Criteo with bucketed numerics (criteo_bucket); Avazu with its derived hour, weekday and
    weekend features, a train file with a header and a dev file without one."""
    if name == "criteo":
        train, valid = LAPIS_CRITEO / "train.csv", LAPIS_CRITEO / "dev.csv"
        extra = ["data.format=criteo_tsv", "data.dense_transform=criteo_bucket"]
    else:
        train = _spread_hours(LAPIS_AVAZU / "train.csv", tmp_path / "train.csv")
        valid = _spread_hours(LAPIS_AVAZU / "dev.csv", tmp_path / "dev.csv")
        extra = ["data.format=avazu_csv"]
    cfg = load_config(None, [*extra, f"data.train={train}", f"data.valid={valid}",
                             "data.min_count=2", f"data.prepared_dir={tmp_path / 'prep'}"])
    schema = prepare(cfg, progress=False)
    if name == "avazu":   # all seven weekdays and both weekend values are in the vocabularies
        assert [f.vocab_size for f in schema.features[:3]] == [24 + 2, 7 + 2, 2 + 2]
    _example_matches_prepare(schema, _model("deepfm", schema), valid, tmp_path)


def _generic_csv(path: Path, rows: int, seed: int) -> Path:
    """A csv with a header: a label, a city (some missing), a raw price (some missing), an age
    whose missing values are filled, and the price once more as buckets."""
    g = np.random.default_rng(seed)
    lines = ["clicked,city,price,age"]
    for _ in range(rows):
        city = "" if g.random() < 0.1 else f"c{g.integers(0, 6)}"
        price = "" if g.random() < 0.1 else f"{g.normal(0, 30):.3f}"
        age = "NA" if g.random() < 0.1 else str(int(g.integers(18, 80)))
        lines.append(f"{int(g.random() < 0.3)},{city},{price},{age}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_example_script_on_a_generic_csv_with_fills(tmp_path):
    train = _generic_csv(tmp_path / "train.csv", 400, 1)
    valid = _generic_csv(tmp_path / "valid.csv", 50, 2)
    features = ("[{name: city, type: categorical, fill: nowhere},"
                " {name: price, type: numeric, transform: none, fill: -1.5},"
                " {name: age, type: numeric, transform: log, fill: 30},"
                " {name: price_bucket, type: numeric, source: price, transform: criteo_bucket}]")
    cfg = load_config(None, ["data.format=csv", "data.label=clicked", f"data.features={features}",
                             f"data.train={train}", f"data.valid={valid}",
                             f"data.prepared_dir={tmp_path / 'prep'}"])
    schema = prepare(cfg, progress=False)
    spec_of = {f.name: f for f in schema.features}
    assert spec_of["price_bucket"].kind == "sparse" and spec_of["age"].kind == "dense"
    _example_matches_prepare(schema, _model("fm", schema), valid, tmp_path)
    spec = json.loads((tmp_path / "served" / "preprocess.json").read_text())
    assert [(d["name"], d["fill"], d["transform"]) for d in spec["dense"]] == \
        [("price", -1.5, "none"), ("age", 30.0, "log")]
    assert [(s["name"], s["encoding"], s["fill"], s["read_as"]) for s in spec["sparse"]] == \
        [("city", "value", "nowhere", "string"), ("price_bucket", "criteo_bucket", None, "float64")]


def test_ctrkit_export_writes_a_trained_runs_program(synthetic, tmp_path):
    from ctrkit.cli import main
    from ctrkit.serving.predict import Predictor
    from ctrkit.train.run import train
    schema, raw = synthetic
    cfg = load_config(None, [f"data.train={raw.parent / 'train.tsv'}", f"data.valid={raw}",
                             f"data.prepared_dir={schema.root}", f"train.run_dir={tmp_path / 'run'}",
                             "model.hidden_units=[16]", "model.embedding_dim=8",
                             "train.max_steps=5", "train.batch_size=64", "train.progress=false",
                             "train.tensorboard=false", "train.plot=false", "train.threads=1"])
    run_dir = train(cfg).run_dir
    assert main(["export", str(run_dir), "--out", str(tmp_path / "served"), "--quiet"]) == 0
    _, want = predict(Predictor.load(run_dir).model, BatchLoader(schema, "valid", 100, prefetch=0))
    code = BLOCK + "import runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    _isolated(code, tmp_path, str(EXAMPLE), str(tmp_path / "served"), str(raw), str(tmp_path / "p.txt"))
    np.testing.assert_allclose(np.loadtxt(tmp_path / "p.txt"), want, rtol=0, atol=1e-6)
