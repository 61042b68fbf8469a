"""GQA Lens core: grouped-query attention variants (MHA, GQA, KDGQA, DGQA, PGQA) for timm ViTs.

Implements "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention" (arXiv 2408.08454).
"""
from .apportion import largest_remainder, min_max_shares, official_round, query_to_kv
from .attention import GroupedQueryAttention, gqa_attention_layer, grouped_attention, key_head_norms
from .convert import convert, gqa_layers, grouping_config, kv_cache_bytes, revert
from .inference import predict
from .policies import POLICIES, Grouping, GroupingPolicy, create_policy, start_epoch
from .record import LayerRecord, Recording, record

VARIANTS = tuple(POLICIES)

__version__ = '0.1.0'
