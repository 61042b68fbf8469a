"""timm's Gemma 4 vision tower (gemma4_vit.py): ``Gemma4VitEncoder`` (the VLM encoder, ``*_enc``) and the
``Gemma4VitClassifier`` that wraps one. Patches are embedded by a linear layer with a 2D position table, every
block gets the same 2D RoPE (cos, sin) of the patch grid, and the output is read after the encoder's pool (the
``k x k`` soft-token pool, a mean, or none) and, for the classifier, its own mean, norm and head."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

from torch import Tensor
from timm.models.gemma4_vit import Gemma4ClippableLinear, Gemma4VitClassifier, Gemma4VitEncoder

from ..rules import BOOLEAN, Rule, integer, number, one_of, optional
from .base import RATE, SIZE, Family, is_present, register

__all__ = ['Gemma4VitFamily', 'GEMMA4_ARGS']

Gemma4Model = Union[Gemma4VitEncoder, Gemma4VitClassifier]

GEMMA4_ARGS: Dict[str, Rule] = {
    'img_size': SIZE,  # accepted (and ignored) by timm's constructor: the size is the preprocessing's
    'patch_size': integer(1, 64),
    'in_chans': one_of(3, says='3 (RGB)'),
    'num_classes': integer(0, 100_000),
    'global_pool': one_of('', 'none', 'avg', 'soft', says="'', none, avg or soft (the encoder's only)"),
    'encoder_pool': one_of('', 'none', 'soft'),
    'embed_dim': integer(8, 4096),
    'depth': integer(1, 64),
    'num_heads': integer(1, 64),
    'head_dim': integer(4, 512),
    'num_kv_heads': optional(integer(1, 64)),
    'intermediate_size': integer(8, 65536),
    'norm_eps': number(1e-12, 1e-2),
    'rope_theta': number(1, 1e6),
    'position_embedding_size': integer(8, 65536),
    'pooling_kernel_size': integer(1, 16),
    'standardize': BOOLEAN,
    'use_clipped_linears': BOOLEAN,
    'final_norm': BOOLEAN,
    'drop_rate': RATE,
    'proj_drop_rate': RATE,
    'attn_drop_rate': RATE,
    'drop_path_rate': RATE,
}

DEFAULT_SIZE = (768, 768)  # timm's pretrained input size for every gemma4_vit tag


class Gemma4VitFamily(Family):
    """The encoder's blocks and patches, for both classes; the image size is the model's preprocessing's (timm
    keeps none: the model takes any size divisible by the patch, times the pool kernel for the soft pool)."""
    name = 'Gemma4Vit'
    classes = (Gemma4VitEncoder, Gemma4VitClassifier)
    timm_modules = ('timm.models.gemma4_vit',)
    args = GEMMA4_ARGS

    def trunk(self, model: Gemma4Model) -> Gemma4VitEncoder:
        return model.encoder if isinstance(model, Gemma4VitClassifier) else model

    def num_prefix_tokens(self, model: Gemma4Model) -> int:
        return 0

    def in_chans(self, model: Gemma4Model) -> Optional[int]:
        return int(self.trunk(model).in_chans)  # its patch embedding is a linear layer over flattened patches

    # -- sizes: from the preprocessing (pretrained_cfg), since the model has no fixed one
    def image_size(self, model: Gemma4Model) -> Tuple[int, int]:
        size = getattr(model, 'pretrained_cfg', {}).get('input_size') or (3, *DEFAULT_SIZE)
        return int(size[-2]), int(size[-1])

    def token_grid(self, model: Gemma4Model, x: Optional[Tensor]) -> tuple:
        ph, pw = self.trunk(model).patch_size
        height, width = tuple(x.shape[-2:]) if isinstance(x, Tensor) and x.dim() == 4 else self.image_size(model)
        return int(height) // ph, int(width) // pw

    def num_patches(self, model: Gemma4Model) -> int:
        rows, cols = self.token_grid(model, None)
        return rows * cols

    # -- the forward, taken apart
    def check_positions(self, model: Gemma4Model) -> None:
        """A clippable linear whose clamps were switched off (``set_clamp_enabled(False)``) still holds its
        bounds: the grouped layer would either clamp (not timm's output) or drop them (not its state dict)."""
        for index, block in enumerate(self.blocks(model)):
            for name, module in block.attn.named_children():
                if isinstance(module, Gemma4ClippableLinear) and not module.use_clipped \
                        and hasattr(module, 'input_min'):
                    raise ValueError(f'block {index} (Gemma4Block): attn.{name} holds clamp bounds with clamping '
                                     'switched off (set_clamp_enabled(False)); switch it back on to convert; '
                                     'the model was not changed')

    def _positions(self, model: Gemma4Model, rows: int, cols: int, like: Tensor) -> Tensor:
        """Gemma4's internal ``(x, y)`` position ids ``(1, rows * cols, 2)`` of a dense row-major grid."""
        coord, _ = self.patch_embed(model)._default_patch_coord(1, rows, cols, like.device)
        return coord.flip(dims=(-1,))

    def block_inputs(self, model: Gemma4Model, images: Tensor) -> Tensor:
        trunk = self.trunk(model)
        trunk._assert_raw_img_conformant(images)
        return trunk.patch_embed(images)[0]

    def block_context(self, model: Gemma4Model, images: Tensor) -> Dict[str, Any]:
        """The 2D RoPE of ``images``' patch grid, as ``_encode`` gives every block (one image's: it broadcasts)."""
        trunk = self.trunk(model)
        weight = trunk.patch_embed.input_proj.weight  # the tokens' device and dtype
        rope_cos, rope_sin = trunk.rotary_emb(weight, self._positions(model, *self.token_grid(model, images), weight))
        return {'rope_cos': rope_cos, 'rope_sin': rope_sin}

    def _grid_of(self, model: Gemma4Model, tokens: int) -> Tuple[int, int]:
        """The patch grid of ``tokens`` patches: the model's own size's, else a square one."""
        rows, cols = self.token_grid(model, None)
        if rows * cols != tokens:
            rows = cols = int(round(tokens ** 0.5))
            if rows * cols != tokens:
                raise ValueError(f'{tokens} Gemma4 tokens are not the grid of the model\'s input size')
        return rows, cols

    def encoder_output(self, model: Gemma4Model, tokens: Tensor) -> Tensor:
        """What ``Gemma4VitEncoder.forward`` makes of the last block's tokens (no padding: dense images)."""
        trunk = self.trunk(model)
        if trunk.global_pool == 'soft':
            x, _ = trunk.pooler(tokens, self._positions(model, *self._grid_of(model, tokens.shape[1]), tokens), None)
            return (x - trunk.std_bias) * trunk.std_scale if trunk.std_bias is not None else x
        if trunk.global_pool == 'avg':
            return tokens.mean(dim=1)
        return tokens

    def head(self, model: Gemma4Model, tokens: Tensor) -> Tensor:
        x = self.encoder_output(model, tokens)
        return model.forward_head(x) if isinstance(model, Gemma4VitClassifier) else x

    # -- rebuilding
    def geometry(self, model: Gemma4Model) -> Dict[str, Any]:
        """The encoder's constructor arguments (plus the classifier's); ``img_size`` is left to the
        preprocessing, which the saved config carries."""
        trunk = self.trunk(model)
        block = trunk.blocks[0]
        attn = block.attn
        ph, pw = trunk.patch_size
        native = {int(getattr(b.attn, 'native_kv_heads', None) or getattr(b.attn, 'num_kv_heads', None)
                      or b.attn.num_heads) for b in trunk.blocks}
        if len(native) != 1:
            raise ValueError(f'Gemma4 blocks with different KV heads {sorted(native)} have no timm constructor')
        kv = native.pop()
        geometry: Dict[str, Any] = dict(
            patch_size=int(ph) if ph == pw else [int(ph), int(pw)],
            global_pool=trunk.global_pool,
            embed_dim=int(trunk.embed_dim),
            depth=len(trunk.blocks),
            num_heads=int(attn.num_heads),
            head_dim=int(attn.head_dim),
            num_kv_heads=None if kv == attn.num_heads else kv,
            intermediate_size=int(block.mlp.down_proj.linear.in_features),
            norm_eps=float(block.norm1.eps),
            rope_theta=float(trunk.rotary_emb.rope_theta),
            position_embedding_size=int(trunk.patch_embed.position_embedding_size),
            pooling_kernel_size=int(trunk.pooling_kernel_size),
            standardize=trunk.std_bias is not None,
            use_clipped_linears=hasattr(block.mlp.down_proj, 'input_min'),
        )
        if isinstance(model, Gemma4VitClassifier):
            geometry.update(num_classes=int(model.num_classes), global_pool=model.global_pool,
                            encoder_pool=model.encoder_pool, final_norm=is_present(model.norm))
        return geometry


register(Gemma4VitFamily())
