"""The store folder's file names (an entry, its prompt, the marker), where the folder is, and one entry as
`gist cache ls` lists it."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".safetensors"
PROMPT_SUFFIX = ".prompt.txt"
MARKER = ".gistcache-store"
STORE_FORMAT = "gistcache-store"
EXPORTS_DIR = "exports"  # `gist serve` exports runs here
_KEY = re.compile(r"[0-9a-f]{64}")
_OWN = re.compile(r"([0-9a-f]{64})(\.safetensors|\.prompt\.txt)")  # the only names rm and prune touch
_OWN_TMP = re.compile(r"\.[0-9a-f]{64}(\.safetensors|\.prompt\.txt)\.tmp-[0-9]+")  # a write cut short


def default_store_dir() -> Path:
    if os.environ.get("GISTCACHE_HOME"):
        return Path(os.environ["GISTCACHE_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "gistcache"


@dataclass
class StoreEntry:
    """One cache in the store, as `gist cache ls` shows it (read from the header only)."""

    key: str
    path: Path
    prompt_preview: str
    prompt_sha256: str
    num_prompt_tokens: int
    num_gist_tokens: int
    bytes: int
    created: str
    last_used: float  # file mtime, seconds since the epoch
    readable: bool = True  # False: a damaged entry (prune still reaches it; ls does not show it)

    def to_dict(self) -> dict:
        return {"key": self.key, "path": str(self.path), "prompt_preview": self.prompt_preview,
                "prompt_sha256": self.prompt_sha256, "num_prompt_tokens": self.num_prompt_tokens,
                "num_gist_tokens": self.num_gist_tokens, "bytes": self.bytes, "created": self.created,
                "last_used": self.last_used}

def _regular(path: Path) -> os.stat_result | None:
    """The file's own status when it is a regular file (a symbolic link is never followed), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None
