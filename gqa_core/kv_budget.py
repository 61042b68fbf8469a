"""``python -m gqa_core.kv_budget``: see :mod:`gqa_core.lens.kv_budget`."""
from .lens.kv_budget import main

if __name__ == '__main__':
    main()
