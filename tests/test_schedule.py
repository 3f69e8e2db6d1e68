"""LR schedules against hand-computed values (megasynth/schedule.py)."""

import math

import pytest
import torch

from megasynth.config import OptimConfig
from megasynth.schedule import build_lr_scheduler, lr_factor


def f(step, **kw):
    args = {"total_steps": 14, "warmup_steps": 4, "schedule": "cosine", "min_lr_ratio": 0.1, **kw}
    return lr_factor(step, **args)


def test_linear_warmup_reaches_the_peak_on_its_last_step():
    # (step + 1) / W: the first step already moves, step W - 1 runs at the peak.
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_endpoints_and_midpoint():
    # p = (step - 4) / (14 - 4): p = 0 -> 1, p = 0.5 -> 0.1 + 0.9 * 0.5 = 0.55, p = 1 -> 0.1 (and it stays there).
    assert f(4) == pytest.approx(1.0, abs=1e-15)
    assert f(9) == pytest.approx(0.55, abs=1e-15)
    assert f(14) == pytest.approx(0.1, abs=1e-15)
    assert f(100) == pytest.approx(0.1, abs=1e-15)
    # T = 12: step 6 is p = 2/8 = 0.25, i.e. 0.1 + 0.9 * (1 + cos(pi/4)) / 2, written out by hand.
    assert f(6, total_steps=12) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)), abs=1e-12)
    decay = [f(s) for s in range(4, 15)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_wsd_phases():
    # T = 20, W = 2, decay over the last 25% = 5 steps: stable on steps 2..14, linear from step 15 to 20.
    kw = {"total_steps": 20, "warmup_steps": 2, "schedule": "wsd", "decay_fraction": 0.25}
    assert [f(s, **kw) for s in (0, 1)] == [0.5, 1.0]
    assert all(f(s, **kw) == 1.0 for s in range(2, 16))
    assert f(17, **kw) == pytest.approx(1 - 0.9 * 2 / 5, abs=1e-15)
    assert f(20, **kw) == pytest.approx(0.1, abs=1e-15)
    # The decay never starts inside the warmup: W = 8 with 50% decay of 10 steps decays over steps 8..10.
    kw_long = {**kw, "total_steps": 10, "warmup_steps": 8, "decay_fraction": 0.5}
    assert f(7, **kw_long) == 1.0 and f(9, **kw_long) == pytest.approx(1 - 0.9 * 0.5, abs=1e-15)


def test_constant_and_no_warmup():
    assert f(13, schedule="constant") == 1.0 and f(1000, schedule="constant") == 1.0
    assert f(0, warmup_steps=0) == 1.0
    with pytest.raises(ValueError, match="optim.schedule"):
        f(0, schedule="linear")


def test_lambda_lr_follows_the_factor_and_resumes_from_its_step():
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(lr=0.2, warmup_steps=3, min_lr_ratio=0.1)

    def lrs(scheduler, opt, n):
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        return out

    opt = torch.optim.SGD([param], lr=cfg.lr)
    sched = build_lr_scheduler(opt, cfg, total_steps=10)
    seen = lrs(sched, opt, 10)
    assert seen == pytest.approx([0.2 * lr_factor(s, total_steps=10, warmup_steps=3) for s in range(10)], rel=1e-12)

    # Resume after 4 steps: a fresh scheduler loaded from the state continues the same sequence.
    opt2 = torch.optim.SGD([param], lr=cfg.lr)
    sched2 = build_lr_scheduler(opt2, cfg, total_steps=10)
    lrs(sched2, opt2, 4)
    opt3 = torch.optim.SGD([param], lr=cfg.lr)
    sched3 = build_lr_scheduler(opt3, cfg, total_steps=10)
    sched3.load_state_dict(sched2.state_dict())
    opt3.load_state_dict(opt2.state_dict())
    assert lrs(sched3, opt3, 6) == pytest.approx(seen[4:], rel=1e-12)
    # The state holds a step counter, not the schedule's parameters (those come from the current config).
    assert sched2.state_dict()["last_epoch"] == 4 and sched2.state_dict()["lr_lambdas"] == [None]
