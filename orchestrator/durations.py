"""How durations read, in the planner's reasons and the printed tables alike."""

from __future__ import annotations


def format_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def describe_time(start: float, fill: float, read: float, compute: float) -> str:
    """A predicted time and the parts it adds up from: the start-up, the slower of reading and computing
    (the other runs beside it) and what that overlap does not hide. The plan's table shows the total."""
    pace, beside = ("reading weights", "computing") if read > compute else ("computing", "reading weights")
    return (f"{format_seconds(start + fill + max(read, compute))} = {format_seconds(start)} start-up + "
            f"{format_seconds(max(read, compute))} {pace} ({format_seconds(min(read, compute))} {beside} beside it) "
            f"+ {format_seconds(fill)} not overlapped")
