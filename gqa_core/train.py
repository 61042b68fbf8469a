"""``python -m gqa_core.train``: see :mod:`gqa_core.training.train`."""
from .training.train import main

if __name__ == '__main__':
    main()
