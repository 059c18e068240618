"""A progress display for batches: a tqdm bar when stderr is a terminal and tqdm is installed, else one plain line per
item (a log file gets lines, not carriage-return bars)."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class Progress:
    """Iterate ``items`` with progress; :meth:`write` prints a message without breaking the bar (to stdout)."""

    def __init__(self, items: Iterable[T], *, total: int, desc: str, enabled: bool = True):
        self._items = items
        self._total = total
        self._desc = desc
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
        self._plain = enabled and self._bar is None

    def __iter__(self) -> Iterator[T]:
        try:
            for index, item in enumerate(self._items, 1):
                if self._plain:
                    print(f"[{index}/{self._total}] {item}", file=sys.stderr, flush=True)
                yield item
                if self._bar is not None:
                    self._bar.update(1)
        finally:
            if self._bar is not None:
                self._bar.close()

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)
