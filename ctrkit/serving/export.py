"""A trained model as a program that runs with torch alone: `export_model(model, schema, out_dir)`.

The folder it writes (a "model export", ctrkit/ownership.py: a folder holding anything ctrkit did
not write is refused; every file appears atomically, preprocess.json last):

- `model.pt2`: `torch.export` of `ServingModule`, `forward(dense [B, Dn] float32, ids [B, F] int64)
  -> click probabilities [B] float32`, with a dynamic batch dimension; load it with
  `torch.export.load(path).module()`, no ctrkit or torchrec import needed. A model with multi-hot
  features takes a KeyedJaggedTensor's parts instead (`JaggedServingModule`): `forward(dense
  [B, Dn] float32, values [N] int64, lengths [F * B] int32)`, every feature's ids key after key
  in the schema's order, a one-hot feature's bags of length 1.
- `model.ts`: the same wrapper through `torch.jit.trace`, written only when the traced program
  gives the exported one's results at other batch sizes too; otherwise preprocess.json says why.
- `preprocess.json` (ctrkit/serving/preprocess_spec.py) and `vocab/<feature>.arrow`: how raw rows
  become `dense` and `ids`.

`ServingModule` builds the one-id-per-bag KeyedJaggedTensor from `ids` and calls the model under
`batch_facts(BatchFacts(one_per_bag=True))`, so the table modules take their static path (a plain
gather; finding out whether each bag holds one id would read the data, which torch.export cannot
trace); `JaggedServingModule` says "not one id per bag", and the tables pool with
`embedding_bag` over the lengths' offsets. Tables that fbgemm fuses (`optimizer.sparse.fused`)
are exported as plain `BatchedEmbeddingBags` with the same weights, so the program needs no
fbgemm (a program that still calls an fbgemm op is refused).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctrkit.data.batch import BatchFacts, batch_facts
from ctrkit.data.schema import Schema
from ctrkit.errors import CtrkitError
from ctrkit.models.embedding import BatchedEmbeddingBags, TableModule
from ctrkit.ownership import OwnedFolder, atomic_path, check_disjoint, check_folder, write_error
from ctrkit.serving.preprocess_spec import jagged, preprocess_spec

KIND = "model export"
PROGRAM, TORCHSCRIPT, SPEC = "model.pt2", "model.ts", "preprocess.json"
TOLERANCE = 1e-6
RULE = ("a model's forward(dense, sparse) must take tensors only and have no Python control flow "
        "that depends on their values (docs/extending.md)")


class ServingModule(nn.Module):
    """`forward(dense [B, Dn] float32, ids [B, F] int64) -> probabilities [B]`: one id per
    categorical feature, in the schema's order (`keys`)."""

    def __init__(self, model: nn.Module, keys: List[str]) -> None:
        super().__init__()
        self.model, self.keys = model, list(keys)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        kjt = KeyedJaggedTensor(keys=self.keys, values=ids.t().reshape(-1),
                                lengths=torch.ones(ids.numel(), dtype=torch.int32,
                                                   device=ids.device),
                                stride=ids.shape[0])
        with batch_facts(BatchFacts(one_per_bag=True)):
            return torch.sigmoid(self.model(dense, kjt))


class JaggedServingModule(nn.Module):
    """`forward(dense [B, Dn] float32, values [N] int64, lengths [F * B] int32) -> probabilities
    [B]`: the KeyedJaggedTensor of the features `keys` (key-major: all of key 0's bags, then key
    1's, ...), for models with multi-hot features."""

    def __init__(self, model: nn.Module, keys: List[str]) -> None:
        super().__init__()
        self.model, self.keys = model, list(keys)

    def forward(self, dense: torch.Tensor, values: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        kjt = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths,
                                stride=dense.shape[0])
        with batch_facts(BatchFacts(one_per_bag=False)):
            return torch.sigmoid(self.model(dense, kjt))


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _examples(schema: Schema, device: torch.device, b: int) -> Tuple[torch.Tensor, ...]:
    """Inputs of batch size b (seeded by b): random dense values and random valid ids; for the
    jagged inputs, bags of 1 to 3 ids for the multi-hot features."""
    g = torch.Generator().manual_seed(b)
    dense = torch.randn(b, len(schema.dense), generator=g)
    sizes = torch.tensor([max(f.vocab_size, 1) for f in schema.sparse], dtype=torch.int64)
    if not jagged(schema):
        ids = (torch.rand(b, len(sizes), generator=g) * sizes).to(torch.int64)
        return dense.to(device), ids.to(device)
    lengths = torch.stack([torch.randint(1, 4, (b,), generator=g) if f.multi else
                           torch.ones(b, dtype=torch.int64) for f in schema.sparse]).to(torch.int32)
    size_of_id = torch.repeat_interleave(sizes, lengths.sum(1))
    values = (torch.rand(len(size_of_id), generator=g) * size_of_id).to(torch.int64)
    return dense.to(device), values.to(device), lengths.reshape(-1).to(device)


