"""The attention core on prepared inputs (q_hat, k_hat, v): which implementation runs, its input checks, running it.

    choose_core(requested, *, device_type, capability, dtype, head_dim, varlen, available) -> core name
    run_core(name, q, k, v, *, cu_seqlens, max_seqlen, causal, scale) -> out

Shapes (batched, or packed with cu_seqlens), the cores and the `auto` order: docs/kernels.md.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from typing import get_args

import torch

from megasynth.config import AttentionCore

from ._dispatch import _is_dtensor, kernel_mode
from ._launch import planning
from ._layout import TokenLayout

CORES = tuple(name for name in get_args(AttentionCore) if name != "auto")
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_NAME = "attention core"


# -- choosing -------------------------------------------------------------------------------------------------------
def choose_core(requested: str, *, device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype,
                head_dim: int, varlen: bool, available: frozenset[str] | set[str], mode: str = "auto",
                interpreter: bool = False) -> str:
    """The core that serves these inputs. Pure: every fact about the machine comes in as an argument.

    requested: "auto" or one of CORES. device_type: "cuda" or anything else (CPU, meta). capability: (major,
    minor) of the CUDA device, None elsewhere. available: installed optional backends, from available_backends()
    ("flash_attn" = FlashAttention-2, "flash_attn_interface" = FlashAttention-3). mode: MEGASYNTH_KERNELS.
    interpreter: TRITON_INTERPRET=1 is set (the Triton core can then run on CPU tensors).
    Raises ValueError naming why an explicitly requested core cannot serve these inputs.
    """
    if requested not in ("auto", *CORES):
        raise ValueError(f"{_NAME}: core={requested!r}: expected 'auto' or one of {', '.join(CORES)}")
    cuda = device_type == "cuda"
    cap = tuple(capability) if cuda and capability is not None else (0, 0)
    if requested == "auto":
        if mode == "reference":
            return "reference"
        if mode == "triton":
            return "triton"
        if not cuda:
            return "reference"
        if _flash_attn_problem(cap, dtype, head_dim, available) is None:
            return "flash_attn"
        if cap == (9, 0) and not varlen and dtype in _SIXTEEN_BIT and head_dim <= 128 and head_dim % 8 == 0:
            return "cudnn"
        return "triton"

    problem = None
    if requested == "triton":
        if not cuda and not (interpreter or mode == "triton"):
            problem = (f"needs CUDA tensors (got {device_type}) or the Triton interpreter (TRITON_INTERPRET=1 "
                       "before megasynth.kernels is imported)")
    elif requested == "flash_attn":
        problem = (f"needs CUDA tensors, got {device_type}" if not cuda
                   else _flash_attn_problem(cap, dtype, head_dim, available))
    elif requested in ("cudnn", "flash"):
        backend = "SDPA " + ("cuDNN" if requested == "cudnn" else "flash")
        if not cuda:
            problem = f"{backend} needs CUDA tensors, got {device_type}"
        elif varlen:
            problem = (f"{backend} takes batched inputs only, not packed cu_seqlens (use core 'flash_attn' or "
                       "'triton' for varlen)")
        elif dtype not in _SIXTEEN_BIT:
            problem = f"{backend} needs bf16 or fp16, got {dtype}"
        elif cap < (8, 0):
            problem = f"{backend} needs sm_80 or newer, got sm_{cap[0]}{cap[1]}"
        elif head_dim > 256 or head_dim % 8:
            problem = f"{backend} needs head_dim a multiple of 8 and <= 256, got {head_dim}"
    if problem is not None:
        raise ValueError(f"{_NAME}: core={requested!r} cannot serve these inputs: {problem}")
    return requested


def _flash_attn_problem(cap, dtype, head_dim, available) -> str | None:
    """Why the flash-attn package cannot serve these inputs, or None when it can."""
    fa3 = "flash_attn_interface" in available and cap == (9, 0)  # FA3 is built for Hopper only
    if not fa3 and "flash_attn" not in available:
        return "the flash-attn package is not installed (pip install '.[gpu]')"
    if dtype not in _SIXTEEN_BIT:
        return f"flash-attn needs bf16 or fp16, got {dtype}"
    if cap < (8, 0):
        return f"flash-attn needs sm_80 or newer, got sm_{cap[0]}{cap[1]}"
    if head_dim > 256:
        return f"flash-attn needs head_dim <= 256, got {head_dim}"
    return None


@functools.cache
def available_backends() -> frozenset[str]:
    """The optional attention packages that import here (detected once per process): "flash_attn" (FA2),
    "flash_attn_interface" (FA3). An import that fails for any reason (missing, built for another CUDA or
    torch) counts as absent."""
    found = set()
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a broken install is an absent one
            continue
        found.add(module)
    return frozenset(found)


_FACTS: dict[tuple[str, int | None], tuple[tuple[int, int] | None, frozenset[str]]] = {}


@torch.compiler.disable
def machine_facts(device: torch.device) -> tuple[tuple[int, int] | None, frozenset[str]]:
    """(capability, available backends) of `device`, looked up once per device and cached. Model code may call
    it once at build time: under torch.compile, select_core then only reads a dict (no graph break)."""
    key = (device.type, device.index)
    if key not in _FACTS:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            _FACTS[key] = (tuple(torch.cuda.get_device_capability(index)), available_backends())
        else:
            _FACTS[key] = (None, frozenset())
    return _FACTS[key]


def _facts(device: torch.device):
    # A plain dict read first: torch.compile traces it (guarding on the entry) instead of breaking the graph.
    key = (device.type, device.index)
    return _FACTS[key] if key in _FACTS else machine_facts(device)


def select_core(requested: str, q: torch.Tensor, *, varlen: bool, tensors=()) -> str:
    """choose_core with the facts of this machine and these tensors filled in. DTensors (tensor parallelism)
    take the reference core under `auto`, as every kernel does (see _dispatch.py)."""
    if requested == "auto" and any(_is_dtensor(t) for t in (q, *tensors) if t is not None):
        return "reference"
    capability, available = _facts(q.device)
    return choose_core(requested, device_type=q.device.type, capability=capability, dtype=q.dtype,
                       head_dim=q.shape[-1], varlen=varlen, available=available, mode=kernel_mode(),
                       interpreter=os.environ.get("TRITON_INTERPRET", "0") == "1")


# -- running --------------------------------------------------------------------------------------------------------
def _check_cu_seqlens(cu_seqlens, n_tokens: int, device: torch.device) -> None:
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1
            or cu_seqlens.numel() < 1):
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        raise ValueError(f"{_NAME}: cu_seqlens must be a non-empty 1-D int32 tensor [documents + 1], got {got}")
    if cu_seqlens.device != device:
        raise ValueError(f"{_NAME}: cu_seqlens on {cu_seqlens.device} but q on {device}")
    if planning():  # ahead-of-time planning: the values may be placeholders and nothing reads them
        return
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == n_tokens) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    message = f"{_NAME}: cu_seqlens must start at 0, never decrease and end at the token count {n_tokens}"
    if cu_seqlens.is_cuda:
        # Reading the values on the host would stall the CPU on every layer; a device-side assert costs nothing
        # when the offsets are valid and stops the run (instead of reading out of bounds) when they are not.
        torch._assert_async(ok, message)
    elif not bool(ok):
        shown = cu_seqlens[:8].tolist()
        raise ValueError(f"{message}; got {shown}{' ...' if cu_seqlens.numel() > 8 else ''}")


def check_inputs(q, k, v, cu_seqlens=None, max_seqlen=None, softmax_scale=None) -> tuple[TokenLayout, float]:
    """Validate the arguments of an attention core -> (layout, softmax scale, 1/sqrt(D) when None); a ValueError
    names what is wrong. What one core cannot serve (dtype, head_dim, machine) is choose_core's business."""
    packed = cu_seqlens is not None
    form = "packed [T, H, D]" if packed else "batched [B, S, H, D]"
    rank = 3 if packed else 4
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{_NAME}: {label} must be a tensor, got {type(t).__name__}")  # noqa: TRY004
        if t.device != q.device:
            raise ValueError(f"{_NAME}: {label} on {t.device} but q on {q.device}")
        if t.dim() != rank:
            raise ValueError(f"{_NAME}: {label} has shape {tuple(t.shape)}; the {form} form needs {rank} dims")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{_NAME}: q, k, v must share one dtype, a floating-point one; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if k.shape != v.shape or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{_NAME}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
                         f"({form}: same tokens and head_dim; k and v identical)")
    heads_q, heads_kv, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"{_NAME}: {heads_q} q heads is not a multiple of {heads_kv} kv heads (GQA)")
    if head_dim < 1:
        raise ValueError(f"{_NAME}: head_dim must be >= 1, got {head_dim}")
    if packed:
        _check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    # SymInt: torch.compile turns an int that changes every batch into a symbolic one.
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt))
                                   or max_seqlen < 0):
        raise ValueError(f"{_NAME}: max_seqlen must be a non-negative int or None, got {max_seqlen!r}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if not (math.isfinite(scale) and scale > 0):
        # > 0: the Triton kernels scale the row maximum instead of every score (max(x) * s = max(x * s) needs s > 0).
        raise ValueError(f"{_NAME}: softmax_scale must be a positive finite number, got {softmax_scale!r}")
    batch, seq = (1, q.shape[0]) if packed else (q.shape[0], q.shape[1])
    return TokenLayout(packed, batch, seq, heads_q, heads_kv, head_dim), scale


def flash_attention_ref(q, k, v, *, cu_seqlens=None, causal=True, softmax_scale=None):
    """The reference core in plain PyTorch math: scores in fp32 (float64 for float64 inputs), one dense
    [B, Hq, S, S] score tensor, documents as a block-diagonal mask. For tests and CPU runs, not for speed."""
    packed = cu_seqlens is not None
    if packed:  # view the packed tokens as one batch row whose mask is block-diagonal over documents
        q, k, v = q[None], k[None], v[None]
    seq, heads_q, head_dim = q.shape[1], q.shape[2], q.shape[3]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    compute = torch.promote_types(q.dtype, torch.float32)
    group = heads_q // k.shape[2]
    qh = q.transpose(1, 2).to(compute)  # [B, Hq, S, D]
    kh = k.transpose(1, 2).to(compute).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).to(compute).repeat_interleave(group, dim=1)
    idx = torch.arange(seq, device=q.device)
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device)
    if causal:
        mask = idx[:, None] >= idx[None, :]
    if packed:
        doc = torch.searchsorted(cu_seqlens[1:].to(idx.device), idx, right=True)
        mask = mask & (doc[:, None] == doc[None, :])
    scores = (qh @ kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    # Every row sees at least its own token (causal) or its own document, so no row is all -inf.
    out = (torch.softmax(scores, dim=-1) @ vh).to(q.dtype).transpose(1, 2)
    return out[0] if packed else out


def run_core(name: str, q, k, v, *, cu_seqlens=None, max_seqlen=None, causal=True, scale=None) -> torch.Tensor:
    """softmax(q k^T * scale) v with the named core (see CORES); scale None means 1/sqrt(D).

    max_seqlen (the longest document) is passed to the cores that need it (flash-attn varlen); when it is None
    there, it is computed here from cu_seqlens, which reads a device value on the host (one synchronisation per
    call): callers in a training loop compute it once per batch and pass it to every layer."""
    if name not in CORES:
        raise ValueError(f"{_NAME}: unknown core {name!r}; expected one of {', '.join(CORES)}")
    if name == "triton":  # checks its inputs itself (check_inputs, then the kernel's own limits)
        from ._flash_attn_triton import flash_attention_triton  # noqa: PLC0415 - Triton is optional

        return flash_attention_triton(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=causal,
                                      softmax_scale=scale)
    _, scale = check_inputs(q, k, v, cu_seqlens, max_seqlen, scale)
    if name == "reference":
        return flash_attention_ref(q, k, v, cu_seqlens=cu_seqlens, causal=causal, softmax_scale=scale)
    if q.numel() == 0 or k.numel() == 0:
        # The external kernels reject empty sequences; keep every input in the graph so autograd sees them.
        return q * 0 + (k.sum() + v.sum()) * 0
    if name == "flash_attn":
        return _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    if cu_seqlens is not None:
        raise ValueError(f"{_NAME}: core={name!r} (torch SDPA) takes batched inputs only, not packed cu_seqlens")
    return _sdpa(name, q, k, v, causal, scale)


def max_seqlen_of(cu_seqlens: torch.Tensor) -> int:
    """The longest document of cu_seqlens. Synchronises with the device (reads the value on the host)."""
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    cap, available = _facts(q.device)
    if "flash_attn_interface" in available and cap == (9, 0):
        import flash_attn_interface as fa  # noqa: PLC0415 - FlashAttention-3, Hopper
    else:
        import flash_attn as fa  # noqa: PLC0415 - FlashAttention-2
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # Like our Triton core: a bit-reproducible backward (no dq atomics) only when torch asks for determinism.
    det = torch.are_deterministic_algorithms_enabled()
    if cu_seqlens is None:
        out = fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, deterministic=det)
    else:
        if max_seqlen is None:
            max_seqlen = max_seqlen_of(cu_seqlens)
        out = fa.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                        softmax_scale=scale, causal=causal, deterministic=det)
    # Some FlashAttention-3 releases return (out, softmax_lse).
    return out[0] if isinstance(out, tuple) else out


