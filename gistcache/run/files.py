"""A run folder's files, read and written safely: a file that cannot be read is refused naming it
(`reading_run_file`), and a run is written all or nothing (`staged_run`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gistcache.errors import GistError
from gistcache.run.layout import CONFIG_FILE


@contextlib.contextmanager
def reading_run_file(*paths: Path) -> Iterator[None]:
    """A run's weight file (or the adapter's config beside it) that cannot be read is refused naming it."""
    try:
        yield
    except GistError:
        raise
    except Exception as exc:  # safetensors' and peft's own errors for truncated or hand-edited files
        reason = type(exc).__name__ + (f": {str(exc).strip().splitlines()[0][:160]}" if str(exc).strip() else "")
        raise GistError(f"cannot read {' or '.join(map(str, paths))} ({reason}): the run is damaged or incomplete; "
                        f"copy it again or train it again") from exc


@contextlib.contextmanager
def staged_run(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir` to write a run into; when the block ends, its files move into
    `out_dir` (the folder renamed when `out_dir` does not exist; else file by file, config.json last, after the
    old config.json is removed). After any failure (a full disk, a write refused) the temporary folder is
    removed and `out_dir` holds no run files of this save: the run is complete or absent. What else `out_dir`
    holds (train.log, checkpoints/) stays."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.saving-"))
    try:
        yield staged
        if not out_dir.exists():
            os.rename(staged, out_dir)
            return
        names = sorted(p.name for p in staged.iterdir() if p.name != CONFIG_FILE) + [CONFIG_FILE]
        (out_dir / CONFIG_FILE).unlink(missing_ok=True)  # no run there until the new one is whole
        moved = []
        try:
            for name in names:
                target = out_dir / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(staged / name, target)
                moved.append(target)
        except BaseException:
            for target in moved:
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
