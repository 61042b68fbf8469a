"""This process's resident memory as Linux reports it in ``/proc/self``: what the memory benchmarks read."""
from pathlib import Path


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB: ``VmRSS`` (now) or ``VmHWM`` (the peak)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Make the peak (``VmHWM``) start again from the current resident size."""
    Path('/proc/self/clear_refs').write_text('5')  # VmHWM := VmRSS
