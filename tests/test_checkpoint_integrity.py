"""Checkpoint checksums, damage detection, fallback, pruning and the restricted unpickler (megasynth/checkpoint.py,
megasynth/checkpoint_verify.py, megasynth/safe_unpickle.py), on real DCP checkpoints of a tiny model."""

import io
import json
import os
import pickle

import pytest
import torch
import xxhash
from helpers import load_tool, tiny_config

from megasynth import checkpoint as ck
from megasynth.model import Transformer
from megasynth.safe_unpickle import RestrictedUnpickler, UnsafePickleError


@pytest.fixture
def cfg(tmp_path):
    return tiny_config(tmp_path / "run", tmp_path / "unused")


def trained(cfg, seed=0):
    model = Transformer(cfg.model)
    model.init_weights(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(x, x).backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def save(cfg, root, step, model, opt, keep_last=0):
    return ck.save_checkpoint(root, step, model=model, optimizer=opt, cfg=cfg, keep_last=keep_last,
                              parts={"progress": {"step": step}}, meta={"tokens": 10 * step})


def shard(path):
    return min(path.glob("*.distcp"))


def flip(path, offset=0, length=4096):
    """Invert `length` bytes of a file from `offset` (clamped to the file), in place."""
    data = bytearray(path.read_bytes())
    end = min(len(data), offset + length)
    data[offset:end] = bytes(b ^ 0xFF for b in data[offset:end])
    path.write_bytes(bytes(data))


def test_meta_json_records_every_file_with_its_checksum(cfg, tmp_path):
    model, opt = trained(cfg)
    path = save(cfg, tmp_path / "ckpt", 1, model, opt)
    meta = ck.read_meta(path)
    on_disk = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != "meta.json")
    assert meta["checksum"] == "xxh3_64" and sorted(meta["files"]) == on_disk
    assert ".metadata" in on_disk and "config.toml" in on_disk and any(n.endswith(".distcp") for n in on_disk)
    for name, rec in meta["files"].items():  # an independent one-shot hash of each file
        data = (path / name).read_bytes()
        assert rec == {"bytes": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}, name
    assert ck.verify_checkpoint(path) == path


