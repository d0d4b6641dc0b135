"""Writing output directories safely: all or nothing, and never over someone else's files.

Every directory the library writes (a saved model, a profile, a healing checkpoint, the model
cache) is filled in a temporary sibling and renamed into place only once it is complete, so a
reader never sees it half-written. Each carries a marker file, :data:`MARKER`; an existing path
without one is not the library's to replace, and :func:`atomic_directory` refuses it unless told
``overwrite=True``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import OutputExistsError, OutputNotWritableError

__all__ = ["MARKER", "atomic_directory", "check_output", "is_previous_output"]

#: Written into every directory the library writes: it may replace such a directory.
MARKER = ".tensornet-llm"


def is_previous_output(path: str | os.PathLike, known: Sequence[str] = ()) -> bool:
    """Whether ``path`` is a directory this library wrote: it holds :data:`MARKER` (or, for
    outputs of versions that wrote no marker, one of the ``known`` file names)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in (MARKER, *known))


def check_output(target: str | os.PathLike, overwrite: bool = False,
                 known: Sequence[str] = ()) -> Path:
    """Fail now, before any work, if :func:`atomic_directory` could not write ``target``.

    An existing ``target`` may be replaced when it is an empty directory or a previous output
    (:func:`is_previous_output`); anything else needs ``overwrite=True``. The nearest existing
    ancestor must be a directory this process can write in.

    Raises:
        OutputExistsError: ``target`` exists, is not the library's, and ``overwrite`` is False.
        OutputNotWritableError: ``target`` cannot be created there.
    """
    target = Path(target)
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink():
            if not overwrite and any(target.iterdir()) and not is_previous_output(target, known):
                raise OutputExistsError(
                    f"{target} exists and was not written by tensornet-llm; pass overwrite=True "
                    "(--overwrite) to replace it, or choose another path"
                )
        elif not overwrite:
            raise OutputExistsError(
                f"{target} exists and is not a directory; pass overwrite=True (--overwrite) to "
                "replace it"
            )
    ancestor = target.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputNotWritableError(f"cannot create {target}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"cannot create {target}: {ancestor} is not writable")
    # Permission bits do not tell everything (root, read-only mounts, /proc): make and remove a
    # directory where the first missing one (or the temporary sibling) will go.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tensornet-llm-probe-", dir=ancestor))
    except OSError as exc:
        raise OutputNotWritableError(
            f"cannot create {target}: {ancestor} refuses new directories ({exc.strerror})"
        ) from None
    return target


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False,
                     known: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target`` to fill; on success it becomes ``target``.

    ``target`` is checked first (:func:`check_output`: an existing path that is not a previous
    output is refused unless ``overwrite``). On any exception, an interrupt included, the
    temporary directory is removed and ``target`` is left as it was. A previous ``target`` is
    replaced by two renames (the old one aside, the new one in, then the old one removed); if
    the second fails the old one is put back. Only a hard kill between the two renames can leave
    ``target`` missing, with the old output whole beside it as ``.<name>.old-*``.
    """
    target = check_output(target, overwrite, known)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise OutputNotWritableError(f"cannot create {target}: {exc.strerror}") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        (tmp / MARKER).write_text("written by tensornet-llm, which may replace this directory\n")
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: Path, target: Path) -> None:
    """Move the complete directory ``new`` to ``target``, replacing what is there."""
    if not (target.exists() or target.is_symlink()):
        new.rename(target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    backup.rmdir()  # a fresh name for the old output
    target.rename(backup)
    try:
        new.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink()
