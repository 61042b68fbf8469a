"""What a timm model family is to GQA Lens: where its blocks, patch embedding and prefix tokens are, what its
blocks are given besides their tokens, how its output is read from the last block's tokens, and the
constructor arguments that rebuild it. The defaults are timm's ``VisionTransformer``'s; a family overrides what
its class does differently. :mod:`gqa_core.core.vit` answers every question through :func:`family_of`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Type

from torch import Tensor, nn
from timm.layers import AttentionPoolLatent

from ..rules import Rule, integer, number

__all__ = ['Family', 'family_of', 'register', 'registered', 'SIZE', 'RATE', 'is_present', 'has_qkv_bias']

SIZE = Rule(lambda v: integer(8, 4096)(v) or (isinstance(v, (list, tuple)) and len(v) == 2
                                              and all(integer(8, 4096)(s) for s in v)),
            'an int or [height, width], 8..4096')
RATE = number(0, 1)


def is_present(module: Optional[nn.Module]) -> bool:
    """A module that does something (timm puts ``nn.Identity`` where a layer is switched off)."""
    return module is not None and not isinstance(module, nn.Identity)


class Family:
    """One timm model class (or a few that share a layout) as GQA Lens sees it.

    Subclasses set ``classes`` (the timm model classes), ``timm_modules`` (the timm modules whose
    architectures build them: what the config guard admits) and ``args`` (their constructor's geometry keys,
    each with the :class:`~gqa_core.core.rules.Rule` a config value must pass), and override what differs.
    A family that shares its model class with another (timm's hybrid ViTs are ``VisionTransformer`` with a
    convolutional stem) also sets ``embed_classes``: the patch embeddings that tell its models apart.
    """
    name: str = ''
    classes: Tuple[Type[nn.Module], ...] = ()
    embed_classes: Tuple[Type[nn.Module], ...] = ()  # empty: any patch embedding
    timm_modules: Tuple[str, ...] = ()
    args: Dict[str, Rule] = {}

    # -- where things are
    def trunk(self, model: nn.Module) -> nn.Module:
        """The module that holds ``blocks`` and ``patch_embed`` (the model itself unless it wraps an encoder)."""
        return model

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.trunk(model).blocks

    def patch_embed(self, model: nn.Module) -> nn.Module:
        return self.trunk(model).patch_embed

    # -- tokens
    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(getattr(self.trunk(model), 'num_prefix_tokens', 0))

    def has_class_token(self, model: nn.Module) -> bool:
        return getattr(self.trunk(model), 'cls_token', None) is not None

    def num_registers(self, model: nn.Module) -> int:
        return int(getattr(self.trunk(model), 'num_reg_tokens', 0))

    def attention_pool(self, model: nn.Module) -> Optional[nn.Module]:
        """The model's attention-pooling head (timm's ``AttentionPoolLatent``), None otherwise."""
        pool = getattr(self.trunk(model), 'attn_pool', None)
        return pool if isinstance(pool, AttentionPoolLatent) else None

    def token_grid(self, model: nn.Module, x: Optional[Tensor]) -> tuple:
        """The patch grid (rows, cols) a forward on ``x`` produces: the static grid, or for a model that
        takes any image size the grid of ``x``'s own size."""
        patch_embed = self.patch_embed(model)
        grid = tuple(getattr(patch_embed, 'grid_size', ()) or ())
        if getattr(self.trunk(model), 'dynamic_img_size', False) and isinstance(x, Tensor) and x.dim() == 4:
            grid = tuple(int(s) for s in patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
        return grid

    def num_patches(self, model: nn.Module) -> int:
        return int(self.patch_embed(model).num_patches)

    def token_pixels(self, model: nn.Module) -> Tuple[int, int]:
        """The image pixels (rows, cols) one patch token covers: the patch size."""
        return tuple(int(p) for p in self.patch_embed(model).patch_size)

    def in_chans(self, model: nn.Module) -> Optional[int]:
        """The image channels the model takes (None when its patch embedding does not say)."""
        channels = getattr(getattr(self.patch_embed(model), 'proj', None), 'in_channels', None)
        return int(channels) if channels is not None else None

    # -- the forward, taken apart
    def check_positions(self, model: nn.Module) -> None:
        """Refuse a position scheme pooling cannot keep exact (a ``ValueError``); nothing by default."""

    def block_inputs(self, model: nn.Module, images: Tensor) -> Tensor:
        """The tokens entering block 0 (the first steps of timm's ``forward_features``)."""
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)

    def block_context(self, model: nn.Module, images: Tensor) -> Dict[str, Any]:
        """What every block is given besides its tokens for ``images``' size (keyword arguments)."""
        return {}

    def head(self, model: nn.Module, tokens: Tensor) -> Tensor:
        """Logits (pooled features when headless) from the tokens leaving the last block."""
        return model.forward_head(model.norm(tokens))

    def output_rows(self, model: nn.Module, index: int) -> Optional[slice]:
        """The query rows of block ``index`` whose attention output reaches the model's output: only the class
        token's in the last block of a token-pooled model, all otherwise (None)."""
        last = index == len(self.blocks(model)) - 1
        if last and getattr(model, 'global_pool', None) == 'token' and self.has_class_token(model):
            return slice(0, 1)
        return None

    # -- rebuilding
    def geometry(self, model: nn.Module) -> Dict[str, Any]:
        """The constructor arguments that give ``model`` its state-dict shapes and its forward."""
        raise NotImplementedError

    def common_geometry(self, model: nn.Module) -> Dict[str, Any]:
        """The constructor arguments the ViT-like families share, read from the modules."""
        trunk, block = self.trunk(model), self.blocks(model)[0]
        attn = block.attn
        height, width = (int(s) for s in self.patch_embed(model).img_size)
        patch = self.patch_embed(model).patch_size
        geometry: Dict[str, Any] = dict(
            img_size=height if height == width else [height, width],
            patch_size=int(patch[0]) if patch[0] == patch[1] else [int(p) for p in patch],
            num_classes=int(model.num_classes),
            global_pool=model.global_pool,
            embed_dim=int(trunk.embed_dim),
            depth=len(self.blocks(model)),
            num_heads=int(attn.num_heads),
        )
        fc2 = getattr(block.mlp, 'fc2', None)  # its input is int(dim * mlp_ratio) for Mlp, GluMlp and SwiGLU alike
        if fc2 is not None:
            geometry['mlp_ratio'] = fc2.in_features / trunk.embed_dim
        return geometry


_REGISTRY: List[Family] = []


def register(family: Family) -> Family:
    """Add ``family`` to the ones :func:`family_of` knows (a subclass's exact class wins over its parent's)."""
    _REGISTRY.append(family)
    return family


def registered() -> Tuple[Family, ...]:
    return tuple(_REGISTRY)


def family_of(model: nn.Module) -> Optional[Family]:
    """The family whose classes ``model`` is an instance of (the most specific class first; at the same class,
    a family told by its patch embedding's class before one told by the model class alone), or None."""
    def claims(f: Family) -> bool:
        return isinstance(model, f.classes) and (
            not f.embed_classes or isinstance(f.patch_embed(model), f.embed_classes))

    matches = [f for f in _REGISTRY if claims(f)]
    if not matches:
        return None
    return min(matches, key=lambda f: (min(type(model).__mro__.index(c) for c in f.classes
                                           if isinstance(model, c)), not f.embed_classes))


def has_qkv_bias(attn: nn.Module) -> bool:
    qkv = getattr(attn, 'qkv', None)
    if qkv is not None:
        return qkv.bias is not None or getattr(attn, 'q_bias', None) is not None
    return attn.q_proj.bias is not None
