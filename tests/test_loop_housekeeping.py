"""Small pieces of the shared training loop (training/common.py) that need no training run."""
import math

import pytest

from data.loader import make_loader
from training.common import LRPlan, check_epoch, total_steps
from utils.config import TrainConfig
from utils.dist import DistInfo
from utils.errors import UserError
from utils.train_utils import lr_multiplier


class _Deadline:
    def __init__(self, minutes):
        self.minutes, self.end = minutes, math.inf


def test_fewer_than_one_batch_is_one_message_from_both_checks():
    """check_epoch (before any model is built) and make_loader refuse with the same text."""
    tcfg = TrainConfig(batch_size=4)
    with pytest.raises(UserError) as early:
        check_epoch(6, tcfg, DistInfo(0, 2, 0))
    with pytest.raises(UserError) as loader:
        make_loader(list(range(6)), 4, shuffle=False, seed=0, rank=0, world_size=2)
    assert str(early.value) == str(loader.value)
    assert "6 items (3 per process over 2 processes), fewer than one batch of 4" in str(early.value)


def test_total_steps_is_epochs_or_max_steps_whichever_is_fewer():
    assert total_steps(TrainConfig(epochs=3, max_steps=None), 10) == 30
    assert total_steps(TrainConfig(epochs=3, max_steps=12), 10) == 12
    assert total_steps(TrainConfig(epochs=3, max_steps=100), 10) == 30


def test_undecided_plan_is_exactly_the_step_schedule():
    tcfg = TrainConfig(warmup_steps=3, lr_schedule="cosine", min_lr_ratio=0.1)
    plan = LRPlan(tcfg, 50, _Deadline(10.0))
    assert [plan.multiplier(k) for k in range(60)] == [
        lr_multiplier(k, warmup_steps=3, total_steps=50, schedule="cosine", min_lr_ratio=0.1)
        for k in range(60)]


def test_a_saved_plan_is_kept_only_for_the_same_budget():
    class _Log:
        def __init__(self):
            self.lines = []

        def info(self, msg, echo=True):
            self.lines.append(msg)
    tcfg = TrainConfig(warmup_steps=0)
    saved = {"end_step": 30, "decided_at": 8, "total_steps": 100, "time_limit_minutes": 10.0}
    same = LRPlan(tcfg, 100, _Deadline(10.0))
    same.load_state_dict(saved, _Log())
    assert (same.end_step, same.decided_at, same.undecided) == (30, 8, False)
    for minutes, total in ((20.0, 100), (10.0, 200), (None, 100)):
        log, plan = _Log(), LRPlan(tcfg, total, _Deadline(minutes))
        plan.load_state_dict(saved, log)
        assert plan.end_step == total and plan.decided_at is None
        assert "the plan is made again" in log.lines[0]
