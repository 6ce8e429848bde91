"""Progress bars and lines under their historical name: they live in ``zoo.progress`` (below every layer, so data
tools and evaluation draw them without importing train)."""
from __future__ import annotations

from zoo.progress import LINE_SECONDS, LINES, LinePacer, RateClock, clock, progress_line, track

__all__ = ["LINE_SECONDS", "LINES", "LinePacer", "RateClock", "clock", "progress_line", "track"]
