"""The one error type converters raise: a one-line message that names the offending keys."""


class ConversionError(ValueError):
    pass


def short_list(items, limit: int = 8) -> str:
    """`a, b, c (+N more)`: long key lists stay one readable line."""
    items = sorted(items)
    head = ", ".join(items[:limit])
    return head + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
