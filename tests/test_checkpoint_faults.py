"""The trainer under checkpoint faults (megasynth/train.py + megasynth/checkpoint.py): a damaged newest
checkpoint, an explicit resume of a damaged one, a malicious .metadata given as init_from, a disk that fills
up during a save, and temp directories left by crashed saves.

Runs call `main()` in-process, except the disk-full run, which is a process of its own with a file size limit.
"""

import json
import os
import pickle
import re
import resource
from pathlib import Path

import pytest
import xxhash
from dist import start_process
from helpers import tiny_config, write_pattern_corpus

from megasynth import checkpoint
from megasynth.config import save_config
from megasynth.metrics import read_metrics
from megasynth.train import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_pattern_corpus(tmp_path_factory.mktemp("corpus") / "train")


def config_file(tmp_path, corpus, name="run", **overrides) -> Path:
    cfg = tiny_config(tmp_path / name, corpus, **overrides)
    path = tmp_path / f"{name}-{len(list(tmp_path.glob(f'{name}-*.toml')))}.toml"
    save_config(cfg, path)
    return path


def run(tmp_path, corpus, name="run", **overrides) -> int:
    return main(["--config", str(config_file(tmp_path, corpus, name, **overrides))])


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def steps(run_dir) -> list[int]:
    return [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")]


def flip_4k(path: Path, offset: int = 512) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + 4096] = bytes(b ^ 0xFF for b in data[offset:offset + 4096])
    path.write_bytes(bytes(data))


def shard(step_dir: Path) -> Path:
    return min(step_dir.glob("*.distcp"))


def test_a_damaged_newest_checkpoint_falls_back_and_the_intact_one_survives(tmp_path, corpus, capsys, monkeypatch):
    common = {"train.steps": 6, "train.checkpoint_every": 2, "train.keep_last": 3}
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert run(tmp_path, corpus, **common) == 0
    assert steps(run_dir) == [2, 4, 6]
    whole = losses(run_dir)
    flip_4k(shard(ckpts / "step_00000006"))
    capsys.readouterr()

    # An explicit resume of the damaged checkpoint never falls back: exit 2, naming the file and the fault.
    assert run(tmp_path, corpus, **common, **{"train.resume": str(ckpts / "step_00000006")}) == 2
    err = capsys.readouterr().err
    assert f"{ckpts / 'step_00000006'}: damaged checkpoint: __0_0.distcp: checksum mismatch" in err
    assert "cannot load into" not in err

    # resume=auto falls back to step 4, saying so. This run saves every step, keeps only the newest one, and
    # stops at step 6 (a non-finite loss, before it could replace the damaged step 6): the step-5 checkpoint
    # it saved, the newest verified one, must survive pruning although step 6 is the newest by number.
    monkeypatch.setenv("MEGASYNTH_FAULT_NAN_AT_STEP", "6")
    assert run(tmp_path, corpus, **{**common, "train.checkpoint_every": 1, "train.keep_last": 1,
                                     "train.max_nonfinite_steps": 1}) == 3
    out = capsys.readouterr().out
    assert "step_00000006: damaged checkpoint: __0_0.distcp: checksum mismatch" in out
    assert f"falling back to {ckpts / 'step_00000004'}, the newest intact checkpoint" in out
    assert f"resumed from {ckpts / 'step_00000004'} at step 4" in out
    assert steps(run_dir) == [5, 6]
    assert checkpoint.verify_checkpoint(ckpts / "step_00000005")
    assert losses(run_dir)[5] == whole[5]  # the same numbers as the uninterrupted run, not garbage

    monkeypatch.delenv("MEGASYNTH_FAULT_NAN_AT_STEP")
    assert run(tmp_path, corpus, **common) == 0
    out = capsys.readouterr().out
    assert f"falling back to {ckpts / 'step_00000005'}" in out
    assert {s: losses(run_dir)[s] for s in (5, 6)} == {5: whole[5], 6: whole[6]}
    assert steps(run_dir) == [5, 6] and checkpoint.verify_checkpoint(ckpts / "step_00000006")


