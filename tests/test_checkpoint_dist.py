"""Checksums and verification on 2 gloo ranks (megasynth/checkpoint.py): each rank hashes a share of the
files, and every rank reaches the same verdict on a damaged shard written by another rank."""

import json

import torch
import xxhash
from dist import run_on_ranks
from helpers import tiny_config

from megasynth import checkpoint as ck
from megasynth.model import build_model
from megasynth.parallelize import parallelize_model


def save_damage_and_reload(root: str) -> dict:
    from pathlib import Path  # noqa: PLC0415

    import torch.distributed as dist  # noqa: PLC0415

    from megasynth.distributed import init_distributed  # noqa: PLC0415

    info = init_distributed(1, "cpu")
    cfg = tiny_config(root, root)
    model = parallelize_model(build_model(cfg.model, info.device, seed=0), info, cfg.parallel, torch.float32)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        ck.save_checkpoint(Path(root), step, model=model, optimizer=opt, parts={"progress": {"step": step}},
                           cfg=cfg, meta={})
    newest = Path(root) / "step_00000002"
    if dist.get_rank() == 0:  # damage the shard rank 1 wrote
        data = bytearray((newest / "__1_0.distcp").read_bytes())
        data[100:4196] = bytes(b ^ 0xFF for b in data[100:4196])
        (newest / "__1_0.distcp").write_bytes(bytes(data))
    dist.barrier()
    said = []
    found = ck.find_latest_intact(root, say=said.append)
    parts = ck.load_checkpoint(found, model=model, optimizer=opt)
    return {"found": str(found), "said": said, "progress": parts["progress"]}


def test_each_rank_hashes_a_share_and_all_ranks_agree_on_damage(tmp_path):
    root = tmp_path / "ckpt"
    results = run_on_ranks(save_damage_and_reload, 2, str(root), timeout=180)
    meta = json.loads((root / "step_00000001" / "meta.json").read_text())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "config.toml"} <= set(meta["files"])
    for name, rec in meta["files"].items():  # every rank's shard, hashed by whichever rank, checked here alone
        data = (root / "step_00000001" / name).read_bytes()
        assert rec == {"bytes": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}, name
    for r in results:
        assert r["found"] == str(root / "step_00000001") and r["progress"] == {"step": 1}
        assert "step_00000002: damaged checkpoint: __1_0.distcp: checksum mismatch" in r["said"][0]