@pytest.mark.parametrize("damage, expected", [
    (lambda p: flip(shard(p), 200), r"__0_0\.distcp: checksum mismatch"),
    (lambda p: os.truncate(shard(p), shard(p).stat().st_size // 2), r"__0_0\.distcp: \d+ bytes, expected \d+ \(truncated\)"),
    (lambda p: (p / ".metadata").unlink(), r"\.metadata: missing"),
    (lambda p: flip(p / "config.toml", 0, 8), r"config\.toml: checksum mismatch"),
])
def test_every_load_path_refuses_a_damaged_checkpoint_naming_the_file(cfg, tmp_path, damage, expected):
    model, opt = trained(cfg)
    path = save(cfg, tmp_path / "run" / "checkpoints", 2, model, opt)
    damage(path)
    with pytest.raises(ck.DamagedCheckpointError, match=rf"step_00000002: damaged checkpoint: {expected}"):
        ck.verify_checkpoint(path)
    fresh, fresh_opt = trained(cfg, seed=1)
    for load in (lambda: ck.load_checkpoint(path, model=fresh, optimizer=fresh_opt),
                 lambda: ck.load_model_weights(fresh, path),
                 lambda: ck.load_for_inference(tmp_path / "run")):
        with pytest.raises(ck.DamagedCheckpointError, match=expected) as info:
            load()
        assert "cannot load into" not in str(info.value)


def test_fallback_to_the_newest_intact_checkpoint_and_pruning_keeps_it(cfg, tmp_path):
    root = tmp_path / "ckpt"
    model, opt = trained(cfg)
    for step in (2, 4, 6):
        save(cfg, root, step, model, opt)
    flip(shard(root / "step_00000006"), 1000)
    said = []
    assert ck.find_latest_intact(root, say=said.append) == root / "step_00000004"
    assert "step_00000006: damaged checkpoint: __0_0.distcp: checksum mismatch" in said[0]
    assert said[1].startswith(f"warning: falling back to {root / 'step_00000004'}")
    # A save at step 5 with keep_last=1: the newest-numbered (damaged) one is kept by count, and the one just
    # saved, the newest verified, is kept as well; only the older ones go.
    save(cfg, root, 5, model, opt, keep_last=1)
    assert [s for s, _ in ck.list_checkpoints(root)] == [5, 6]
    assert ck.find_latest_intact(root, say=said.append) == root / "step_00000005"
    flip(shard(root / "step_00000005"), 1000)
    with pytest.raises(ck.CheckpointError, match="every checkpoint is damaged"):
        ck.find_latest_intact(root, say=said.append)
    assert ck.find_latest_intact(tmp_path / "empty", say=said.append) is None


def test_unreadable_meta_json_is_reported_not_silently_skipped(cfg, tmp_path):
    root = tmp_path / "ckpt"
    model, opt = trained(cfg)
    save(cfg, root, 1, model, opt)
    save(cfg, root, 2, model, opt)
    flip(root / "step_00000002" / "meta.json", 10, 20)
    said = []
    assert ck.find_latest_intact(root, say=said.append) == root / "step_00000001"
    assert "step_00000002: damaged checkpoint: meta.json" in said[0]
    with pytest.raises(ck.DamagedCheckpointError, match="meta.json"):
        ck.resolve_checkpoint(root / "step_00000002")


def test_a_checkpoint_without_checksums_loads_with_a_warning(cfg, tmp_path, capsys):
    model, opt = trained(cfg)
    path = save(cfg, tmp_path / "ckpt", 3, model, opt)
    meta = ck.read_meta(path)
    del meta["files"], meta["checksum"]  # what a save before checksums wrote
    (path / "meta.json").write_text(json.dumps(meta))
    fresh, fresh_opt = trained(cfg, seed=1)
    assert ck.load_checkpoint(path, model=fresh, optimizer=fresh_opt)["progress"] == {"step": 3}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert "records no checksums (saved by an older megasynth); loading it unverified" in capsys.readouterr().err
    (path / ".metadata").unlink()
    with pytest.raises(ck.DamagedCheckpointError, match=r"\.metadata: missing"):
        ck.load_checkpoint(path, model=fresh, optimizer=fresh_opt)


def test_stale_temp_directories_of_both_namings_are_removed(cfg, tmp_path):
    root = tmp_path / "ckpt"
    model, opt = trained(cfg)
    good = save(cfg, root, 1, model, opt)
    stale = [root / ".step_00000002.tmp-123-abcdef", root / "step_00000003.tmp-0a1b2c", root / ".x.tmp-deleting-9"]
    for d in stale:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "__0_0.distcp").write_bytes(b"\0" * 100)
    assert sorted(ck.remove_stale_saves(root)) == sorted(stale)
    assert sorted(p.name for p in root.iterdir()) == [good.name]


# ----------------------------------------------------------------------------------------------- no code from files


class Exploit:
    """Unpickling this runs a shell command that creates a marker file (what an attacker's .metadata does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_exploit(path, marker):
    """Replace a checkpoint's .metadata with the exploit and fix up meta.json's checksum, as an attacker would."""
    (path / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))
    meta = ck.read_meta(path)
    data = (path / ".metadata").read_bytes()
    meta["files"][".metadata"] = {"bytes": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}
    (path / "meta.json").write_text(json.dumps(meta))


def test_a_malicious_metadata_runs_nothing_on_any_load_path(cfg, tmp_path):
    model, opt = trained(cfg)
    path = save(cfg, tmp_path / "run" / "checkpoints", 1, model, opt)
    marker = tmp_path / "pwned"
    plant_exploit(path, marker)
    pickle.loads(pickle.dumps(Exploit(tmp_path / "control")))  # the exploit does work when unpickled plainly
    assert (tmp_path / "control").exists()
    fresh, fresh_opt = trained(cfg, seed=1)
    for load in (lambda: ck.load_checkpoint(path, model=fresh, optimizer=fresh_opt),
                 lambda: ck.load_model_weights(fresh, path),
                 lambda: ck.load_for_inference(tmp_path / "run")):
        with pytest.raises(ck.CheckpointError, match=rf"refusing to unpickle posix\.system from {path / '.metadata'}"):
            load()
    assert not marker.exists()


def test_the_allow_list_reads_real_metadata_and_nothing_else(cfg, tmp_path):
    model, opt = trained(cfg)
    path = save(cfg, tmp_path / "ckpt", 1, model, opt)
    with open(path / ".metadata", "rb") as f:
        safe = RestrictedUnpickler(f, path / ".metadata").load()
    with open(path / ".metadata", "rb") as f:
        assert safe == pickle.load(f)  # the same object as DCP's own (unrestricted) reader builds
    for payload in (pickle.dumps(Exploit("x")), pickle.dumps(getattr), pickle.dumps(torch.nn.Linear)):
        with pytest.raises(UnsafePickleError, match="refusing to unpickle"):
            RestrictedUnpickler(io.BytesIO(payload)).load()


def test_export_cli_refuses_damaged_and_malicious_checkpoints_in_one_line(cfg, tmp_path, capsys):
    export = load_tool("export_hf")
    model, opt = trained(cfg)
    path = save(cfg, tmp_path / "run" / "checkpoints", 1, model, opt)
    argv = ["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf"), "--no-tokenizer"]
    flip(shard(path), 64)
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: damaged checkpoint: __0_0.distcp: checksum mismatch") and err.count("\n") == 1
    save(cfg, tmp_path / "run" / "checkpoints", 1, model, opt)  # the same step again replaces the damaged one
    marker = tmp_path / "pwned"
    plant_exploit(path, marker)
    assert export.main(argv) == 2
    assert f"refusing to unpickle posix.system from {path / '.metadata'}" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "hf").exists()
