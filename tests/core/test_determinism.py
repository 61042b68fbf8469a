"""Eval in the default mode: an image's logits never depend on the rest of the batch."""
import copy

import pytest
import torch

from gqa_core import convert, predict

from support import tiny_vit

VARIANTS = [('mha', None, {}), ('gqa', 3, {}), ('kdgqa', 3, {}), ('dgqa', 3, {'stat': 'diff', 'window': 1}),
            ('dgqa', 3, {'stat': 'ema', 'window': 2}), ('pgqa', 3, {}), ('pgqa', 3, {'noise_in_eval': True})]


def trained(variant, G, options):
    model = convert(tiny_vit(depth=3), variant, G, **options)
    model.train()
    with torch.no_grad():
        for step in range(3):  # lets DGQA move its allocation away from uniform
            model(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(step)) * (1 + step))
    return model.eval()


@pytest.mark.parametrize('variant,G,options', VARIANTS)
def test_image_alone_in_batch_and_later_give_identical_logits(variant, G, options):
    model = trained(variant, G, options)
    gen = torch.Generator().manual_seed(42)
    image = torch.randn(1, 3, 32, 32, generator=gen)
    others = torch.randn(32, 3, 32, 32, generator=gen) * 3
    batch = torch.cat([others[:17], image, others[17:]])
    alone = predict(model, image)
    assert torch.equal(predict(model, batch)[17:18], alone)
    with torch.no_grad():
        model(others)  # unrelated traffic in between
        # plain batched forward: same grouping semantics, so equal up to BLAS rounding
        assert (model(batch)[17:18] - alone).abs().max() <= 1e-5
    assert torch.equal(predict(model, image), alone)


def test_official_kdgqa_depends_on_the_batch_which_paper_mode_fixes():
    base = tiny_vit(depth=3)
    official = convert(copy.deepcopy(base), 'kdgqa', 3, compat='official')
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 32, 32, generator=gen)
    batch = torch.cat([image, torch.randn(15, 3, 32, 32, generator=gen) * 4])
    with torch.no_grad():
        assert (official(batch)[:1] - official(image)).abs().max() > 1e-4


def test_predict_rejects_training_mode_and_bad_shapes():
    model = tiny_vit()
    with pytest.raises(ValueError, match='shape'):
        predict(model, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match='eval mode'):
        predict(model.train(), torch.randn(1, 3, 32, 32))
