"""The ViTs users bring, with random weights (no network): DINOv2-style registers at 518 px without a head,
non-square inputs, dynamic image size, register-only models, and parallel-block ViTs that cannot convert."""
import copy

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from gqa_core import convert, record
from gqa_core.lens.analysis import HEADLESS_NOTE, analyse, model_input
from gqa_core.io.hub import create_model, save_pretrained
from gqa_core.lens.views import Choice, header, render
from gqa_core.lens.models import ModelRegistry
from gqa_core.core.record import MEAN_ROW

from support import EXAMPLES_DIR, ROOT

PHOTO = EXAMPLES_DIR / 'grace_hopper.jpg'


def saved_registry(tmp_path, name, model):
    save_pretrained(model, tmp_path / name)
    return ModelRegistry(ROOT / 'assets' / 'models', model_dirs=[str(tmp_path)])


def test_dinov2_register_model_at_518_headless(tmp_path):
    torch.manual_seed(0)
    model = create_model('vit_small_patch14_reg4_dinov2', dict(img_size=518, num_classes=0), 'kdgqa', 3)
    loaded = saved_registry(tmp_path, 'dino', model).get('local:dino')
    assert loaded.preprocessing['input_size'] == [3, 518, 518]
    a = analyse(loaded, Image.open(PHOTO))
    rec = a.recording
    assert a.top5 == [] and HEADLESS_NOTE in a.notes and rec.headless
    assert rec.grid_size == (37, 37) and rec.num_prefix_tokens == 5
    assert rec.row_labels == ['class token', 'register 0', 'register 1', 'register 2', 'register 3']
    assert a.summary_rows.shape == (12, 6, 37 * 37)
    assert rec.layers[0].attention.shape == (1, 6, 5, 1374)
    for fusion in ('mean', 'max', 'min'):
        assert a.rollout(fusion).shape == (37 * 37,)
    kept = sum(t.numel() * t.element_size() for layer in rec.layers
               for t in (layer.queries, layer.keys, layer.normalisers()))
    assert kept <= 12 * (6 + 3) * 1374 * (64 * 2 + 4), 'picks keep float16 q and k and a float32 normaliser per row'
    assert a.nbytes() - kept < 20 * 2**20, 'a session keeps summary rows and rollouts, not 12 layers of T x T maps'
    top = header(a)
    assert top.top5 == {} and 'no classifier head' in top.summary and 'register 3' in top.summary
    assert render(a, Choice('overlay', 11, '2')).picture.shape == (224, 224, 3)
    assert 'layer 11, head 2' in render(a, Choice('overlay', 11, '2')).caption


def test_non_square_img_size_saves_its_real_input_size(tmp_path):
    torch.manual_seed(0)
    model = create_model('vit_tiny_patch16_224', dict(img_size=(64, 96), num_classes=10), 'gqa', 1)
    loaded = saved_registry(tmp_path, 'wide', model).get('local:wide')
    assert loaded.preprocessing['input_size'] == [3, 64, 96]
    a = analyse(loaded, Image.open(PHOTO))
    assert a.view.shape == (64, 96, 3) and a.recording.grid_size == (4, 6)
    assert len(a.top5) == 5
    overlay = render(a, Choice('overlay')).picture
    assert overlay.shape[1] == 224 and abs(overlay.shape[0] / overlay.shape[1] - 2 / 3) < 0.01, 'keeps 2:3'


def test_dynamic_img_size_records_the_grid_it_saw():
    torch.manual_seed(0)
    model = convert(timm.create_model('vit_tiny_patch16_224', img_size=64, dynamic_img_size=True, num_classes=10,
                                      depth=2).eval(), 'kdgqa', 3)
    for (h, w), grid in (((64, 64), (4, 4)), ((96, 160), (6, 10))):
        with torch.no_grad(), record(model, rollout=('mean',)) as rec:
            model(torch.randn(1, 3, h, w))
        r = rec.result
        assert r.grid_size == grid
        assert r.layers[0].attention.shape[-1] == 1 + grid[0] * grid[1]
        assert r.rollout['mean'].shape == (1, 1 + grid[0] * grid[1])


def test_register_only_model_labels_its_rows_and_uses_the_mean_over_queries():
    torch.manual_seed(0)
    model = convert(timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, class_token=False,
                                      reg_tokens=2, global_pool='avg', num_classes=10, depth=2).eval(), 'gqa', 1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), record(model, attention='full') as full:
        model(x)
    with torch.no_grad(), record(model) as rec:
        model(x)
    r = rec.result
    assert r.row_labels == ['register 0', 'register 1', MEAN_ROW] and r.summary_row == 2
    maps = full.result.layers[1].attention
    assert torch.allclose(r.layers[1].attention[:, :, 2], maps.mean(-2), atol=1e-6)
    assert torch.allclose(r.layers[1].attention[:, :, :2], maps[:, :, :2], atol=1e-6)


@pytest.mark.parametrize('name', ['vit_small_patch16_18x2_224', 'vit_pwee_patch16_reg1_gap_256'])
def test_parallel_block_vits_are_refused_and_left_untouched(name):
    torch.manual_seed(0)
    model = timm.create_model(name, depth=2).eval()
    before = copy.deepcopy(model.state_dict())
    kind = type(model.blocks[0]).__name__
    with pytest.raises(ValueError, match=f'block 0 \\({kind}\\).*not changed'):
        convert(model, 'gqa', 2)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_one_unsupported_block_late_in_the_stack_leaves_the_model_whole():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=4).eval()
    model.blocks[3].attn = torch.nn.Identity()
    attns = [b.attn for b in model.blocks]
    with pytest.raises(ValueError, match=r"block 3 \(Block\): attention Identity is not one of timm's attention.Attention, eva.EvaAttention"):
        convert(model, 'gqa', 1)
    assert [b.attn for b in model.blocks] == attns, 'no block was converted'
    with pytest.raises(ValueError, match='num_kv_heads=2 must be a positive divisor'):  # a bad G also changes nothing
        convert(timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2), 'gqa', 2)


def test_model_input_is_the_view_the_model_saw(tmp_path):
    torch.manual_seed(0)
    model = create_model('vit_tiny_patch16_224', dict(img_size=(48, 32), num_classes=3), 'mha')
    loaded = saved_registry(tmp_path, 'tall', model).get('local:tall')
    view, x = model_input(loaded, Image.open(PHOTO))
    assert view.shape == (48, 32, 3) and tuple(x.shape) == (1, 3, 48, 32)
    assert np.isfinite(x.numpy()).all()
