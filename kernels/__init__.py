"""Triton kernels, each beside its PyTorch reference with the same signature. Import as `megasynth.kernels`.

Every public function dispatches: Triton on CUDA tensors, the reference elsewhere; MEGASYNTH_KERNELS=triton or
=reference forces either (see _dispatch.py).
"""

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
