"""The compact positions' two-pass forward lives in `gistcache.model.compact` (`GistModel.forward` runs it);
this path still imports it."""

from __future__ import annotations

from gistcache.model.compact import TwoPassModel, compact_forward, gist_slots

__all__ = ["TwoPassModel", "compact_forward", "gist_slots"]
