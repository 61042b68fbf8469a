"""``python -m gqa_core.stats``: see :mod:`gqa_core.lens.stats`."""
from .lens.stats import main

if __name__ == '__main__':
    main()
