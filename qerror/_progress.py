"""The one progress bar of the library's long loops."""

from __future__ import annotations


def progress_bar(iterable, enabled: bool, desc: str):
    """``iterable`` under a tqdm bar (its length as the total when it has one), or itself."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    try:
        total = len(iterable)
    except TypeError:
        total = None
    return tqdm(iterable, desc=desc, unit="batch", total=total, leave=False)
