"""DCP checkpoints: round trips, atomicity, pruning, weights-only loading (megasynth/checkpoint.py)."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config

from megasynth import checkpoint as ck
from megasynth.model import Transformer
from megasynth.rng_state import rng_state, set_rng_state


@pytest.fixture
def cfg(tmp_path):
    return tiny_config(tmp_path / "run", tmp_path / "unused")


def trained(cfg, seed=0, steps=2):
    """A tiny model and an AdamW that has taken `steps` steps (so it has moment estimates)."""
    model = Transformer(cfg.model)
    model.init_weights(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=gen)
        model(x, x).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save(cfg, root, step, model, opt, keep_last=0, parts=None):
    return ck.save_checkpoint(root, step, model=model, optimizer=opt, cfg=cfg, keep_last=keep_last,
                              parts=parts or {"progress": {"step": step}}, meta={"tokens": 10 * step})


def test_round_trip_restores_model_optimizer_and_parts(cfg, tmp_path):
    model, opt = trained(cfg)
    parts = {"scheduler": {"last_epoch": 2}, "data": {"consumed_samples": 16}, "progress": {"step": 2},
             "rng": {"rank_0": rng_state()}}
    path = save(cfg, tmp_path / "ckpt", 2, model, opt, parts=parts)
    assert path.name == "step_00000002"
    assert {"config.toml", "meta.json", ".metadata"} <= {p.name for p in path.iterdir()}
    meta = ck.read_meta(path)
    assert meta["complete"] is True and meta["step"] == 2 and meta["tokens"] == 20

    other, other_opt = trained(cfg, seed=1, steps=1)
    loaded = ck.load_checkpoint(tmp_path / "ckpt", model=other, optimizer=other_opt)
    assert loaded == parts
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.lm_head.weight is other.embed_tokens.weight  # tied weights stay tied
    saved_state, loaded_state = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert saved_state.keys() == loaded_state.keys()
    for k in saved_state:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved_state[k][field], loaded_state[k][field]), (k, field)


def test_load_for_inference_gives_identical_logits(cfg, tmp_path):
    model, opt = trained(cfg)
    run_dir = tmp_path / "run"
    save(cfg, run_dir / "checkpoints", 2, model, opt)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    expected = model(x)
    for where in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "step_00000002"):
        loaded, loaded_cfg = ck.load_for_inference(where)
        assert loaded_cfg.model == cfg.model and not loaded.training
        assert torch.equal(loaded(x), expected)
    bf16, _ = ck.load_for_inference(run_dir, dtype=torch.bfloat16)
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16))


def test_weights_only_checkpoint_round_trip(cfg, tmp_path):
    model, _ = trained(cfg)
    path = ck.save_model_checkpoint(model, cfg, tmp_path / "export" / "step_00000007", meta={"step": 7})
    assert ck.read_meta(path)["weights_only"] is True and ck.find_latest(tmp_path / "export") == path
    fresh = Transformer(cfg.model)
    fresh.init_weights(5)
    ck.load_model_weights(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    x = torch.arange(16)[None] % cfg.model.vocab_size
    assert torch.equal(ck.load_for_inference(path)[0](x), model(x))


SAVE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, sys, torch
sys.path.insert(0, {tests!r})
from helpers import tiny_config
from megasynth import checkpoint as ck
from megasynth.model import Transformer
cfg = tiny_config({run!r}, "unused")
model = Transformer(cfg.model)
model.init_weights(0)
opt = torch.optim.AdamW(model.parameters())
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))  # shards are ~80 KB: they fail
try:
    ck.save_checkpoint({root!r}, 8, model=model, optimizer=opt, parts={{}}, cfg=cfg, meta={{}})
except ck.CheckpointSaveError as e:
    print(e)
    sys.exit(4)
"""


def test_a_failed_save_removes_its_temp_dir_and_leaves_the_previous_checkpoint_latest(cfg, tmp_path):
    root = tmp_path / "ckpt"
    model, opt = trained(cfg)
    first = save(cfg, root, 4, model, opt)
    # A real write failure, not a mock: the shard write hits the process's file size limit (EFBIG, the
    # stand-in for ENOSPC that needs no root and no small filesystem).
    script = SAVE_UNDER_A_FILE_SIZE_LIMIT.format(tests=str(Path(__file__).parent), run=str(tmp_path / "run"),
                                                root=str(root))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 4, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line
    assert line.startswith(f"cannot save checkpoint {root / 'step_00000008'}: File too large")
    assert re.search(r"it needs about [\d.]+ MB, [\d.]+ [MG]B free there", line), line
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]  # no temp directory left
    assert ck.find_latest(root) == first and ck.verify_checkpoint(first) == first


def test_incomplete_and_temp_directories_are_never_latest(cfg, tmp_path):
    root = tmp_path / "ckpt"
    model, opt = trained(cfg)
    good = save(cfg, root, 3, model, opt)
    (root / "step_00000009.tmp-abc").mkdir()
    incomplete = root / "step_00000010"
    incomplete.mkdir()
    (incomplete / "meta.json").write_text(json.dumps({"step": 10}))
    (root / "step_00000011").mkdir()  # no meta.json at all
    assert ck.find_latest(root) == good
    assert [s for s, _ in ck.list_checkpoints(root)] == [3]
    with pytest.raises(ck.CheckpointError, match="incomplete checkpoint"):
        ck.resolve_checkpoint(incomplete)
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint"):
        ck.resolve_checkpoint(tmp_path / "nowhere")


def test_keep_last_prunes_the_oldest(cfg, tmp_path):
    root = tmp_path / "ckpt"
    model, opt = trained(cfg, steps=1)
    for step in range(1, 6):
        save(cfg, root, step, model, opt, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]
    save(cfg, root, 6, model, opt, keep_last=0)  # 0 keeps everything
    assert len(ck.list_checkpoints(root)) == 3


def test_mismatched_model_is_a_clear_error(cfg, tmp_path):
    model, opt = trained(cfg)
    save(cfg, tmp_path / "ckpt", 1, model, opt)
    bigger_cfg = tiny_config(tmp_path / "run", tmp_path / "unused", **{"model.dim": 64})
    bigger, bigger_opt = trained(bigger_cfg, steps=0)
    with pytest.raises(ck.CheckpointError, match=r"step_00000001: cannot load .*Size mismatch.*embed_tokens"):
        ck.load_checkpoint(tmp_path / "ckpt", model=bigger, optimizer=bigger_opt)


class Payload:
    """Not a tensor or a plain container: unpickling it would run arbitrary code."""


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    ck._dcp(ck.dcp.save, {"evil": Payload(), "w": torch.ones(2)}, tmp_path / "c")
    # DCP's default planner would rebuild the Payload with torch.load(weights_only=False); ours refuses.
    with pytest.raises(ck.CheckpointError, match="cannot load into this test") as refused:
        ck._dcp_load({"evil": None, "w": torch.zeros(2)}, tmp_path / "c", "into this test")
    assert isinstance(refused.value.__cause__, ck.CheckpointException)
    assert "Weights only load failed" in str(refused.value.__cause__)


def test_rng_state_round_trip():
    state = rng_state()
    json.dumps(state)  # JSON-safe: stored as a string inside the checkpoint
    draws = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(json.loads(json.dumps(state)))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == again[0] and draws[1] == again[1] and torch.equal(draws[2], again[2])
