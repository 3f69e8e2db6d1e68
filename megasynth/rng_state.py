"""The random generator states of every rank, as JSON-safe values (a checkpoint's "rng" part).

    parts["rng"] = gather_rng_states()        # {"rank_R": rng_state()}; every rank calls it
    set_rng_state(parts["rng"]["rank_0"])     # Python, numpy, torch CPU and CUDA generators
"""

from __future__ import annotations

import base64
import random

import numpy as np
import torch

from megasynth.distributed import all_gather_object


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's Python, numpy, torch CPU and CUDA generator states, as JSON-safe values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def gather_rng_states() -> dict[str, dict]:
    """{"rank_R": rng_state()} for every rank (identical on every rank, so DCP stores it once)."""
    return {f"rank_{r}": s for r, s in enumerate(all_gather_object(rng_state()))}
