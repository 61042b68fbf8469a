"""The one place that knows how a timm Vision Transformer is laid out: its blocks and their attention layers,
its tokens (patches, class token, registers), where the blocks' input starts, what every block is given
besides its tokens (EVA's RoPE, BEiT's shared relative position bias) and what reaches the output, and the
constructor geometry that rebuilds it. ``convert``, ``grouping``, ``record``, ``ablation`` and the lens ask
here instead of reaching into timm's modules themselves.

The families: timm's ``VisionTransformer`` (vision_transformer.py, deit.py), ``Eva`` (eva.py: EVA-02, DINOv3,
Perception Encoder, RoPE-ViT) and ``Beit`` (beit.py).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from timm.layers import AttentionPoolLatent, AttentionRope
from timm.models.beit import Beit
from timm.models.eva import Eva, EvaBlockPostNorm
from timm.models.vision_transformer import VisionTransformer

from .attention import GroupedQueryAttention

__all__ = ['check_vit', 'check_positions', 'gqa_layers', 'num_tokens', 'token_grid', 'prefix_labels', 'has_class_token',
           'summary_row', 'block_inputs', 'block_context', 'output_rows', 'run_blocks', 'model_output',
           'vit_geometry', 'attention_pool', 'norm_eps', 'set_norm_eps', 'MEAN_ROW', 'POOL_QUERY', 'FAMILIES']

MEAN_ROW = 'mean over queries'
POOL_QUERY = 'attention-pooling query'
FAMILIES = (VisionTransformer, Eva, Beit)


def check_vit(model: nn.Module) -> nn.Module:
    """``model`` when it is one of the timm ViT families GQA Lens knows (:data:`FAMILIES`), else a ValueError."""
    if not isinstance(model, FAMILIES):
        raise ValueError(f'expected a timm Vision Transformer ({", ".join(f.__name__ for f in FAMILIES)}: vit_*, '
                         f'deit_*, eva02_*, *_dinov3, vit_pe_*, beit_*), got {type(model).__name__}')
    return model


def gqa_layers(model: nn.Module) -> List[GroupedQueryAttention]:
    return [m for m in model.modules() if isinstance(m, GroupedQueryAttention)]


def num_tokens(model: nn.Module) -> int:
    """Tokens per image at the model's configured size: its patches plus prefix tokens (class, registers)."""
    return int(model.patch_embed.num_patches) + int(getattr(model, 'num_prefix_tokens', 0))


