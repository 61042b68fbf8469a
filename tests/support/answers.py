"""Reading the app's /run answers as a client gets them."""


def unwrap(value):
    """A component's value from what the client returns: the value itself, or an update carrying one."""
    return value.get('value') if isinstance(value, dict) and value.get('__type__') == 'update' else value


def columns(out):
    """The four result columns of a /run answer (after status, layer and head), each as {output name: value}."""
    from app import COLUMN
    n = len(COLUMN)
    cols = [unwrap(v) for v in out[3:]]
    assert len(cols) == 4 * n, len(cols)
    return [dict(zip(COLUMN, cols[i * n:(i + 1) * n])) for i in range(4)]
