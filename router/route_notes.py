"""Which requests the prefix router sent away from a better cache, for their usage record.

Serve runs a deployment's request router in the process that holds the handle: for the tiers,
the gateway's. The router notes here the ids of requests it sent away from a replica holding
more of their prefix (to keep the load bounded), and the gateway takes the note when it
builds the request's usage (the ``routed_elsewhere`` miss reason). Per process, bounded: notes
never taken (a request that failed before its usage) are dropped oldest first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

ROUTED_ELSEWHERE = "routed_elsewhere"  # the miss reason only the router can tell
MAX_NOTES = 65_536

_lock = threading.Lock()
_notes: OrderedDict[str, None] = OrderedDict()


def note_routed_elsewhere(request_id: str) -> None:
    """The router sent ``request_id`` away from a replica holding more of its prefix."""
    if not request_id:
        return
    with _lock:
        _notes[request_id] = None
        _notes.move_to_end(request_id)
        while len(_notes) > MAX_NOTES:
            _notes.popitem(last=False)


def routed_elsewhere(request_id: str) -> bool:
    """Whether the router noted ``request_id`` (the note is taken: asked once per request)."""
    with _lock:
        if request_id not in _notes:
            return False
        del _notes[request_id]
        return True