def token_grid(model: nn.Module, x: Optional[Tensor]) -> tuple:
    """The patch grid (rows, cols) a forward on ``x`` produces: the static grid, or for a
    ``dynamic_img_size`` model the grid of ``x``'s own size."""
    patch_embed = getattr(model, 'patch_embed', None)
    grid = tuple(getattr(patch_embed, 'grid_size', ()) or ())
    if getattr(model, 'dynamic_img_size', False) and isinstance(x, Tensor) and x.dim() == 4:
        grid = tuple(int(s) for s in patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
    return grid


def check_positions(vit: nn.Module) -> None:
    """Refuse position schemes pooling cannot keep exact at G = H: RoPE with learned per-head frequencies
    (RoPE-ViT's ``mixed``) rotates each head's keys differently, so a pooled KV head has no one rotation."""
    if getattr(vit, 'rope_mixed', False):
        raise ValueError(f'{type(vit).__name__} uses RoPE with learned per-head frequencies (rope_type="mixed"): '
                         'a pooled KV head serves query heads that rotate keys differently, so mean-pooling K is '
                         'not defined; the model was not changed')


def num_registers(model: nn.Module) -> int:
    """Register tokens (timm's ViT counts them; EVA holds them as ``reg_token``)."""
    if hasattr(model, 'num_reg_tokens'):
        return int(model.num_reg_tokens)
    reg = getattr(model, 'reg_token', None)
    return int(reg.shape[1]) if reg is not None else 0


def attention_pool(model: nn.Module) -> Optional[nn.Module]:
    """The model's attention-pooling head (timm's ``AttentionPoolLatent``: SigLIP, SigLIP2, PE ``map``
    pooling), whose query's attention over the tokens is what the pooled output reads; None otherwise."""
    pool = getattr(model, 'attn_pool', None)
    return pool if isinstance(pool, AttentionPoolLatent) else None


def has_class_token(model: nn.Module) -> bool:
    return getattr(model, 'cls_token', None) is not None


def prefix_labels(model: nn.Module) -> List[str]:
    """What each recorded prefix row is: the class token, registers, other prefix tokens (e.g. distillation),
    and a mean row when there is no class token to stand for the image."""
    registers = num_registers(model)
    labels = (['class token'] if has_class_token(model) else []) + [f'register {i}' for i in range(registers)]
    extra = int(getattr(model, 'num_prefix_tokens', 0)) - len(labels)
    labels += [f'prefix token {i}' for i in range(extra)]
    return labels if has_class_token(model) else labels + [MEAN_ROW]


def summary_row(model: nn.Module) -> int:
    """Index, among :func:`prefix_labels`, of the row that stands for the image."""
    return 0 if has_class_token(model) else len(prefix_labels(model)) - 1


def block_inputs(vit: nn.Module, images: Tensor) -> Tensor:
    """The tokens entering block 0 (the first steps of timm's ``forward_features``, which has no public entry
    for them)."""
    x = vit.patch_embed(images)
    if isinstance(vit, Eva):
        x, _ = vit._pos_embed(x)
        return vit.norm_pre(x)
    if isinstance(vit, Beit):
        x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + vit.pos_embed if vit.pos_embed is not None else x
        return vit.pos_drop(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def block_context(vit: nn.Module, images: Tensor) -> Dict[str, Any]:
    """What every block is given besides its tokens for ``images``' size: EVA's RoPE (``rope``), BEiT's shared
    relative position bias (``shared_rel_pos_bias``); nothing for timm's ViT."""
    check_positions(vit)
    if isinstance(vit, Eva):
        if vit.rope is None:
            return {}
        x = vit.patch_embed(images[:1])
        return {'rope': vit._pos_embed(x)[1]}
    if isinstance(vit, Beit):
        return {'shared_rel_pos_bias': vit.rel_pos_bias() if vit.rel_pos_bias is not None else None}
    return {}


def output_rows(vit: VisionTransformer, index: int) -> Optional[slice]:
    """The query rows of block ``index`` whose attention output reaches the model's output: only the class
    token's in the last block of a token-pooled model, all otherwise (None)."""
    last = index == len(vit.blocks) - 1
    if last and getattr(vit, 'global_pool', None) == 'token' and has_class_token(vit):
        return slice(0, 1)
    return None


def run_blocks(blocks: Sequence[nn.Module], tokens: Tensor, batch: int,
               context: Optional[Dict[str, Any]] = None) -> Tensor:
    """``tokens`` through ``blocks`` in chunks of ``batch`` images (bounded memory), each block given
    ``context`` (:func:`block_context`)."""
    outs = []
    for start in range(0, tokens.shape[0], batch):
        x = tokens[start:start + batch]
        for block in blocks:
            x = block(x, **(context or {}))
        outs.append(x)
    return torch.cat(outs)


def model_output(vit: nn.Module, tokens: Tensor, first: int, batch: int,
                 context: Optional[Dict[str, Any]] = None) -> Tensor:
    """Logits (pooled features when headless) of the model from the tokens entering block ``first``."""
    return vit.forward_head(vit.norm(run_blocks(vit.blocks[first:], tokens, batch, context)))


def _is(module: Optional[nn.Module]) -> bool:
    return module is not None and not isinstance(module, nn.Identity)


def norm_eps(model: nn.Module) -> Dict[str, float]:
    """Every LayerNorm's epsilon, by module name (timm builds them with one; models from elsewhere differ)."""
    return {name: float(m.eps) for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}


def set_norm_eps(model: nn.Module, eps: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = float(eps)


def _common_geometry(vit: nn.Module) -> Dict[str, Any]:
    """The constructor arguments every family shares, read from the modules."""
    attn, block = vit.blocks[0].attn, vit.blocks[0]
    height, width = (int(s) for s in vit.patch_embed.img_size)
    patch = vit.patch_embed.patch_size
    geometry: Dict[str, Any] = dict(
        img_size=height if height == width else [height, width],
        patch_size=int(patch[0]) if patch[0] == patch[1] else [int(p) for p in patch],
        num_classes=int(vit.num_classes),
        global_pool=vit.global_pool,
        embed_dim=int(vit.embed_dim),
        depth=len(vit.blocks),
        num_heads=int(attn.num_heads),
    )
    fc2 = getattr(block.mlp, 'fc2', None)  # its input is int(dim * mlp_ratio) for Mlp, GluMlp and SwiGLU alike
    if fc2 is not None:
        geometry['mlp_ratio'] = fc2.in_features / vit.embed_dim
    return geometry


def _has_qkv_bias(attn: nn.Module) -> bool:
    qkv = getattr(attn, 'qkv', None)
    if qkv is not None:
        return qkv.bias is not None or getattr(attn, 'q_bias', None) is not None
    return attn.q_proj.bias is not None


def _eva_geometry(vit: Eva) -> Dict[str, Any]:
    """timm's ``Eva`` (EVA-02, DINOv3, PE): the rest (RoPE type and grid, norms) is the architecture's own."""
    attn, block = vit.blocks[0].attn, vit.blocks[0]
    geometry = _common_geometry(vit)
    geometry.update(
        qkv_bias=_has_qkv_bias(attn),
        qkv_fused=getattr(attn, 'qkv', None) is not None,
        qk_norm=_is(attn.q_norm),
        init_values=1.0 if getattr(block, 'gamma_1', None) is not None else None,
        class_token=has_class_token(vit),
        num_reg_tokens=num_registers(vit),
        use_abs_pos_emb=vit.pos_embed is not None,
        use_rot_pos_emb=vit.rope is not None,
        dynamic_img_size=bool(vit.dynamic_img_size),
    )
    # the KV heads timm builds each block with (its own GQA: Sapiens2, num_kv_heads); a converted layer remembers
    # the heads of the layer it was made from, so the rebuilt backbone takes the same weights before conversion
    native = [int(getattr(b.attn, 'native_kv_heads', None) or getattr(b.attn, 'num_kv_heads', None) or b.attn.num_heads)
              for b in vit.blocks]
    # all multi-head: H said explicitly (an architecture whose default is per-block GQA, Sapiens2, is overridden),
    # but post-norm blocks take no num_kv_heads at all
    post_norm = isinstance(block, EvaBlockPostNorm)
    geometry['num_kv_heads'] = None if post_norm else native[0] if len(set(native)) == 1 else native
    geometry['attn_type'] = 'rope' if getattr(attn, 'kind', None) == 'rope' or isinstance(attn, AttentionRope) \
        else 'eva'  # timm's AttentionRope (the only Eva attention with num_kv_heads) or EvaAttention
    if vit.attn_pool is not None:
        geometry['attn_pool_num_heads'] = int(vit.attn_pool.num_heads)
        geometry['attn_pool_mlp_ratio'] = vit.attn_pool.mlp.fc1.out_features / vit.embed_dim
    return geometry


def _beit_geometry(vit: Beit) -> Dict[str, Any]:
    attn, block = vit.blocks[0].attn, vit.blocks[0]
    geometry = _common_geometry(vit)
    geometry.update(
        qkv_bias=_has_qkv_bias(attn),
        init_values=1.0 if getattr(block, 'gamma_1', None) is not None else None,
        use_abs_pos_emb=vit.pos_embed is not None,
        use_rel_pos_bias=getattr(attn, 'relative_position_bias_table', None) is not None,
        use_shared_rel_pos_bias=vit.rel_pos_bias is not None,
    )
    return geometry


def vit_geometry(model: nn.Module) -> Dict[str, Any]:
    """The constructor arguments of the model's timm class that give ``model`` its state-dict shapes and its
    forward, read from its modules (regularisation rates are left out: they do nothing at inference)."""
    vit = check_vit(model)
    if isinstance(vit, Eva):
        return _eva_geometry(vit)
    if isinstance(vit, Beit):
        return _beit_geometry(vit)
    attn, block = vit.blocks[0].attn, vit.blocks[0]
    geometry = _common_geometry(vit)
    geometry.update(
        qkv_bias=_has_qkv_bias(attn),
        qk_norm=_is(attn.q_norm),
        proj_bias=attn.proj.bias is not None,
        init_values=1.0 if _is(getattr(block, 'ls1', None)) else None,  # the value itself is a loaded weight
        class_token=has_class_token(vit),
        reg_tokens=int(getattr(vit, 'num_reg_tokens', 0)),
        no_embed_class=bool(vit.no_embed_class),
        pos_embed='learn' if vit.pos_embed is not None else 'none',
        pre_norm=_is(vit.norm_pre),
        final_norm=_is(vit.norm) or _is(vit.fc_norm),
        fc_norm=_is(vit.fc_norm),
        dynamic_img_size=bool(vit.dynamic_img_size),
        dynamic_img_pad=bool(getattr(vit.patch_embed, 'dynamic_img_pad', False)),
    )
    fc1 = getattr(block.mlp, 'fc1', None)
    if fc1 is not None:
        geometry['mlp_ratio'] = fc1.out_features / vit.embed_dim
    return geometry
