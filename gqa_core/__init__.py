"""GQA Lens: grouped-query attention variants (MHA, GQA, KDGQA, DGQA, PGQA) for timm ViTs, and a lens on them.

Implements "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention" (arXiv 2408.08454).

The package has four layers, each importing only the ones before it:

- :mod:`gqa_core.core` -- the attention core: grouping policies, the drop-in attention module, conversion from
  MHA, the head-order advisor, recording and ablating what every layer decided.
- :mod:`gqa_core.io` -- the typed model config, its validation as untrusted data, preprocessing, save / load /
  Hub.
- :mod:`gqa_core.training` -- data, uptraining, evaluation.
- :mod:`gqa_core.lens` -- analyses (of one image and of a dataset), figures and the guards a public app needs.

``import gqa_core`` loads the core only; ``from_pretrained``, ``save_pretrained`` and ``push_to_hub`` load
:mod:`gqa_core.io.hub` when first used. Command lines: ``python -m gqa_core.train``, ``python -m
gqa_core.evaluate``, ``python -m gqa_core.kv_budget``, ``python -m gqa_core.stats``, ``python -m gqa_core.convert``
(calibrated conversion with a report).
"""
from typing import Any

from .core.apportion import largest_remainder, min_max_shares, official_round, query_to_kv
from .core.attention import GroupedQueryAttention, gqa_attention_layer, grouped_attention, key_head_norms
from .core.convert import convert, grouping_config, kv_cache_bytes, revert
from .core.inference import predict
from .core.policies import POLICIES, Grouping, GroupingPolicy, create_policy, start_epoch
from .core.record import LayerRecord, Recording, record
from .core.vit import gqa_layers

VARIANTS = tuple(POLICIES)

__version__ = '0.2.0'

_HUB = ('from_pretrained', 'save_pretrained', 'push_to_hub')


def __getattr__(name: str) -> Any:
    if name in _HUB:
        from .io import hub
        return getattr(hub, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
