"""``python -m gqa_core.kv_budget``: see :mod:`gqa_core.training.kv_budget`."""
from .training.kv_budget import main

if __name__ == '__main__':
    main()
