"""One JSON line per ViT family GQA Lens takes: conversion exactness and what one analysis costs, at the
family's own default resolution, with random weights (no network).

    python bench/bench_families.py                      # every family
    python bench/bench_families.py --only dinov3 beit   # some

For each: ``convert_max_abs`` is max |timm's output - convert(model, 'gqa', H)'s| on two images (MHA
conversion must be exact); the model converted to KDGQA at G = H / 2 is saved as a GQA Lens folder and
loaded through the app's registry as ``local:NAME``; then, on one photo, ``analyse_s`` (median of 3, after a
warm-up), ``analyse_peak_rss_mb`` (peak RSS increase of one analysis after the warm-up) and
``first_analyse_peak_rss_mb`` (the warm-up's own: allocator pools included; each family runs in a fresh process)
of the app's analysis (recorded forward, summary rows, three rollouts, the pooling query where there is one).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'bench'))
from bench_scale import PeakRSS  # noqa: E402  (also sets the offline environment)

# family -> (timm model at its default size, what it exercises)
FAMILIES = {
    'vit': ('vit_small_patch16_224', 'timm VisionTransformer, class token'),
    'deit-distilled': ('deit_small_distilled_patch16_224', 'class + distillation token'),
    'dinov2-reg': ('vit_small_patch14_reg4_dinov2', '518 px, 4 registers, layer scale'),
    'siglip': ('vit_base_patch16_siglip_224', 'attention-pooling head, no class token'),
    'dinov3': ('vit_small_patch16_dinov3', 'EVA attention, RoPE, 4 registers'),
    'eva02': ('eva02_small_patch14_336', 'EVA attention, RoPE, SwiGLU, 336 px'),
    'pe': ('vit_pe_core_small_patch16_384', 'AttentionRope, attention pool, 384 px'),
    'beit': ('beit_base_patch16_224', 'relative position bias per layer'),
}


def measure(key: str, name: str, folder: Path) -> dict:
    import timm
    import torch
    from PIL import Image
    from gqa_core import convert, save_pretrained
    from gqa_core.lens.analysis import analyse
    from gqa_core.lens.models import ModelRegistry
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    H = model.blocks[0].attn.num_heads
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        reference = model(x)
        exact = float((convert(model, 'gqa', H)(x) - reference).abs().max())
    save_pretrained(convert(model, 'kdgqa', H // 2 if H % 2 == 0 else H), folder / key)
    loaded = ModelRegistry(model_dirs=[folder]).get(f'local:{key}')
    image = Image.open(ROOT / 'assets' / 'examples' / 'grace_hopper.jpg').convert('RGB')
    with PeakRSS() as first:  # the first request: allocator pools and lazy imports included
        analyse(loaded, image)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        analyse(loaded, image)
        times.append(time.perf_counter() - start)
    with PeakRSS() as peak:
        analysis = analyse(loaded, image)
    rec = analysis.recording
    return dict(family=key, model=name, tokens=int(rec.rollout['mean'].shape[-1]), heads=H,
                convert_max_abs=exact, analyse_s=round(statistics.median(times), 3),
                analyse_peak_rss_mb=round(peak.increase_mb, 1), first_analyse_peak_rss_mb=round(first.increase_mb, 1),
                summary=analysis.summary_label,
                pooling_query=rec.pool_attention is not None, threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', nargs='+', choices=sorted(FAMILIES), default=list(FAMILIES))
    parser.add_argument('--in-process', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        with tempfile.TemporaryDirectory() as tmp:
            for key in args.only:
                print(json.dumps(measure(key, FAMILIES[key][0], Path(tmp))), flush=True)
        return
    for key in args.only:  # each family in a fresh process: its memory figures owe nothing to the one before
        subprocess.run([sys.executable, __file__, '--in-process', '--only', key], check=True)


if __name__ == '__main__':
    main()
