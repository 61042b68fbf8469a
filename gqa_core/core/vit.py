"""The one place that answers how a timm Vision Transformer is laid out: its blocks and their attention layers,
its tokens (patches, class token, registers), where the blocks' input starts, what every block is given
besides its tokens (EVA's RoPE, BEiT's shared relative position bias) and what reaches the output, and the
constructor geometry that rebuilds it. ``convert``, ``grouping``, ``record``, ``ablation`` and the lens ask
here instead of reaching into timm's modules themselves; each answer comes from the model's family
(:mod:`gqa_core.core.families`, a module per timm class).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .attention import GroupedQueryAttention
from .families import REFUSED_MODULES, Family, family_of, registered

__all__ = ['check_vit', 'check_positions', 'gqa_layers', 'num_tokens', 'token_grid', 'token_pixels', 'in_chans', 'prefix_labels', 'has_class_token',
           'summary_row', 'block_inputs', 'block_context', 'output_rows', 'run_blocks', 'model_output',
           'vit_geometry', 'attention_pool', 'norm_eps', 'set_norm_eps', 'blocks_of', 'patch_embed_of', 'family',
           'MEAN_ROW', 'POOL_QUERY']

MEAN_ROW = 'mean over queries'
POOL_QUERY = 'attention-pooling query'


def family(model: nn.Module) -> Family:
    """``model``'s family (:mod:`gqa_core.core.families`), or a ValueError naming the ones GQA Lens knows."""
    found = family_of(model)
    if found is None:
        reason = REFUSED_MODULES.get(type(model).__module__)
        if reason is not None:
            raise ValueError(f'{type(model).__name__} is refused: {reason}; the model was not changed')
        names = ', '.join(dict.fromkeys(c.__name__ for f in registered() for c in f.classes))
        raise ValueError(f'expected a timm Vision Transformer ({names}: vit_*, deit_*, eva02_*, *_dinov3, vit_pe_*, '
                         f'beit_*), got {type(model).__name__}')
    return found


def check_vit(model: nn.Module) -> nn.Module:
    """``model`` when it is of a timm ViT family GQA Lens knows, else a ValueError."""
    family(model)
    return model


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, wherever its class keeps them."""
    return family(model).blocks(model)


def patch_embed_of(model: nn.Module) -> nn.Module:
    """The model's patch embedding, wherever its class keeps it (a classifier may wrap its encoder)."""
    return family(model).patch_embed(model)


def gqa_layers(model: nn.Module) -> List[GroupedQueryAttention]:
    return [m for m in model.modules() if isinstance(m, GroupedQueryAttention)]


def num_tokens(model: nn.Module) -> int:
    """Tokens per image at the model's configured size: its patches plus prefix tokens (class, registers)."""
    fam = family(model)
    return fam.num_patches(model) + fam.num_prefix_tokens(model)


def num_prefix_tokens(model: nn.Module) -> int:
    return family(model).num_prefix_tokens(model)


def token_grid(model: nn.Module, x: Optional[Tensor]) -> tuple:
    """The patch grid (rows, cols) a forward on ``x`` produces: the static grid, or for a
    ``dynamic_img_size`` model the grid of ``x``'s own size."""
    return family(model).token_grid(model, x)


def token_pixels(model: nn.Module) -> tuple:
    """The image pixels (rows, cols) one patch token covers (a hybrid ViT's: its stem's stride times the patch)."""
    return family(model).token_pixels(model)


def in_chans(model: nn.Module) -> Optional[int]:
    """The image channels the model takes (None when it does not say)."""
    return family(model).in_chans(model)


def check_positions(vit: nn.Module) -> None:
    """Refuse position schemes pooling cannot keep exact at G = H (e.g. RoPE with learned per-head frequencies,
    RoPE-ViT's ``mixed``, rotates each head's keys differently, so a pooled KV head has no one rotation)."""
    family(vit).check_positions(vit)


def num_registers(model: nn.Module) -> int:
    return family(model).num_registers(model)


def attention_pool(model: nn.Module) -> Optional[nn.Module]:
    """The model's attention-pooling head (timm's ``AttentionPoolLatent``: SigLIP, SigLIP2, PE ``map``
    pooling), whose query's attention over the tokens is what the pooled output reads; None otherwise."""
    return family(model).attention_pool(model)


def has_class_token(model: nn.Module) -> bool:
    return family(model).has_class_token(model)


def prefix_labels(model: nn.Module) -> List[str]:
    """What each recorded prefix row is: the class token, registers, other prefix tokens (e.g. distillation),
    and a mean row when there is no class token to stand for the image."""
    cls = has_class_token(model)
    labels = (['class token'] if cls else []) + [f'register {i}' for i in range(num_registers(model))]
    extra = num_prefix_tokens(model) - len(labels)
    labels += [f'prefix token {i}' for i in range(extra)]
    return labels if cls else labels + [MEAN_ROW]


def summary_row(model: nn.Module) -> int:
    """Index, among :func:`prefix_labels`, of the row that stands for the image."""
    return 0 if has_class_token(model) else len(prefix_labels(model)) - 1


def block_inputs(vit: nn.Module, images: Tensor) -> Tensor:
    """The tokens entering block 0 (the first steps of timm's ``forward_features``, which has no public entry
    for them)."""
    return family(vit).block_inputs(vit, images)


def block_context(vit: nn.Module, images: Tensor) -> Dict[str, Any]:
    """What every block is given besides its tokens for ``images``' size: EVA's RoPE (``rope``), BEiT's shared
    relative position bias (``shared_rel_pos_bias``); nothing for timm's ViT."""
    fam = family(vit)
    fam.check_positions(vit)
    return fam.block_context(vit, images)


def output_rows(vit: nn.Module, index: int) -> Optional[slice]:
    """The query rows of block ``index`` whose attention output reaches the model's output: only the class
    token's in the last block of a token-pooled model, all otherwise (None)."""
    return family(vit).output_rows(vit, index)


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
    return family(vit).head(vit, run_blocks(blocks_of(vit)[first:], tokens, batch, context))


def norm_eps(model: nn.Module) -> Dict[str, float]:
    """Every LayerNorm's epsilon, by module name (timm builds them with one; models from elsewhere differ)."""
    return {name: float(m.eps) for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}


def set_norm_eps(model: nn.Module, eps: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = float(eps)


def vit_geometry(model: nn.Module) -> Dict[str, Any]:
    """The constructor arguments of the model's timm class that give ``model`` its state-dict shapes and its
    forward, read from its modules (regularisation rates are left out: they do nothing at inference)."""
    return family(model).geometry(model)
