"""A Triton flash-attention forward that reads K/V through a (sample, query head) -> KV head table.

Per-image groupings (KDGQA) otherwise copy K/V to H heads before the fused kernel; this kernel instead
indexes the G shared heads directly, so nothing is materialised. Inference only (no backward, no mask, no
dropout); :func:`gqa_core.core.attention.grouped_attention` falls back to index + SDPA everywhere else.

Status: checked against the reference in Triton's CPU interpreter (``TRITON_INTERPRET=1``, see the tests);
not yet compiled or timed on a GPU, so it is off unless ``GQA_LENS_TRITON=1`` or :func:`use_triton` enables it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .settings import Settings

__all__ = ['routed_attention', 'triton_enabled', 'use_triton']

_ENABLED: Optional[bool] = None

try:  # Triton ships with CUDA builds of torch; the CPU-only install has no Triton.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def use_triton(enabled: bool = True) -> None:
    """Route per-image groupings on CUDA through the Triton kernel (default: ``GQA_LENS_TRITON`` env var)."""
    global _ENABLED
    _ENABLED = enabled


def triton_enabled(q: Tensor) -> bool:
    if triton is None or not (q.is_cuda or os.environ.get('TRITON_INTERPRET', '0') == '1'):
        return False  # decided before the settings are read: this runs on every forward
    return _ENABLED if _ENABLED is not None else Settings.from_env().triton


if triton is not None:
    @triton.jit
    def _routed_attention_fwd(
            Q, K, V, Out, Table,
            stride_qb, stride_qh, stride_qt,
            stride_kb, stride_kh, stride_kt,
            stride_vb, stride_vh, stride_vt,
            stride_ob, stride_oh, stride_ot,
            num_heads, seq_len, head_dim, scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // num_heads
        h = bh % num_heads
        g = tl.load(Table + bh)  # the KV head this (sample, query head) reads
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=(offs_m[:, None] < seq_len) & d_ok[None, :], other=0.0)
        m_i = tl.full((BLOCK_M,), float('-inf'), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        k_base = K + b * stride_kb + g * stride_kh
        v_base = V + b * stride_vb + g * stride_vh
        for start_n in range(0, seq_len, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = (cols[:, None] < seq_len) & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision='ieee')
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            s = tl.where(cols[None, :] < seq_len, s, float('-inf'))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision='ieee')
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                 acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seq_len) & d_ok[None, :])


def routed_attention(q: Tensor, k: Tensor, v: Tensor, query_to_kv: Tensor, scale: float,
                     block_m: int = 64, block_n: int = 64) -> Tensor:
    """``softmax(q_h k_{t[b,h]}^T * scale) v_{t[b,h]}`` without copying K/V.

    q: ``(B, H, T, d)``; k, v: ``(B, G, T, d)`` (last dim contiguous); query_to_kv: ``(H,)`` or ``(B, H)``.
    """
    if triton is None:
        raise RuntimeError('Triton is not installed')
    B, H, T, d = q.shape
    table = query_to_kv.expand(B, H) if query_to_kv.dim() == 1 else query_to_kv
    table = table.to(device=q.device, dtype=torch.int32).contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(T, block_m), B * H)
    _routed_attention_fwd[grid](
        q, k, v, out, table,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, T, d, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=q.dtype == torch.float32,
    )
    return out
