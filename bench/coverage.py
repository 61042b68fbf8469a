"""How many of timm's Hub-hosted Vision Transformer weights GQA Lens accepts, counted from timm's own
``default_cfgs`` (no network: every model is built on the ``meta`` device).

    python bench/coverage.py            # the summary, a line per refusal reason
    python bench/coverage.py --list     # and every refused repo

A repo counts as accepted when the whole product takes it: the config guard accepts its architecture, every
block converts (G = H / 2 where H is even, else G = H), and the converted model describes itself for saving
(its geometry read from the modules and checked by a meta-device rebuild). The denominator is every
pretrained tag with Hub weights of every timm module that builds a transformer with global self-attention
over patch tokens (:data:`PATCH_TRANSFORMER_MODULES`); ``share`` is over all of them, ``vit_share`` over the four
ViT modules GQA Lens was built on. Left out as not that kind of model: windowed or hierarchical attention (Swin,
Hiera, MaxViT, MViTv2, PVT, Twins, ...), XCiT's cross-covariance attention, TNT's and CrossViT's nested token
sets, and the convolutional families.
"""
from __future__ import annotations

import argparse
import collections
import json
import warnings
from typing import Dict, List, Tuple

import timm
import torch

from gqa_core import convert
from gqa_core.io.config import backbone_of
from gqa_core.core.vit import blocks_of
from gqa_core.io.safe_config import check_backbone

VIT_MODULES = ('timm.models.vision_transformer', 'timm.models.deit', 'timm.models.eva', 'timm.models.beit')
# timm 1.0.31's other transformers over patch tokens (NaFlexVit and the vision towers of Qwen3, DeepSeek and
# Gemma 4 arrived in 1.0.30-1.0.31)
OTHER_VIT_MODULES = ('timm.models.vision_transformer_hybrid', 'timm.models.vision_transformer_relpos',
                     'timm.models.vision_transformer_sam', 'timm.models.naflexvit', 'timm.models.qwen3_vit',
                     'timm.models.deepseek_vit', 'timm.models.gemma4_vit', 'timm.models.cait')
PATCH_TRANSFORMER_MODULES = VIT_MODULES + OTHER_VIT_MODULES


def hub_tags(modules: Tuple[str, ...]) -> Dict[str, List[str]]:
    """Architecture -> its pretrained tags that have Hub weights, for the architectures of ``modules``."""
    tags: Dict[str, List[str]] = collections.defaultdict(list)
    for name in timm.list_pretrained():
        arch = name.split('.')[0]
        if timm.models.model_entrypoint(arch).__module__ not in modules:
            continue
        if getattr(timm.models.get_pretrained_cfg(name), 'hf_hub_id', None):
            tags[arch].append(name)
    return tags


def accepts(arch: str) -> str:
    """'' when GQA Lens takes the architecture through conversion and saving, else the reason."""
    try:
        check_backbone(arch)
        with torch.device('meta'), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = timm.create_model(arch, pretrained=False)
            blocks = blocks_of(model)  # a classifier may keep them in its encoder; an unknown model is refused
            H = getattr(getattr(blocks[0], 'attn', None), 'num_heads', 2)  # convert names what it refuses
            convert(model, 'gqa', H // 2 if H % 2 == 0 else H)
            backbone_of(model)
    except Exception as e:  # the reason is the report
        return f'{type(e).__name__}: {str(e).split(";")[0][:140]}'
    return ''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--list', action='store_true', help='print every refused repo')
    parser.add_argument('--json', help='also write the summary (per-module counts, shares, reasons) here')
    args = parser.parse_args()
    tags = hub_tags(PATCH_TRANSFORMER_MODULES)
    reasons: Dict[str, List[str]] = collections.defaultdict(list)
    accepted = total = 0
    per_module = collections.Counter()
    per_module_ok = collections.Counter()
    for arch, names in sorted(tags.items()):
        reason = accepts(arch)
        module = timm.models.model_entrypoint(arch).__module__.rsplit('.', 1)[-1]
        total += len(names)
        per_module[module] += len(names)
        if reason:
            reasons[reason] += names
        else:
            accepted += len(names)
            per_module_ok[module] += len(names)
    vit = [m.rsplit('.', 1)[-1] for m in VIT_MODULES]
    vit_ok, vit_total = sum(per_module_ok[m] for m in vit), sum(per_module[m] for m in vit)
    summary = dict(accepted=accepted, total=total, share=round(accepted / total, 4), vit_accepted=vit_ok,
                   vit_total=vit_total, vit_share=round(vit_ok / vit_total, 4), timm=timm.__version__,
                   per_module={m: dict(accepted=per_module_ok[m], total=n) for m, n in sorted(per_module.items())},
                   refused={reason: len(names) for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1]))})
    print(json.dumps({k: v for k, v in summary.items() if k != 'refused'}))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(summary, f, indent=2)
    for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        print(f'{len(names):4d} refused: {reason}')
        if args.list:
            for name in names:
                print(f'       {name}')


if __name__ == '__main__':
    main()
