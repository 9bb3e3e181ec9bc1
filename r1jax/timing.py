"""When the device works and when it waits: a timeline of the device work the host dispatches.

JAX returns from a dispatch at once and the device runs the work later, in order. A thread per dispatch waits on
its outputs and notes when they are ready; a piece of work then occupied the device from the later of its
dispatch and the previous piece's end until that moment. What is left of a window is time in which the device
had nothing to do: the host was decoding, scoring, logging or preparing the next batch.
"""
import threading
import time

import jax


class DeviceTimeline:
    def __init__(self):
        self._phases: list[list] = []  # [name, dispatched, done or None, waiter thread or None], in dispatch order

    def ran(self, name: str, start: float, end: float) -> None:
        """Device work the host waited for itself (a sampler call that returns host arrays)."""
        self._phases.append([name, start, end, None])

    def dispatched(self, name: str, outputs) -> None:
        """Device work just dispatched; `outputs` are arrays it produces that no later call donates."""
        phase = [name, time.perf_counter(), None, None]

        def wait():
            jax.block_until_ready(outputs)
            phase[2] = time.perf_counter()

        phase[3] = threading.Thread(target=wait, daemon=True)
        phase[3].start()
        self._phases.append(phase)

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """Seconds the device spent on each named kind of work within [t0, t1], and "idle": the rest. Waits for
        the work dispatched before t1 to finish; forgets the work that ended before t0."""
        busy: dict[str, float] = {}
        end = float("-inf")
        for phase in self._phases:
            name, dispatched, done, waiter = phase
            if dispatched >= t1:
                break
            if waiter is not None:
                waiter.join()
                done = phase[2]
            start = max(dispatched, end)
            end = max(done, start)
            overlap = min(end, t1) - max(start, t0)
            if overlap > 0:
                busy[name] = busy.get(name, 0.0) + overlap
        self._phases = [p for p in self._phases if p[2] is None or p[2] > t0]
        busy["idle"] = max(0.0, (t1 - t0) - sum(busy.values()))
        return busy