_SDPA_GQA: dict[tuple, bool] = {}


@torch.compiler.disable
def _sdpa_takes_gqa(backend_name: str, q, k, causal: bool) -> bool:
    """Whether this SDPA backend accepts Hq != Hkv directly (enable_gqa). The flash backend does (PyTorch 2.5+);
    cuDNN's support depends on the PyTorch and cuDNN versions, so it is asked once per shape class."""
    key = (backend_name, q.device, q.dtype, q.shape[-1], q.shape[2], k.shape[2], causal)
    if key not in _SDPA_GQA:
        if backend_name == "flash":
            _SDPA_GQA[key] = True
        else:
            try:
                from torch.backends.cuda import SDPAParams, can_use_cudnn_attention  # noqa: PLC0415

                qt, kt = q.transpose(1, 2), k.transpose(1, 2)
                _SDPA_GQA[key] = bool(can_use_cudnn_attention(SDPAParams(qt, kt, kt, None, 0.0, causal, True)))
            except Exception:  # noqa: BLE001 - an older torch without the query: repeat k/v, which always works
                _SDPA_GQA[key] = False
    return _SDPA_GQA[key]


def _sdpa(name, q, k, v, causal, scale):
    import torch.nn.functional as F  # noqa: PLC0415
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    backend = SDPBackend.CUDNN_ATTENTION if name == "cudnn" else SDPBackend.FLASH_ATTENTION
    group = q.shape[2] // k.shape[2]
    gqa = group > 1 and _sdpa_takes_gqa(name, q, k, causal)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D] views, no copy
    if group > 1 and not gqa:
        kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)
