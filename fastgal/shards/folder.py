"""What a folder of cutouts holds, looked at before any row is read: the kinds of file at its top level, cutouts
one level down, and the files of a shard folder.

    from fastgal.shards.folder import kinds, nested_cutouts
    kinds("data/synth/images")            # Counter({'.jpg': 2000})
    nested_cutouts("data")                # [(Path('data/images'), Counter({'.jpg': 2000}))]

`fastgal shard` and `fastgal predict` use it to refuse, in one line, a folder they would otherwise read row by
row into a reject per row: .jpg and .fits cutouts mixed, cutouts in sub-folders, a shard folder without its
manifest.json. Names only (os.scandir); no file is opened.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from fastgal.shards.index import is_shard_file

CUTOUT_EXTS = (".jpg", ".fits")  # what shard and predict read: {id}.jpg, or {id}.fits for FITS bands


def kinds(folder) -> Counter:
    """Files at the folder's top level (hidden ones left out) by lower-case extension."""
    out = Counter()
    with os.scandir(folder) as it:
        for e in it:
            if not e.name.startswith(".") and e.is_file():
                out[os.path.splitext(e.name)[1].lower()] += 1
    return out


def files_of(folder, ext: str) -> list[Path]:
    """The folder's top-level files with extension `ext` (lower case), sorted by name."""
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if not e.name.startswith(".") and e.is_file()
                      and os.path.splitext(e.name)[1].lower() == ext)


def nested_cutouts(folder) -> list[tuple[Path, Counter]]:
    """Sub-folders (one level down, sorted) that hold .jpg or .fits files, with how many of each."""
    out = []
    with os.scandir(folder) as it:
        subs = sorted(Path(e.path) for e in it if not e.name.startswith(".") and e.is_dir())
    for sub in subs:
        try:
            k = kinds(sub)
        except OSError:
            continue
        found = Counter({x: k[x] for x in CUTOUT_EXTS if k[x]})
        if found:
            out.append((sub, found))
    return out


def counted(c: Counter) -> str:
    """Counter({'.jpg': 3, '.fits': 2}) -> '3 .jpg and 2 .fits files'."""
    parts = [f"{n} {x}" for x, n in c.most_common()]
    return (" and ".join(parts) if len(parts) <= 2 else ", ".join(parts[:-1]) + " and " + parts[-1]) + " files"


def nested_problem(folder, holds: str) -> str | None:
    """Where a folder without cutouts of its own has them one level down, in words, with the folder to pass
    (`holds`: what the command reads, e.g. '{id}.jpg cutouts'); None when no sub-folder holds any."""
    nested = nested_cutouts(folder)
    if not nested:
        return None
    where = "; ".join(f"{sub} holds {counted(c)}" for sub, c in nested[:3])
    more = f" (and {len(nested) - 3} more sub-folders)" if len(nested) > 3 else ""
    return (f"{folder} holds no cutouts itself, they are in sub-folders: {where}{more}; pass the folder that holds the "
            f"{holds}, e.g. {nested[0][0]}")


# image files fastgal does not read under these names: a folder of them would otherwise become one
# missing-image reject per row
_OTHER_NAMES = {".jpeg": ".jpg", ".jpe": ".jpg", ".jfif": ".jpg", ".fit": ".fits", ".fts": ".fits"}


def misnamed_problem(folder) -> str | None:
    """A folder whose cutouts are named other than {id}.jpg / {id}.fits exactly (.jpeg, .JPG, .fit, .FITS, ...)
    and that holds none named right, in words with the rename that fixes it; None otherwise. Names only."""
    exact, other = Counter(), Counter()
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith(".") or not e.is_file():
                continue
            ext = os.path.splitext(e.name)[1]
            if ext in CUTOUT_EXTS:
                exact[ext] += 1
            elif ext.lower() in CUTOUT_EXTS or ext.lower() in _OTHER_NAMES:
                other[ext] += 1
    if exact or not other:
        return None
    ext, n = other.most_common(1)[0]
    want = _OTHER_NAMES.get(ext.lower(), ext.lower())
    return (f"{folder} holds {n} {ext} files and no {{id}}{want}: fastgal reads cutouts named {{id}}{want} exactly; "
            f"rename them, e.g. for f in \"{folder}\"/*{ext}; do mv \"$f\" \"${{f%{ext}}}{want}\"; done")


def shard_files(folder) -> list[str]:
    """The names of `fastgal shard`'s files (tars, indexes, rejects.csv) in a folder, sorted."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if is_shard_file(e.name) and e.is_file())
