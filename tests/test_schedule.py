"""Learning-rate schedules: warmup and decay factors, and how they compose with the trainer."""
import math

import pytest
import torch

from ctrkit.config import ScheduleConfig
from ctrkit.optim.schedule import apply_schedule, lr_factor
from ctrkit.train.checkpoint import load_checkpoint
from ctrkit.train.logging import read_metrics
from ctrkit.train.run import train
from tests.test_train import CRITEO_DATA


def test_factors():
    cos = ScheduleConfig(name="cosine", warmup_steps=10, final_ratio=0.1)
    assert [lr_factor(cos, t, 110) for t in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert math.isclose(lr_factor(cos, 60, 110), 0.55)              # halfway down the cosine
    assert math.isclose(lr_factor(cos, 110, 110), 0.1) and math.isclose(lr_factor(cos, 500, 110), 0.1)
    lin = ScheduleConfig(name="linear", final_ratio=0.0)
    assert math.isclose(lr_factor(lin, 25, 100), 0.75)
    assert lr_factor(ScheduleConfig(), 7, 100) == 1.0


def test_apply_keeps_what_plateau_cut():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = ScheduleConfig(name="linear", final_ratio=0.0)
    apply_schedule([opt], cfg, 0, 10)
    opt.param_groups[0]["lr"] *= 0.1                                  # an LR-on-plateau cut
    for t in range(1, 6):
        apply_schedule([opt], cfg, t, 10)
    assert math.isclose(opt.param_groups[0]["lr"], 0.1 * lr_factor(cfg, 5, 10))


def test_a_decay_to_zero_holds_past_its_end():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = ScheduleConfig(name="linear", final_ratio=0.0)
    for t in range(15):                                               # total_steps 10 < run length
        apply_schedule([opt], cfg, t, 10)
    assert opt.param_groups[0]["lr"] == 0.0


@pytest.mark.shared_data
def test_trainer_follows_the_schedule_and_resumes_on_it(make_cfg, tmp_path):
    common = ("optimizer.schedule.name=cosine", "optimizer.schedule.warmup_steps=3",
              "optimizer.schedule.final_ratio=0.2", "model.hidden_units=[32,16]")
    kw = {"batch_size": 512, "epochs": 2, "eval_every": 5, "shuffle": True, "log_every": 1}
    full = make_cfg(CRITEO_DATA, *common, f"train.run_dir={tmp_path / 'full'}", train=kw)
    train(full)
    lrs = {int(r["step"]): float(r["lr"]) for r in read_metrics(tmp_path / "full")
           if r["split"] == "train"}
    cfg = full.optimizer.schedule
    total = max(lrs)                                                  # 2 epochs x 15 steps
    for step, lr in lrs.items():   # the lr logged after step s is the one step s used (index s - 1)
        assert math.isclose(lr, 1e-3 * lr_factor(cfg, step - 1, total), rel_tol=1e-9), step
    part = make_cfg(CRITEO_DATA, *common, f"train.run_dir={tmp_path / 'part'}", "train.max_steps=8",
                    train=kw)
    train(part)
    rest = make_cfg(CRITEO_DATA, *common, f"train.run_dir={tmp_path / 'part'}", "train.resume=true",
                    train=kw)
    train(rest)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == total
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
