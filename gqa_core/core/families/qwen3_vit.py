"""timm's Qwen3-VL / Qwen3.5 / Qwen3.8 vision tower (qwen3_vit.py): ``Qwen3VitEncoder`` (the ``*_enc`` models,
the VLM's own tokens) and ``Qwen3VitClassifier``, which wraps one as ``encoder``. Pre-norm ``EvaBlock`` s with
``AttentionRope`` (2D RoPE, rotate-half) over the patch tokens only, a learned position grid resampled to the
input's grid, no final norm; the VLM projector (``merger``) pixel-unshuffles k x k tokens."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

from torch import Tensor, nn
from timm.layers import AttentionRope
from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder

from ..rules import Rule, integer, number, one_of
from .base import RATE, Family, is_present, register
from .vision_transformer import BACKBONE_ARGS

__all__ = ['VlmTowerFamily', 'Qwen3VitFamily', 'QWEN3_ARGS', 'TOWER_ARGS']

# The geometry keys the VLM towers' classifier and encoder constructors share (each takes the ones it has)
TOWER_ARGS: Dict[str, Rule] = {
    **{k: BACKBONE_ARGS[k] for k in ('img_size', 'patch_size', 'in_chans', 'num_classes', 'embed_dim', 'depth',
                                     'num_heads', 'mlp_ratio', 'final_norm')},
    'out_features': integer(0, 65_536),  # the projector's width (the source LLM's); 0: no last projection
    'rope_temperature': number(1, 1e7),
    'norm_eps': number(1e-12, 1e-2),
    'drop_rate': RATE,
    'proj_drop_rate': RATE,
    'attn_drop_rate': RATE,
    'drop_path_rate': RATE,
}
QWEN3_ARGS: Dict[str, Rule] = {
    **TOWER_ARGS,
    'global_pool': one_of('', 'avg', 'merge', says="'', avg or merge (merge: the encoder's projector)"),
    'encoder_pool': one_of('', 'merge'),
    'merge_size': integer(1, 8),
    'pos_embed_grid_size': integer(1, 256),
}


class VlmTowerFamily(Family):
    """A VLM vision tower in timm: an encoder class (blocks over patch tokens, no prefix tokens, 2D RoPE, a VLM
    projector) that is also an entrypoint, and a classifier class that wraps it as ``encoder`` (projector or
    not, then mean pooling, a norm and a linear head). Subclasses name the classes and the projector."""
    encoder_class: type = nn.Module
    projector_name: str = ''  # the encoder's projector attribute (None when the encoder has none)

    def trunk(self, model: nn.Module) -> nn.Module:
        return model if isinstance(model, self.encoder_class) else model.encoder

    def projector(self, model: nn.Module) -> Optional[nn.Module]:
        return getattr(self.trunk(model), self.projector_name, None)

    def token_grid(self, model: nn.Module, x: Optional[Tensor]) -> tuple:
        """The grid of ``x``'s own size: the towers take any size (the position grid and RoPE follow it)."""
        patch_embed = self.patch_embed(model)
        if isinstance(x, Tensor) and x.dim() == 4:
            return tuple(int(s) for s in patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
        return tuple(int(s) for s in patch_embed.grid_size)

    def block_inputs(self, model: nn.Module, images: Tensor) -> Tensor:
        trunk = self.trunk(model)
        return trunk._pos_embed(trunk.patch_embed(images))[0]

    def block_context(self, model: nn.Module, images: Tensor) -> Dict[str, Any]:
        """The RoPE table of ``images``' grid (what the encoder's ``_pos_embed`` returns beside the tokens)."""
        return {'rope': self.trunk(model).rope.get_embed(shape=self.token_grid(model, images))}

    def final_tokens(self, trunk: nn.Module, tokens: Tensor) -> Tensor:
        """The encoder's tokens after its last block, before the NHWC reshape (its final norm, if any)."""
        return tokens

    def grid_of(self, model: nn.Module, num: int) -> Tuple[int, int]:
        """The (rows, cols) grid of ``num`` tokens: the model's own grid, or the grid of its aspect ratio that
        holds them (what the NHWC reshape before the projector needs; a grid of another shape is refused)."""
        rows, cols = (int(s) for s in self.patch_embed(model).grid_size)
        if rows * cols == num:
            return rows, cols
        h = math.isqrt(num * rows // cols) if (num * rows) % cols == 0 else 0
        for r in (h, h + 1):
            if r > 0 and num % r == 0 and (num // r) * rows == r * cols:
                return r, num // r
        raise ValueError(f'{type(model).__name__}: {num} tokens make no grid of the model\'s {rows} x {cols} aspect; '
                         'its projector needs the patch grid (run it at its own input size)')

    def encoder_output(self, model: nn.Module, tokens: Tensor) -> Tensor:
        """The encoder's ``forward`` from the tokens leaving its last block: NHWC patches, then its projector,
        or the mean over patches (``global_pool='avg'``). The patches are given their grid only where it
        matters (the projector; an encoder's NHWC output): a mean, the classifier's included, needs none."""
        trunk = self.trunk(model)
        x = self.final_tokens(trunk, tokens)
        projector = self.projector(model)
        if projector is None and (trunk.global_pool == 'avg' or model is not trunk):
            return x.mean(dim=1) if trunk.global_pool == 'avg' else x  # the classifier flattens the grid again
        B, N, C = x.shape
        x = x.reshape(B, *self.grid_of(model, N), C)
        return projector(x) if projector is not None else x

    def head(self, model: nn.Module, tokens: Tensor) -> Tensor:
        """The encoder's output (``*_enc``), or the classifier's ``forward_head`` of it (flatten, mean, norm,
        head)."""
        out = self.encoder_output(model, tokens)
        return out if model is self.trunk(model) else model.forward_head(out)

    def tower_geometry(self, model: nn.Module) -> Dict[str, Any]:
        """What both towers read alike: patches, width, depth, heads, MLP, RoPE, norm eps, pooling, head."""
        trunk, block = self.trunk(model), self.blocks(model)[0]
        if type(block.attn) is not AttentionRope and getattr(block.attn, 'kind', None) != 'rope':
            raise ValueError(f'{type(model).__name__}: block 0 holds {type(block.attn).__name__}, not the '
                             "tower's AttentionRope")
        geometry = self.common_geometry(model)
        classifier = model is not trunk
        projector = self.projector(model)
        geometry.update(rope_temperature=float(trunk.rope.temperature), norm_eps=float(block.norm1.eps))
        if classifier:
            geometry['final_norm'] = is_present(model.norm)
        else:
            del geometry['num_classes']  # the encoder has no head (timm filters the key out anyway)
        geometry['out_features'] = self.projector_width(projector)
        return geometry

    def projector_width(self, projector: Optional[nn.Module]) -> int:
        return 0 if projector is None else int(projector.out_features)


class Qwen3VitFamily(VlmTowerFamily):
    name = 'Qwen3Vit'
    classes = (Qwen3VitClassifier, Qwen3VitEncoder)
    timm_modules = ('timm.models.qwen3_vit',)
    args = QWEN3_ARGS
    encoder_class = Qwen3VitEncoder
    projector_name = 'merger'

    def projector_width(self, projector: Optional[nn.Module]) -> int:
        """The merger's last projection (``out_features`` 0 leaves it out)."""
        return int(projector.fc2.out_features) if projector is not None and is_present(projector.fc2) else 0

    def geometry(self, model: nn.Module) -> Dict[str, Any]:
        trunk, block = self.trunk(model), self.blocks(model)[0]
        act = getattr(block.mlp, 'act', None)
        if not (isinstance(act, nn.GELU) and act.approximate == 'tanh'):  # act_layer is a class: not in a config
            raise ValueError(f'{type(model).__name__}: its MLP activation {act} is not the tower\'s GELU (tanh); '
                             'a config cannot name another')
        geometry = self.tower_geometry(model)
        pool = 'merge' if trunk.merger is not None else ''
        if model is trunk:
            geometry['global_pool'] = pool or trunk.global_pool
        else:
            geometry['encoder_pool'] = pool
        geometry.update(merge_size=int(trunk.merge_size), pos_embed_grid_size=int(trunk.pos_embed_grid_size))
        return geometry


register(Qwen3VitFamily())
