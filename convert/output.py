"""Writing a conversion's output folder all at once, or not at all.

A conversion is written into a fresh folder beside the destination (same file system) and renamed into
place only when complete, so a failure leaves the destination as it was. Every conversion records the
files it wrote (`MANIFEST`); converting into a folder that holds an earlier conversion replaces exactly
those files. Anything else in the destination (a user's notes, even inside `transformer/params/`) is
carried over untouched, and a conversion that would overwrite such a file is refused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

from convert.errors import ConversionError, short_list

MANIFEST = "converted_files.json"


def _files(root: str) -> set[str]:
    """Relative paths of every file and link under `root` (a link to a folder counts as a file)."""
    out = set()
    for folder, dirs, files in os.walk(root):
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for name in files + links:
            out.add(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return out


def _written_before(dst: str) -> set[str]:
    """The files an earlier conversion recorded writing into `dst` (none if it recorded nothing)."""
    try:
        with open(os.path.join(dst, MANIFEST)) as f:
            recorded = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {MANIFEST, *recorded} if isinstance(recorded, list) else set()


def _parents(path: str) -> set[str]:
    return {path.rsplit("/", i)[0] for i in range(1, path.count("/") + 1)}


def _clashes(keep: set[str], ours: set[str]) -> list[str]:
    """Kept files at a path of ours, at a folder of ours, or inside what is a file of ours."""
    ours_dirs = set().union(*map(_parents, ours))
    return sorted(k for k in keep if k in ours or k in ours_dirs or _parents(k) & ours)


def write_folder(dst: str, write: Callable[[str], None]) -> None:
    """Run `write(folder)` on an empty folder beside `dst`, then put it in place of `dst`, carrying over
    the files of `dst` that no earlier conversion wrote. On any failure `dst` is left as it was."""
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and (os.path.islink(dst) or not os.path.isdir(dst)):
        raise ConversionError(f"{dst}: exists and is not a folder")
    parent, name = os.path.split(dst)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.converting-", dir=parent)
    except OSError as e:
        raise ConversionError(f"{dst}: cannot write here ({e.strerror})") from None
    moved: list[str] = []
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the output is an ordinary folder
        write(tmp)
        ours = _files(tmp)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"files": sorted(ours)}, f, indent=0)
        keep = _files(dst) - _written_before(dst) if os.path.isdir(dst) else set()
        clash = _clashes(keep, ours | {MANIFEST})
        if clash:
            raise ConversionError(f"{dst}: holds files that no earlier conversion wrote and that this one would "
                                  f"replace: {short_list(clash, 4)} (move them, or convert into a new folder)")
        for rel in sorted(keep):
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            os.rename(os.path.join(dst, rel), os.path.join(tmp, rel))
            moved.append(rel)
        if os.path.isdir(dst):
            old = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
            os.rename(dst, os.path.join(old, name))
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(os.path.join(old, name), dst)
                os.rmdir(old)
                raise
            shutil.rmtree(old, ignore_errors=True)  # only what earlier conversions wrote: the rest was moved over
        else:
            os.rename(tmp, dst)
    except BaseException:
        for rel in moved:  # give the user's files back before the partial output goes
            os.rename(os.path.join(tmp, rel), os.path.join(dst, rel))
        shutil.rmtree(tmp, ignore_errors=True)
        raise
