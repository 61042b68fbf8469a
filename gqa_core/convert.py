"""``python -m gqa_core.convert``: see :mod:`gqa_core.lens.calibrated_conversion` (a command, not for import:
``gqa_core.convert`` is the conversion function)."""
from .lens.calibrated_conversion import main

if __name__ == '__main__':
    main()