@pytest.mark.parametrize("damage, expected", [
    (lambda p: os.truncate(shard(p), 1000), r"__0_0\.distcp: 1000 bytes, expected \d+ \(truncated\)"),
    (lambda p: (p / ".metadata").unlink(), r"\.metadata: missing"),
])
def test_a_truncated_shard_or_missing_metadata_is_named(tmp_path, corpus, capsys, damage, expected):
    common = {"train.steps": 2, "train.checkpoint_every": 1}
    assert run(tmp_path, corpus, **common) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    damage(ckpts / "step_00000002")
    capsys.readouterr()
    assert run(tmp_path, corpus, **common, **{"train.resume": str(ckpts / "step_00000002")}) == 2
    err = capsys.readouterr().err
    assert re.search(rf"step_00000002: damaged checkpoint: {expected}", err), err
    assert "cannot load into" not in err
    assert run(tmp_path, corpus, **{**common, "train.steps": 3}) == 0  # auto: falls back to step 1
    assert f"falling back to {ckpts / 'step_00000001'}" in capsys.readouterr().out


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_init_from_and_resume_refuse_a_malicious_metadata(tmp_path, corpus, capsys):
    assert run(tmp_path, corpus, "pre", **{"train.steps": 1}) == 0
    step_dir = tmp_path / "pre" / "checkpoints" / "step_00000001"
    marker = tmp_path / "pwned"
    data = pickle.dumps(Exploit(marker))
    (step_dir / ".metadata").write_bytes(data)
    meta = json.loads((step_dir / "meta.json").read_text())  # the attacker fixes the checksum up too
    meta["files"][".metadata"] = {"bytes": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert run(tmp_path, corpus, "fine", **{"train.steps": 1, "train.init_from": str(step_dir)}) == 2
    assert f"refusing to unpickle posix.system from {step_dir / '.metadata'}" in capsys.readouterr().err
    assert run(tmp_path, corpus, "pre", **{"train.steps": 2}) == 2  # resume=auto of the same checkpoint
    assert "refusing to unpickle posix.system" in capsys.readouterr().err
    assert not marker.exists()


def train_with_a_file_size_limit(argv: list[str]) -> int:
    # Shards of the tiny model and its AdamW state are ~240 KB; metrics, configs and index caches stay far below.
    # (Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the process.)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    return main(argv)


def test_disk_full_during_a_save_stops_with_one_line_and_the_rerun_resumes(tmp_path, corpus, capsys):
    ckpts = tmp_path / "run" / "checkpoints"
    assert run(tmp_path, corpus, **{"train.steps": 4, "train.checkpoint_every": 2}) == 0
    assert steps(tmp_path / "run") == [2, 4]
    # The next save (step 6) fails for real inside DCP's writer: a file size limit makes the shard write fail
    # with EFBIG, which the trainer handles like ENOSPC (no root, no tiny filesystem needed).
    config = config_file(tmp_path, corpus, **{"train.steps": 8, "train.checkpoint_every": 2})
    full = start_process(train_with_a_file_size_limit, ["--config", str(config)], stdout=os.devnull,
                         stderr=tmp_path / "full.err")  # a process of its own: the limit is not this one's
    full.join(timeout=300)
    if full.exitcode is None:  # hung: stop it, then fail below
        full.kill()
        full.join()
    stderr = (tmp_path / "full.err").read_text()
    assert full.exitcode == 4, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"error: cannot save checkpoint {ckpts / 'step_00000006'}: File too large")
    assert re.search(r"it needs about [\d.]+ MB, [\d.]+ [MG]B free there", errors[0])
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]  # no temp dir left

    # Temp directories of saves that crashed outright (both namings) are removed at start-up.
    for stale in (ckpts / ".step_00000006.tmp-999-0123456789ab", ckpts / "step_00000007.tmp-0123abcd"):
        stale.mkdir()
        (stale / "__0_0.distcp").write_bytes(b"\0" * 1000)
    capsys.readouterr()
    assert main(["--config", str(config)]) == 0  # the same command, without the limit
    assert f"resumed from {ckpts / 'step_00000004'} at step 4" in capsys.readouterr().out
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step_0000000{s}" for s in (2, 4, 6, 8)]
