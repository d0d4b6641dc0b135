"""Progress bars for the stages of long work (tqdm), or nothing when progress is off."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["Tick", "stage", "no_tick"]

#: Called once per unit of work done (a batch, a module).
Tick = Callable[[], None]


def no_tick() -> None:
    """A :data:`Tick` that shows nothing."""


@contextmanager
def stage(description: str, total: int, unit: str, enabled: bool = True,
          leave: bool = False) -> Iterator[Tick]:
    """A bar ``description`` of ``total`` ``unit``\\ s while the block runs (removed after it
    unless ``leave``); yields the tick that advances it (:func:`no_tick` when not
    ``enabled``)."""
    if not enabled:
        yield no_tick
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit=unit, leave=leave)
    try:
        yield bar.update
    finally:
        bar.close()
