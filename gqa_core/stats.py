"""``python -m gqa_core.stats``: see :mod:`gqa_core.training.stats`."""
from .training.stats import main

if __name__ == '__main__':
    main()
