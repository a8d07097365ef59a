"""Evaluation folders (`robustdistill eval`): a new one per evaluation, or a given `--out` that holds
no report yet (an unfinished AutoAttack there resumes); locked while one process writes it, and
removed again, with the folders created for it, when the evaluation fails before writing anything.

    folder = EvalFolder("runs/rslad", out=None)
    path = folder.claim()          # runs/rslad/eval-20261206-213000, created and locked
    ...                            # the evaluation writes its report into `path`
    folder.close()                 # unlocked; removed if it holds nothing
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional

from ..core.errors import UserError
from .files import INSIDE_LOCK, FolderLock
from .runs import AUTOATTACK_STATES, check_no_links_out, check_writable


class EvalFolder:
    """The folder an evaluation of `target` writes: `out`, or a new `eval-<time>` folder beside the
    target (inside a run folder, next to a checkpoint file, under `evals/` for a RobustBench entry)."""

    def __init__(self, target: str, out: Optional[str | Path] = None):
        self.target, self.out = str(target), Path(out) if out is not None else None
        self.path: Optional[Path] = None
        self._created: Optional[Path] = None  # the outermost folder the claim created
        self._lock: Optional[FolderLock] = None
        self._held = False  # whether this evaluation held the lock (only then is the folder its own)

    def claim(self) -> Path:
        """Choose (and create) the folder and lock it; refused in one line when it is a file, holds a
        report, links out of itself, cannot be written or is being written by another evaluation."""
        if self.out is not None:
            check_out_folder(self.out)
            if (self.out / "report.json").exists():
                raise UserError(f"{self.out} already holds a report; choose another --out")
            self._created = _first_missing(self.out)
            self.path = self.out
        else:
            self._created = None if Path(self.target).exists() else _first_missing(Path("evals"))
            self.path = self._new_folder()
            self._created = self._created or self.path
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = FolderLock(self.path, "evaluating into", inside=True).acquire()
            self._held = True
            if (self.path / "report.json").exists():  # written by another evaluation since it was chosen
                raise UserError(f"{self.path} already holds a report; choose another --out")
            check_no_links_out(self.path)
        except BaseException:
            self.close()
            raise
        return self.path

    def resumes(self) -> bool:
        """Whether an unfinished evaluation left its AutoAttack state here."""
        return self.path is not None and any((self.path / name).exists() for name in AUTOATTACK_STATES)

    def _new_folder(self) -> Path:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        where = Path(self.target)
        if where.is_dir():
            base = where / f"eval-{stamp}"
        elif where.is_file():
            base = where.parent / f"{where.stem}-eval-{stamp}"
        else:  # robustbench:<name>
            base = Path("evals") / f"{self.target.split(':', 1)[-1].replace('@', '-')}-eval-{stamp}"
        check_writable(base)
        path, k = base, 1
        base.parent.mkdir(parents=True, exist_ok=True)
        while True:  # created here, atomically: two evaluations started in the same second get two folders
            try:
                path.mkdir()
                return path
            except FileExistsError:
                k += 1
                path = base.with_name(f"{base.name}-{k}")

    def close(self) -> None:
        """Unlock; a folder holding nothing but its lock file is removed, with the folders above it
        that were created for it (none it did not find there)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        path, created = self.path, self._created
        if not self._held or path is None or created is None or not path.is_dir():
            return
        if {p.name for p in path.iterdir()} <= {INSIDE_LOCK}:
            (path / INSIDE_LOCK).unlink(missing_ok=True)
            folder = path
            while folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                if folder == created:
                    break
                folder = folder.parent


def check_out_folder(out: Path) -> None:
    """An --out that must be a folder: refused in one line when it is a file, or cannot be written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; give a folder")
    check_writable(out)


def _first_missing(path: Path) -> Optional[Path]:
    """The outermost folder of `path` that does not exist yet (None: all of it exists)."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing
