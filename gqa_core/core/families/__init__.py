"""The timm model families GQA Lens opens, one module per family (:class:`~.base.Family`): where each keeps
its blocks, tokens and positions, how its output is read, and the constructor geometry that rebuilds it.
Importing this package registers them all; :func:`family_of` finds a model's."""
from .base import Family, family_of, registered
from . import vision_transformer, vision_transformer_hybrid, vision_transformer_relpos  # noqa: F401  (each registers its family)
from . import eva, beit, naflexvit, qwen3_vit, deepseek_vit, cait, gemma4_vit  # noqa: F401

__all__ = ['Family', 'family_of', 'registered', 'timm_modules', 'family_args', 'REFUSED_MODULES']

# timm modules of transformers over patch tokens that no family opens, with the reason (what a refusal says)
REFUSED_MODULES = {
    'timm.models.vision_transformer_sam': (
        'SAM\'s blocks attend within 14 x 14 windows of a (B, H, W, C) token map (global attention in a few): '
        'pooling K/V per window would be exact (its decomposed relative position bias depends on the queries '
        'only), but recording, ablation and every view read one T x T map per image and layer'),
}


def timm_modules() -> tuple:
    """Every timm module whose architectures a registered family builds (what the config guard admits)."""
    return tuple(m for f in registered() for m in f.timm_modules)


def family_args(module: str) -> dict:
    """The constructor-argument rules of the family built by timm module ``module``."""
    for family in registered():
        if module in family.timm_modules:
            return family.args
    raise KeyError(module)
