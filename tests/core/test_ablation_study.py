"""Head ablation starts each layer's removals from the tokens entering that block: the same drops as running
the whole model on the image with each head removed, for every family's layer kind."""
import pytest
import torch
import torch.nn.functional as F

from gqa_core import convert
from gqa_core.core.ablation import ablate
from gqa_core.lens.heads import ablation_study
from test_families import family_model


@pytest.mark.parametrize('key', ['dinov3', 'beit-shared', 'siglip', 'pe'])
def test_study_from_cached_block_inputs_equals_every_removal_from_the_image(key):
    """The study starts layer l's removals from the tokens entering block l; each must equal the whole
    model run on the image with that one head removed (per-image KDGQA routing included)."""
    model = convert(family_model(key), 'kdgqa', 2).eval()
    x = torch.randn(1, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(2))
    headless = model.num_classes == 0
    target = None if headless else 1
    seen = []
    result = ablation_study(model, x, target, progress=lambda fraction, what: seen.append(fraction))
    L, H, G = len(model.blocks), model.blocks[0].attn.num_heads, 2
    with torch.no_grad():
        base = model(x)
        for mode in ('zero', 'mean'):
            for layer in range(L):
                for head in range(G + H):
                    kv = torch.zeros(1, L, G, dtype=torch.bool)
                    q = torch.zeros(1, L, H, dtype=torch.bool)
                    (kv if head < G else q)[0, layer, head if head < G else head - G] = True
                    with ablate(model, query_heads=q, kv_heads=kv, mode=mode):
                        out = model(x)
                    score = (F.cosine_similarity(out, base) if headless else out.softmax(-1)[:, target])[0]
                    base_score = 1.0 if headless else float(base.softmax(-1)[0, target])
                    got = (result.kv if head < G else result.query)[mode][layer, head if head < G else head - G]
                    assert got == pytest.approx(base_score - float(score), abs=2e-5), (mode, layer, head)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
