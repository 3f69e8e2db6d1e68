"""Triton kernels, each beside its PyTorch reference with the same signature. Import as `megasynth.kernels`.

The modules live in the top-level `kernels/` folder, added to this package's path below (why: docs/kernels.md).
"""

import os as _os

_HERE = _os.path.dirname(_os.path.abspath(__file__))
_CHECKOUT_KERNELS = _os.path.join(_os.path.dirname(_os.path.dirname(_HERE)), "kernels")
# `_launch.py` marks our kernel folder, not another project's `kernels/` beside an installed megasynth.
if not _os.path.exists(_os.path.join(_HERE, "_launch.py")) and _os.path.exists(
        _os.path.join(_CHECKOUT_KERNELS, "_launch.py")):
    __path__.append(_CHECKOUT_KERNELS)

from .attention import qknorm_rope_attention, qknorm_rope_attention_ref
from .attention_core import flash_attention_ref, run_core, select_core
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .qknorm_rope import qknorm_rope, qknorm_rope_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rope import apply_rope_ref, rope_cos_sin
from .swiglu import swiglu, swiglu_ref

__all__ = [
    "apply_rope_ref", "flash_attention_ref", "linear_cross_entropy", "linear_cross_entropy_ref", "qknorm_rope",
    "qknorm_rope_attention", "qknorm_rope_attention_ref", "qknorm_rope_ref", "rms_norm", "rms_norm_ref",
    "rope_cos_sin", "run_core", "select_core", "swiglu", "swiglu_ref",
]