@contextlib.contextmanager
def _plain_tables(model: nn.Module) -> Iterator[None]:
    """In the block, every table module other than `BatchedEmbeddingBags` (fbgemm's fused ones)
    is swapped for a `BatchedEmbeddingBags` with the same weights; restored afterwards."""
    swapped = []
    for name, m in list(model.named_modules()):
        if isinstance(m, TableModule) and not isinstance(m, BatchedEmbeddingBags) \
                and hasattr(m, "table_weight"):
            plain = BatchedEmbeddingBags(m.tables)
            with torch.no_grad():
                for i in range(len(m.tables)):
                    plain.table_weight(i).copy_(m.table_weight(i))
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            parent._modules[child] = plain
            swapped.append((parent, child, m))
    try:
        yield
    finally:
        for parent, child, m in swapped:
            parent._modules[child] = m


def _export(wrapper: nn.Module, schema: Schema, device: torch.device):
    batch = torch.export.Dim("batch", min=1)
    shapes = ({0: batch}, {0: batch}) if not jagged(schema) else \
        ({0: batch}, {0: torch.export.Dim("ids", min=1)}, {0: len(schema.sparse) * batch})
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, _examples(schema, device, 2),
                                          dynamic_shapes=shapes)
    except Exception as e:   # (torch raises many kinds: UserError, data-dependent guards, ...)
        raise CtrkitError(f"model {type(wrapper.model).__name__} cannot be exported with "
                          f"torch.export ({_first_line(e)}); {RULE}") from None
    library = sorted({str(n.target).split(".")[1] for n in program.graph.nodes
                      if n.op == "call_function" and str(n.target).startswith("fbgemm.")})
    if library:   # (e.g. torchrec's KJT permute, when a table group reads some of the features)
        raise CtrkitError(f"model {type(wrapper.model).__name__}: its exported program calls "
                          f"fbgemm ops ({', '.join(library)}), which a server with torch alone "
                          "cannot load")
    return program


def _check(program, wrapper: nn.Module, schema: Schema, device: torch.device,
           what: str) -> None:
    """`program` computes what the model computes (to 1e-6) at batch sizes 1 and 7."""
    for b in (1, 7):
        inputs = _examples(schema, device, b)
        with torch.no_grad():
            want, got = wrapper(*inputs), program(*inputs)
        if got.shape != want.shape or float((got - want).abs().max()) > TOLERANCE:
            raise CtrkitError(f"the {what} program of {type(wrapper.model).__name__} does not "
                              f"give the model's probabilities at batch size {b}; {RULE}")


def _torchscript(wrapper: nn.Module, schema: Schema,
                 device: torch.device) -> Tuple[Optional[bytes], Optional[str]]:
    """(the saved TorchScript program, None) or (None, why there is none)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # (the tracer's and TorchScript's deprecation notes)
            traced = torch.jit.trace(wrapper, _examples(schema, device, 4), check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
            loaded = torch.jit.load(io.BytesIO(buf.getvalue()))
            _check(loaded, wrapper, schema, device, "TorchScript")
    except Exception as e:
        return None, f"torch.jit.trace: {_first_line(e)}"
    return buf.getvalue(), None


def _prepare_folder(out_dir: Path, schema: Schema) -> OwnedFolder:
    check_folder(out_dir, "export --out")
    check_disjoint(out_dir, "export --out", [Path(schema.root)])
    folder = OwnedFolder(out_dir, KIND)
    folder.check_replaceable("export")
    return folder


def export_model(model: nn.Module, schema: Schema, out_dir: Path) -> dict:
    """Write `model` (trained on `schema`, on the CPU) into `out_dir` as described above; returns
    what was written. A model torch.export cannot trace is a one-line CtrkitError."""
    out_dir = Path(out_dir)
    folder = _prepare_folder(out_dir, schema)
    program_files = {"torch_export": PROGRAM, "torchscript": None, "torchscript_skipped": None}
    spec = preprocess_spec(schema, program_files)   # (before the slow part: the schema is usable)
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with _plain_tables(model):
            serving = JaggedServingModule if jagged(schema) else ServingModule
            wrapper = serving(model, [f.name for f in schema.sparse])
            program = _export(wrapper, schema, device)
            _check(program.module(), wrapper, schema, device, "exported")
            script, why_not = _torchscript(wrapper, schema, device)
    finally:
        model.train(was_training)
    saved = io.BytesIO()
    torch.export.save(program, saved)
    files = [PROGRAM, SPEC] + ([TORCHSCRIPT] if script is not None else [])
    vocab = [f"vocab/{f.name}.arrow" for f in schema.sparse if f.vocab == "count"]
    spec["program"].update(torchscript=TORCHSCRIPT if script is not None else None,
                           torchscript_skipped=why_not)
    with folder.lock():
        folder.check_replaceable("export")
        folder.clear()
        folder.reset(files=files + vocab, dirs=["vocab"] if vocab else [])
        try:
            with atomic_path(out_dir / PROGRAM) as tmp:
                tmp.write_bytes(saved.getvalue())
            if script is not None:
                with atomic_path(out_dir / TORCHSCRIPT) as tmp:
                    tmp.write_bytes(script)
            for rel in vocab:
                with atomic_path(out_dir / rel) as tmp:
                    shutil.copyfile(Path(schema.root) / rel, tmp)
            with atomic_path(out_dir / SPEC) as tmp:   # last: a folder with it is complete
                tmp.write_text(json.dumps(spec, indent=1))
        except OSError as e:
            raise write_error(out_dir, e) from None
    return {"out": str(out_dir), "model": type(model).__name__, "files": sorted(files + vocab),
            "torchscript": script is not None, "torchscript_skipped": why_not,
            "inputs": {"dense": len(schema.dense), "sparse": len(schema.sparse)}}
