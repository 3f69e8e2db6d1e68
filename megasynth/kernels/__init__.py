"""Triton kernels, each beside its PyTorch reference with the same signature. Import as `megasynth.kernels`.

Every public function dispatches: Triton on CUDA tensors, the reference elsewhere; MEGASYNTH_KERNELS=triton or
=reference forces either (see _dispatch.py).

The kernel modules live in the repository's top-level `kernels/` folder, which has no `__init__.py` on purpose:
Hugging Face publishes a package named `kernels` that transformers imports, and a regular package `kernels/` at
the repository root would shadow it for any Python started there (`python -m pytest`, a REPL, a notebook). A
folder without `__init__.py` is at most a namespace portion, which loses to a regular package wherever it sits
on sys.path. This file makes that folder the body of `megasynth.kernels`: from a checkout (editable install or
the root on sys.path) its path is added below; an installed wheel carries the modules here (setup.py).
"""

import os as _os

_HERE = _os.path.dirname(_os.path.abspath(__file__))
_CHECKOUT_KERNELS = _os.path.join(_os.path.dirname(_os.path.dirname(_HERE)), "kernels")
# `_launch.py` marks our kernel folder: never adopt another project's `kernels/` that happens to sit beside an
# installed megasynth (site-packages holds Hugging Face's).
if not _os.path.exists(_os.path.join(_HERE, "_launch.py")) and _os.path.exists(
        _os.path.join(_CHECKOUT_KERNELS, "_launch.py")):
    __path__.append(_CHECKOUT_KERNELS)

from .attention import qknorm_rope_attention, qknorm_rope_attention_ref
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .flash_attention import flash_attention, flash_attention_ref
from .qknorm_rope import qknorm_rope, qknorm_rope_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rope import apply_rope_ref, rope_cos_sin
from .swiglu import swiglu, swiglu_ref

__all__ = [
    "apply_rope_ref",
    "flash_attention",
    "flash_attention_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "qknorm_rope",
    "qknorm_rope_attention",
    "qknorm_rope_attention_ref",
    "qknorm_rope_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope_cos_sin",
    "swiglu",
    "swiglu_ref",
]
