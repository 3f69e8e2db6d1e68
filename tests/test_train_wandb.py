"""`--log.wandb=true` end to end with the installed wandb, offline (no network): the run directory holds the
offline W&B run, and a resumed run continues the same W&B run id (issue 10: it crashed on `wandb.util.generate_id`,
which current wandb releases no longer have)."""

import re

import pytest
from helpers import tiny_config, write_pattern_corpus

from megasynth.config import save_config
from megasynth.train import main

wandb = pytest.importorskip("wandb")  # in the [dev] extra


def test_an_offline_wandb_run_is_written_and_continued_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    prefix = write_pattern_corpus(tmp_path / "data" / "train")
    run_dir = tmp_path / "run"

    def run(steps):
        cfg = tiny_config(run_dir, prefix, **{"train.steps": steps})
        cfg.log.wandb, cfg.log.wandb_mode = True, "offline"
        save_config(cfg, tmp_path / "cfg.toml")
        return main(["--config", str(tmp_path / "cfg.toml")])

    assert run(2) == 0
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{12}", run_id)
    assert run(4) == 0  # resumes from step 2's checkpoint
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    # wandb's service process writes the run files; it finishes them when it shuts down (as at interpreter exit).
    wandb.teardown()
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), runs
    for name in runs:
        data = (run_dir / "wandb" / name / f"run-{run_id}.wandb").read_bytes()
        assert b"train/loss" in data  # the history records are in the run file (protobuf keeps keys as text)
