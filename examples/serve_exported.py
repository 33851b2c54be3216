"""Score a raw CSV/TSV file with a model exported by `ctrkit export`, with torch and pyarrow only:
    python examples/serve_exported.py EXPORT_DIR RAW_FILE [OUT_FILE]   # one probability a line
Raw values are encoded as EXPORT_DIR/preprocess.json says (docs/serving.md)."""
import json, sys                                                           # noqa: E401
from pathlib import Path

import numpy as np, pyarrow as pa, torch                                  # noqa: E401
import pyarrow.compute as pc, pyarrow.csv as csv, pyarrow.feather as feather  # noqa: E401


def read(raw: dict, path: str, sources: list) -> pa.Table:
    head = open(path).readline().split(raw["delimiter"])[0].strip().strip('"')
    sniffed = head.lower() in ("label", "id", "click") or not head.lstrip("-").replace(".", "").isdigit()
    header = sniffed if raw["header"] == "auto" else raw["header"]
    types = {c: pa.float64() if c in raw["numeric_columns"] else pa.string() for c in sources}
    quote = '"' if raw["quoting"] else False
    return csv.read_csv(path, csv.ReadOptions(column_names=None if header else raw["columns"]),
                        csv.ParseOptions(delimiter=raw["delimiter"], quote_char=quote),
                        csv.ConvertOptions(column_types=types, include_columns=sources,
                                           null_values=raw["missing_values"], strings_can_be_null=True,
                                           quoted_strings_can_be_null=True))


def text(col: pa.Array, f: dict) -> pa.Array:
    """What a value is looked up by in the feature's vocabulary (null: missing)."""
    if f["encoding"] == "criteo_bucket":
        x = col.to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore", divide="ignore"):
            b = np.where(x > 2, np.floor(np.log(np.where(x > 2, x, 1.0)) ** 2), np.floor(x))
        b = np.clip(np.nan_to_num(b), -2.0 ** 62, 2.0 ** 62).astype(np.int64)
        return pa.array(b, mask=np.isnan(x))
    if f["encoding"] == "avazu_hour":
        return pc.utf8_slice_codeunits(col, 6, 8)
    if f["encoding"] in ("avazu_weekday", "avazu_weekend"):
        dow = pc.day_of_week(pc.strptime(col, format="%y%m%d%H", unit="s", error_is_null=True))
        return dow if f["encoding"] == "avazu_weekday" else pc.greater_equal(dow, 5)
    return col if f["fill"] is None else pc.fill_null(col, str(f["fill"]))


def fnv1a64(k: pa.Array) -> np.ndarray:
    """FNV-1a 64 of each string's UTF-8 bytes, byte position by byte position for all at once."""
    off = np.frombuffer(k.buffers()[1], np.int32)[k.offset:k.offset + len(k) + 1].astype(np.int64)
    data = np.frombuffer(k.buffers()[2] or b"", np.uint8)
    h, n = np.full(len(k), 0xCBF29CE484222325, np.uint64), off[1:] - off[:-1]
    for j in range(int(n.max(initial=0))):
        a = np.flatnonzero(n > j)
        h[a] = (h[a] ^ data[off[a] + j]) * np.uint64(0x100000001B3)
    return h


def ids_of(k: pa.Array, f: dict, spec: dict, export: Path) -> np.ndarray:
    """Ids of the text values k (null: missing) by the feature's vocabulary or hash."""
    if f["vocabulary"] is None:   # hashed: 2 + fnv1a64(text) mod buckets
        known = pa.array(fnv1a64(k.fill_null("")) % np.uint64(f["hash"]["buckets"]) + 2)
    else:
        vocab = feather.read_table(str(export / f["vocabulary"]), columns=["value"]).column("value")
        known = pc.fill_null(pc.add(pc.index_in(k, value_set=vocab), 2), spec["ids"]["oov"])
    return pc.if_else(pc.is_null(k), spec["ids"]["missing"], known).to_numpy().astype(np.int64)


def bags(k: pa.Array, f: dict, spec: dict, export: Path):
    """A multi-hot field's (ids, lengths): split, empty parts dropped, max_len kept, [missing]."""
    lists = pc.split_pattern(k, f["multi"]["separator"])
    flat, row = pc.list_flatten(lists), pc.list_parent_indices(lists).to_numpy()
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    flat, row = flat.filter(pa.array(keep)), row[keep]
    n = np.bincount(row, minlength=len(k))
    take = np.arange(len(row)) - np.repeat(np.cumsum(n) - n, n) < (f["multi"]["max_len"] or len(row) + 1)
    ids, n = ids_of(flat.filter(pa.array(take)), f, spec, export), np.bincount(row[take], minlength=len(k))
    empty = np.flatnonzero(n == 0)
    ids = np.insert(ids, (np.cumsum(n) - n)[empty], spec["ids"]["missing"])
    return ids, np.maximum(n, 1).astype(np.int32)


def main(export: Path, path: str, out=None) -> None:
    spec = json.loads((export / "preprocess.json").read_text())
    t = read(spec["raw"], path, sorted({f["source"] for f in spec["dense"] + spec["sparse"]}))
    dense = np.zeros((t.num_rows, len(spec["dense"])), np.float32)
    for j, f in enumerate(spec["dense"]):
        x = t[f["source"]].to_numpy().astype(np.float32)
        x[np.isnan(x)] = f["fill"]
        dense[:, j] = np.copysign(np.log1p(np.abs(x)), x) if f["transform"] == "log" else x
    values, lengths = [], []   # per feature: ids and bag lengths
    for f in spec["sparse"]:
        k = text(t[f["source"]].combine_chunks(), f).cast(pa.string())
        v, n = bags(k, f, spec, export) if "multi" in f else (ids_of(k, f, spec, export), None)
        values.append(v)
        lengths.append(np.ones(t.num_rows, np.int32) if n is None else n)
    jagged = [i["name"] for i in spec["program"]["inputs"]] == ["dense", "values", "lengths"]
    ids = (np.concatenate(values), np.concatenate(lengths)) if jagged else (np.stack(values, 1),)
    model = torch.export.load(str(export / spec["program"]["torch_export"])).module()
    with torch.no_grad():
        p = model(torch.from_numpy(dense), *map(torch.from_numpy, ids)).numpy()
    np.savetxt(out or sys.stdout, p, fmt="%.9g")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:4])
