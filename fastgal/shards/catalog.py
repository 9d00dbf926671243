"""Catalogs: read a CSV with exact ids, check target columns, and the train/valid split.

    python -c "from fastgal.shards.catalog import read_catalog; print(read_catalog('data/synth/data/master.csv').head())"

A leaf module (pandas, numpy; torch only for the split): `shards` uses it, and so may the
SDSS downloader. SDSS objIDs are 64-bit integers beyond float64 precision (2**53), so every
column is read as text and ids stay strings; nothing here ever turns an id into a float.

Row checks return a reason per row (None = usable) instead of raising, so a caller can report
every bad row at once; only problems with the file as a whole raise ValueError.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np
import pandas as pd

# An id becomes a tar member name "{id}.jpg" and an image file name, so: no dots (webdataset
# splits a member name at its first dot), no slashes, ASCII, and short enough for a plain
# USTAR header (100 chars for the whole name), so tars need no PAX extensions.
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_FLOATISH_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")
_INT_RE = re.compile(r"^[+-]?\d+$")
_F32_MAX = float(np.finfo(np.float32).max)


SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


def separator(path) -> str:
    """The catalog's field separator, from its header line: a comma wherever the header has one, else the first
    of ; tab | that it has (a spreadsheet's export in a decimal-comma locale, a TSV), else a comma (one column)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = f.readline()
    return next((s for s in SEPARATORS if s in header), ",")


def read_catalog(path, id_col: str = "objID", targets=("metallicity",)) -> pd.DataFrame:
    """The catalog as a DataFrame of strings (exact text of every cell), ids stripped. Comma-separated, or
    separated by ; tab or | where the header line has no comma (`separator`).

    Raises ValueError (one line naming the file and the fix) for an unreadable or empty file,
    a missing id/target column, an id column that was saved as floats, or decimal commas in a target.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"catalog {path} not found; pass the path of a CSV file with an {id_col} column")
    sep = separator(path)
    try:
        # every column as text: ids keep all 19 digits, targets keep their exact spelling for json
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig", sep=sep)
    except pd.errors.EmptyDataError:
        raise ValueError(f"catalog {path} is empty; it needs a header row with {id_col} and at least one data row") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"catalog {path} is not a readable CSV ({msg}); export it as comma-separated UTF-8") from None
    df = df.fillna("")  # short rows: missing cells are empty text like any other empty cell
    df.columns = [str(c).strip() for c in df.columns]
    cols = list(df.columns)
    # the first 12 columns, and how many there are when that is not all of them
    listed = ", ".join(cols[:12]) + (f", ... ({len(cols)} columns)" if len(cols) > 12 else "")
    if id_col not in cols:
        raise ValueError(f"catalog {path} has no id column {id_col!r} (columns: {listed}); pass --id-col")
    targets = list(targets)
    if not targets:
        raise ValueError("no target columns given; pass --target NAME at least once")
    for t in targets:
        if t not in cols:
            raise ValueError(f"catalog {path} has no target column {t!r} (columns: {listed}); pass --target")
        if t == id_col:
            raise ValueError(f"target {t!r} is the id column of {path}; choose another --target")
    if len(set(cols)) != len(cols):
        dup = sorted({c for c in cols if cols.count(c) > 1})
        raise ValueError(f"catalog {path} has repeated column names {dup}; rename them so each column is unique")
    if len(df) == 0:
        raise ValueError(f"catalog {path} has a header but no rows; nothing to shard")
    if sep != ",":  # a decimal-comma locale's export: '8,91' is no number, and every row would be rejected for it
        for t in targets:
            cells = df[t].str.strip()
            comma = cells.str.fullmatch(r"[+-]?\d*,\d+")
            if comma.mean() > 0.5:
                i = int(np.flatnonzero(comma.to_numpy())[0])
                raise ValueError(f"catalog {path} is {SEPARATORS[sep]}-separated with decimal commas (column {t!r}, "
                                 f"row {i + 1}: {cells.iat[i]!r}); export it with decimal points")
    df[id_col] = df[id_col].str.strip()
    floatish = df[id_col].map(lambda s: bool(_FLOATISH_RE.match(s)))
    if floatish.mean() > 0.5:
        rows = np.flatnonzero(floatish.to_numpy())
        lost = [i for i in rows if not float_id_intact(df[id_col].iat[i])]
        i = int(lost[0] if lost else rows[0])  # show a row whose digits may be gone, if there is one
        more = f" ({len(rows) - 1} more rows like it)" if len(rows) > 1 else ""
        raise ValueError(f"column {id_col!r} of {path}, row {i + 1}{more}: {float_id_detail(df[id_col].iat[i])}")
    return df


def float_id_intact(s: str) -> bool:
    """Whether an id written as a float (`1237645945580748801.0`, `1.2e3`) certainly has every digit: it is an
    integer that no float64 could have changed, being at most 2**53 (every such integer is a float64), or a text
    no float64 printer writes: not a float64's exact value, and more than 17 significant digits (a printer's
    shortest or %.17g digits, padded with zeros, have at most 17). False where a float may have rounded it."""
    try:
        d = Decimal(s)
    except InvalidOperation:
        return False
    if not d.is_finite() or d != d.to_integral_value():
        return False
    n = int(d)
    if abs(n) <= 2**53:
        return True
    return float(n) != n and len(str(abs(n)).rstrip("0")) > 17  # int == float compares exactly in Python


def float_id_detail(s: str) -> str:
    """What is true of an id written as a float, and the fix."""
    try:
        d = Decimal(s)
    except InvalidOperation:
        d = None
    if d is None or not d.is_finite() or d != d.to_integral_value():
        return f"id {s!r} is not an integer; ids must be exact integers or strings without dots"
    n = int(d)
    if float_id_intact(s):
        return f"id {s!r} is written as a float, but every digit is there: write it as {n}"
    return (f"id {s!r} is written as a float above 2**53, where float64 values lie {math.ulp(float(n)):g} apart, so "
            "its last digits may have been rounded; export the ids as integers (e.g. CAST(objID AS VARCHAR)) and "
            "read them as text (dtype=str)")


def written_as_float(s: str) -> bool:
    """An id cell that reads as a float (`1.2e+18`, `123.0`): float_id_detail says what is true of it."""
    return bool(_FLOATISH_RE.match(s))


def id_reason(s: str) -> tuple[str, str] | None:
    """(reason, detail) if s cannot be an id, else None."""
    if s == "":
        return "bad-id", "empty id"
    if _FLOATISH_RE.match(s):
        return "bad-id", float_id_detail(s)
    if not ID_RE.match(s):
        return "bad-id", f"id {s!r} must be 1-80 characters of A-Z a-z 0-9 _ - (no dots, slashes or spaces)"
    return None


def parse_target(s: str) -> tuple[float, tuple[str, str] | None]:
    """(value, None) for a usable target, else (nan, (reason, detail))."""
    t = s.strip()
    if t == "" or t.lower() in ("na", "n/a", "null", "none"):
        return math.nan, ("missing-target", "empty")
    try:
        v = float(t)
    except ValueError:
        return math.nan, ("non-numeric-target", f"{t!r} is not a number")
    # stored as float32: a value finite in float64 but beyond float32's range is just as useless
    if not math.isfinite(v) or abs(v) > _F32_MAX:
        return math.nan, ("non-finite-target", f"{t!r} is not finite (as float32)")
    return v, None


def check_rows(df: pd.DataFrame, id_col: str, targets) -> tuple[np.ndarray, dict[int, tuple[str, str]]]:
    """Targets as float64 [rows, targets] and {row position: (reason, detail)} for unusable rows.

    Order of checks per row: id, then duplicates, then targets; a row gets the first reason.
    Duplicates: if every row with an id has the same target text, the first is kept and the
    others are rejected; if they disagree, all are rejected (there is one image and no way to
    know which target belongs to it).
    """
    targets = list(targets)
    n = len(df)
    rejects: dict[int, tuple[str, str]] = {}
    ids = df[id_col].tolist()
    for i, s in enumerate(ids):
        r = id_reason(s)
        if r:
            rejects[i] = r
    tvals = df[targets].to_numpy(dtype=object)
    key_rows: dict[str, list[int]] = {}
    for i, s in enumerate(ids):
        if i not in rejects:
            key_rows.setdefault(s, []).append(i)
    for s, rows in key_rows.items():
        if len(rows) < 2:
            continue
        first = rows[0]
        same = all([str(x).strip() for x in tvals[r]] == [str(x).strip() for x in tvals[first]] for r in rows[1:])
        lines = ", ".join(str(r + 1) for r in rows[:6]) + (" ..." if len(rows) > 6 else "")
        for r in (rows[1:] if same else rows):
            rejects[r] = ("duplicate-id", f"id {s} is on rows {lines}" + (
                f"; same targets, row {first + 1} kept" if same else "; targets disagree, all rejected"))
    y = np.full((n, len(targets)), np.nan)
    for i in range(n):
        if i in rejects:
            continue
        for j, t in enumerate(targets):
            v, r = parse_target(str(tvals[i, j]))
            if r:
                rejects[i] = (r[0], f"{t}: {r[1]}")
                break
            y[i, j] = v
    return y, rejects


def random_split(n: int, valid_pct: float = 0.2, seed: int = 56) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, valid positions) exactly as fastai's RandomSplitter(valid_pct, seed) on n items.

    fastai: torch.manual_seed(seed); idx = torch.randperm(n); valid = idx[:int(valid_pct*n)],
    train = the rest. A private torch.Generator gives the same stream without touching the global
    RNG. Both arrays are in that permuted order.
    """
    if not 0 <= valid_pct < 1:
        raise ValueError(f"--valid-pct must be in [0, 1), got {valid_pct}")
    import torch  # lazy: torch is heavy and only the split needs it

    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    cut = int(valid_pct * n)
    return idx[cut:].astype(np.int64), idx[:cut].astype(np.int64)


