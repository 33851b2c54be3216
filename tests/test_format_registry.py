"""A plug-in raw format, registered by name, is read like a built-in one (ctrkit.registry.FORMATS)."""
import numpy as np
import pytest

from ctrkit.config import load_config
from ctrkit.data.formats import Feature, Format, Layout
from ctrkit.data.preprocess import prepare
from ctrkit.data.shards import load_shard
from ctrkit.errors import DataError
from ctrkit.registry import FORMATS


def _user_item(cfg, delim, header, names, path, hint):
    """A headerless `clicked<TAB>user<TAB>item` file: two categorical features."""
    if header:
        raise DataError(path, "user_item files have no header", line=1)
    feats = [Feature(name=c, kind="categorical", source=c, min_count=cfg.min_count)
             for c in ("user", "item")]
    return Layout("user_item", delim, False, ["clicked", "user", "item"], "clicked", feats,
                  string_sources=["user", "item"], quoting=False)


@pytest.fixture
def user_item_format():
    FORMATS.register("user_item")(Format(_user_item, delimiter="\t", label="clicked"))
    yield
    FORMATS.unregister("user_item")


def test_a_registered_format_prepares(user_item_format, tmp_path):
    rows = ["1\tu1\ti1", "0\tu2\ti1", "1\tu1\ti2", "0\tu3\t"]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, ["data.format=user_item", f"data.train={tmp_path / 'train.tsv'}",
                             "data.header=false", f"data.prepared_dir={tmp_path / 'prep'}"])
    schema = prepare(cfg, progress=False)
    assert [(f.name, f.kind, f.vocab_size) for f in schema.features] == \
        [("user", "sparse", 5), ("item", "sparse", 4)]
    shard = load_shard(schema.root, schema.splits["train"].shards[0])
    assert shard.labels.tolist() == [1, 0, 1, 0]
    # ids 2.. by count (u1 twice first), 1 for the missing item
    assert np.asarray(shard.sparse).tolist() == [[2, 2], [3, 2], [2, 3], [4, 1]]


def test_an_unknown_format_names_the_known_ones():
    with pytest.raises(Exception, match="unknown format 'user_item'.*criteo_tsv"):
        load_config(None, ["data.format=user_item"])
