"""GQA Lens: grouped-query attention variants (MHA, GQA, KDGQA, DGQA, PGQA) for timm ViTs, and a lens on them.

Implements "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention" (arXiv 2408.08454).

The package has three parts:

- :mod:`gqa_core.core` -- the attention core: grouping policies, the drop-in attention module, conversion from
  MHA, recording what every layer decided.
- :mod:`gqa_core.training` -- data, uptraining, evaluation, Hub I/O and validation of configs.
- :mod:`gqa_core.lens` -- analyses and figures behind the app (``app.py``).

Command lines: ``python -m gqa_core.train``, ``python -m gqa_core.evaluate``.
"""
from .core.apportion import largest_remainder, min_max_shares, official_round, query_to_kv
from .core.attention import GroupedQueryAttention, gqa_attention_layer, grouped_attention, key_head_norms
from .core.convert import convert, gqa_layers, grouping_config, kv_cache_bytes, revert
from .core.inference import predict
from .core.policies import POLICIES, Grouping, GroupingPolicy, create_policy, start_epoch
from .core.record import LayerRecord, Recording, record
from .training.hub import from_pretrained, push_to_hub, save_pretrained

VARIANTS = tuple(POLICIES)

__version__ = '0.2.0'