def split_order(rows, valid_pct: float, seed: int) -> dict[str, list[int]]:
    """{"train": [...], "valid": [...]}: random_split over `rows` (catalog positions), then each split
    sorted and shuffled with its own seeded stream, the order the shards are written in (DALI reads
    tars in order and shuffles only inside a buffer, so a sorted catalog would bias batches)."""
    rows = np.asarray(rows, np.int64)
    order = {}
    for k, (name, sel) in enumerate(zip(("train", "valid"), random_split(len(rows), valid_pct, seed))):
        part = np.sort(rows[sel])
        order[name] = part[np.random.default_rng([seed, k]).permutation(len(part))].tolist()
    return order


SPLIT_METHOD = ("fastai RandomSplitter(valid_pct, seed) over the n rows that pass the id and target checks, "
                "in catalog order: torch.manual_seed(seed); idx = torch.randperm(n); valid = idx[:int(valid_pct*n)], "
                "train = the rest; a row whose image is rejected afterwards just leaves its split")


def json_value(s: str):
    """A CSV cell as a JSON value: exact ints as ints, finite floats as floats, empty as null, else the text."""
    t = s.strip()
    if t == "":
        return None
    if _INT_RE.match(t):
        return int(t)  # Python ints are exact at any size, and json writes them digit for digit
    try:
        v = float(t)
    except ValueError:
        return s
    return v if math.isfinite(v) else s  # NaN/inf are not JSON; keep the text
