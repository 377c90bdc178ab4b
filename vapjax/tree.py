"""Nested-dict parameter trees as flat {path tuple: leaf} maps, and back."""
from __future__ import annotations

from typing import Any, Callable, Mapping

Path = tuple[str, ...]


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def partition(tree: Mapping[str, Any], select: Callable[[Path], bool]) -> tuple[dict, dict]:
    """(selected, rest): two trees whose leaves are those for which `select(path)` is (not) true."""
    flat = flatten(tree)
    return (unflatten({p: v for p, v in flat.items() if select(p)}),
            unflatten({p: v for p, v in flat.items() if not select(p)}))


def merge(*trees: Mapping[str, Any]) -> dict[str, Any]:
    """Union of trees with disjoint leaves (the inverse of `partition`)."""
    flat = {}
    for t in trees:
        flat.update(flatten(t))
    return unflatten(flat)


def path_str(path: Path) -> str:
    return "/".join(path)
