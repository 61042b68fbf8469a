"""``python -m gqa_core.evaluate``: see :mod:`gqa_core.training.evaluate`."""
from .training.evaluate import main

if __name__ == '__main__':
    main()
