import logging
from pathlib import Path

import pytest

logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO = SHARED / "criteo"
AVAZU = SHARED / "avazu"
LAPIS_CRITEO = CRITEO / "Lapis-Hong_Wide-ResDNN"
LAPIS_AVAZU = AVAZU / "Lapis-Hong_Wide-ResDNN"


def pytest_collection_modifyitems(config, items):
    if not SHARED.is_dir():
        skip = pytest.mark.skip(reason=f"{SHARED} not present")
        for it in items:
            if "shared_data" in it.keywords:
                it.add_marker(skip)


def count_lines(path: Path, header: bool = False) -> int:
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    return n - (1 if header else 0)


@pytest.fixture
def make_cfg(tmp_path):
    """Build a Config from a nested dict plus overrides, rooted in tmp_path."""
    from ctrkit.config import load_config

    def make(data: dict, *overrides: str, **sections):
        import yaml
        tree = {"data": {"prepared_dir": str(tmp_path / "prepared"), **data},
                "train": {"run_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False,
                          "plot": False, "threads": 1, "device": "cpu",
                          **sections.pop("train", {})}}
        tree.update(sections)
        p = tmp_path / "cfg.yaml"
        p.write_text(yaml.safe_dump(tree))
        return load_config(p, list(overrides))
    return make
