"""Obviously-correct, slow reference implementations written independently of gqa_core's vectorised code."""
import math

import numpy as np
import torch


def hamilton(shares, seats):
    quotas = [s * seats for s in shares]
    base = [math.floor(q) for q in quotas]
    order = sorted(range(len(shares)), key=lambda i: (-(quotas[i] - base[i]), i))
    for i in order[: seats - sum(base)]:
        base[i] += 1
    return base


def min_max(norms):
    low, high = min(norms), max(norms)
    if high == low:
        return [1 / len(norms)] * len(norms)
    scaled = [(n - low) / (high - low) for n in norms]
    return [s / sum(scaled) for s in scaled]


def serving_kv_head(allocation):
    """Query head -> KV head, by walking the allocation."""
    return [g for g, count in enumerate(allocation) for _ in range(count)]


def project(module, x):
    """q (B, H, T, d), k and v (B, G, T, d) from the module's own weights, head by head."""
    B, T, _ = x.shape
    H, G, d = module.num_heads, module.num_kv_heads, module.head_dim
    out = torch.nn.functional.linear(x, module.qkv.weight, module.qkv.bias)
    q = out[..., :H * d].reshape(B, T, H, d).permute(0, 2, 1, 3)
    k = out[..., H * d:(H + G) * d].reshape(B, T, G, d).permute(0, 2, 1, 3)
    v = out[..., (H + G) * d:].reshape(B, T, G, d).permute(0, 2, 1, 3)
    return q, k, v


def attention_loop(module, x, allocations, map_noise=None):
    """softmax(q_h k_{g(h)}^T / sqrt(d)) v_{g(h)} for every sample and query head, then proj.

    allocations: one list of G ints per sample. map_noise(b, h, attn) -> attn, optional.
    """
    q, k, v = project(module, x)
    B, H, T, d = q.shape
    heads_out = torch.zeros(B, T, H * d, dtype=x.dtype)
    for b in range(B):
        kv_of = serving_kv_head(allocations[b])
        for h in range(H):
            g = kv_of[h]
            attn = torch.softmax(q[b, h] @ k[b, g].T / math.sqrt(d), dim=-1)
            if map_noise is not None:
                attn = map_noise(b, h, attn)
            heads_out[b, :, h * d:(h + 1) * d] = attn @ v[b, g]
    return module.proj(heads_out)


@torch.no_grad()
def key_norms(module, x):
    _, k, _ = project(module, x)
    return [[float(k[b, g].norm()) for g in range(k.shape[1])] for b in range(k.shape[0])]


def prefix_attention(maps: np.ndarray, num_prefix_tokens: int, has_class_token: bool = True) -> np.ndarray:
    """Attention of the summary row to every patch: ``(..., T, T) -> (..., patches)``.

    The class token's row; with no class token, the mean over all query rows stands in for it.
    """
    rows = maps[..., 0, :] if has_class_token and num_prefix_tokens > 0 else maps.mean(-2)
    return rows[..., num_prefix_tokens:]


def attention_rollout(maps: np.ndarray, num_prefix_tokens: int, fusion: str = 'mean',
                      has_class_token: bool = True) -> np.ndarray:
    """Abnar & Zuidema's rollout from all layers' maps at once (the reference the recorder's layer-by-layer
    accumulation is tested against): fuse heads, 0.5 A + 0.5 I, renormalise, multiply layers.

    maps: ``(L, H, T, T)``. Returns ``(patches,)``.
    """
    fused = getattr(maps, fusion)(axis=1)  # (L, T, T)
    T = fused.shape[-1]
    joint = np.eye(T)
    for layer in fused:
        a = 0.5 * layer + 0.5 * np.eye(T)
        a = a / a.sum(-1, keepdims=True)
        joint = a @ joint
    return prefix_attention(joint[None], num_prefix_tokens, has_class_token)[0]
