"""Live sequences: each keeps its recurrent state between requests; idle ones are evicted, their number bounded."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lstm_onnx.protocol.codec import SequenceControl
from lstm_onnx.protocol.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger("lstm_onnx.server")


@dataclass
class Sequence:
    """One live sequence: the state outputs of its last request, keyed by output name (hn, cn)."""

    key: tuple[str, int | str]
    state: dict[str, np.ndarray] | None = None
    last_used: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one request of a sequence at a time


class SequenceStore:
    """Sequences keyed by (model, sequence id); bounded in number and forgotten after an idle timeout."""

    def __init__(self, max_sequences: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 idle_timeouts: dict[str, float] | None = None):
        self.max_sequences = max_sequences
        self.idle_timeout_s = idle_timeout_s
        self.idle_timeouts = dict(idle_timeouts or {})  # per model, from config.pbtxt; others use idle_timeout_s
        self._clock = clock
        self._live: dict[tuple[str, int | str], Sequence] = {}

    def __len__(self) -> int:
        return len(self._live)

    def open(self, model: str, control: SequenceControl) -> Sequence:
        """The sequence a request continues, or a fresh one on sequence_start (which restarts a live id)."""
        self.evict_idle()
        key = (model, control.id)
        sequence = self._live.get(key)
        if control.start:
            if sequence is None and len(self._live) >= self.max_sequences:
                raise ResourceExhausted(f"sequence {control.id!r}: {len(self._live)} sequences are live, the "
                                        f"limit is {self.max_sequences}; end or let some expire first")
            if sequence is None or not sequence.lock.locked():
                sequence = Sequence(key)
                self._live[key] = sequence
            else:
                sequence.state = None  # restarted while a request of it runs: that request finishes first
        elif sequence is None:
            raise InvalidArgument(f"sequence {control.id!r} for model '{model}': unknown (never started, ended, "
                                  "or evicted after idling); its first request must set sequence_start")
        sequence.last_used = self._clock()
        return sequence

    def touch(self, sequence: Sequence) -> None:
        """Mark a sequence used now (after its request ran), so idle time counts from the last answer."""
        sequence.last_used = self._clock()

    def close(self, sequence: Sequence) -> None:
        """Forget a sequence (on sequence_end)."""
        if self._live.get(sequence.key) is sequence:
            del self._live[sequence.key]

    @property
    def shortest_idle_timeout_s(self) -> float:
        return min([self.idle_timeout_s, *self.idle_timeouts.values()])

    def evict_idle(self) -> list[tuple[str, int | str]]:
        """Forget sequences idle longer than their model's timeout (not one with a request running)."""
        now = self._clock()
        stale = [k for k, s in self._live.items()
                 if now - s.last_used > self.idle_timeouts.get(k[0], self.idle_timeout_s) and not s.lock.locked()]
        for key in stale:
            del self._live[key]
        if stale:
            log.info("sequences evicted", extra={"fields": {"count": len(stale), "live": len(self._live)}})
        return stale
