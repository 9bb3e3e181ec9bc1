"""Packing tokenized examples into rows of S tokens: first-fit in a bounded window of rows, with
segment ids and positions so each example attends only to itself (Transformer.hidden).

Shapes: B rows, S row length.
"""
import dataclasses
from typing import Literal, NamedTuple, Protocol

import numpy as np


class ExampleSource(Protocol):
    """What `PackedBatches` reads: r1jax.sft_data.ExampleStream or Mixture (or anything alike)."""

    def next(self): ...  # an object with .tokens (int [L]) and .loss_mask (bool [L])

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class Packed(NamedTuple):
    tokens_BxS: np.ndarray  # int32; pad_id on padding
    mask_BxS: np.ndarray  # bool: real tokens (segment_ids_BxS > 0)
    loss_mask_BxS: np.ndarray  # bool: tokens that are trained; never an example's first token
    segment_ids_BxS: np.ndarray  # int32: 0 on padding, 1..n for the row's examples in order
    positions_BxS: np.ndarray  # int32: 0, 1, ... within each example; 0 on padding


# A source whose examples are all dropped would otherwise be read forever (streams are endless).
MAX_DROPPED_IN_A_ROW = 10_000


@dataclasses.dataclass
class PackStats:
    examples: int = 0  # examples packed (or waiting in the next window)
    truncated: int = 0  # longer than S: cut to their first S tokens
    dropped: int = 0  # left out: longer than S with too_long="drop", or no trained token within S


class PackedBatches:
    """Batches of B packed rows, each a deterministic function of the source's order.

    A window of `window_batches * B` rows is filled first-fit, in the order the examples come,
    until an example fits in none; the window is then emitted B rows at a time and that example
    opens the next one. The state is where the current window began (the source's state and the
    counts) plus the batches already emitted, so a resumed stream re-packs that window and goes
    on exactly as the original did. More rows per window pad less and pack examples further
    from their neighbours in the source's order. With `pack=False` every example opens a row of its
    own (one example per row, the rest padding).
    """

    def __init__(self, source: ExampleSource, *, seq_len: int, batch_size: int, window_batches: int = 4,
                 too_long: Literal["truncate", "drop"] = "truncate", pad_id: int = 0, pack: bool = True):
        if too_long not in ("truncate", "drop"):
            raise ValueError(f"too_long={too_long!r}: choose from ['truncate', 'drop']")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("window_batches", window_batches)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.rows, self.too_long, self.pad_id = window_batches * batch_size, too_long, pad_id
        self.pack = pack
        self.stats = PackStats()
        self._reset()

    def _reset(self):
        self._window: list[Packed] = []  # the current window's batches; [:_emitted] are out
        self._emitted = 0
        self._start: tuple[dict, dict] | None = None  # (source state, stats) where the window began
        self._carry = None  # (source state, stats, example): read, not packed; it opens the next window

    def _read(self):
        """The next example to pack, cut to S tokens, with the source state and counts from before it."""
        state, stats = self.source.get_state(), dataclasses.asdict(self.stats)
        for _ in range(MAX_DROPPED_IN_A_ROW):
            example = self.source.next()
            tokens = np.asarray(example.tokens, np.int32)
            loss = np.array(example.loss_mask, bool)
            loss[:1] = False  # nothing earlier in its segment predicts an example's first token
            if len(tokens) > self.seq_len and self.too_long == "drop":
                self.stats.dropped += 1
                continue
            cut = len(tokens) > self.seq_len
            tokens, loss = tokens[: self.seq_len], loss[: self.seq_len]
            if not loss.any():
                self.stats.dropped += 1
                continue
            self.stats.truncated += cut
            self.stats.examples += 1
            return state, stats, (tokens, loss)
        raise ValueError(f"{MAX_DROPPED_IN_A_ROW} examples in a row were dropped: longer than seq_len={self.seq_len} "
                         f"tokens (too_long={self.too_long!r}) or with no trained token among their first "
                         f"{self.seq_len}; raise the stage's max_len")

    def _fill(self):
        if self._carry is None:
            self._carry = self._read()
        self._start = self._carry[:2]
        bins: list[list] = []
        used = np.zeros(self.rows, np.int64)
        while True:
            tokens, loss = self._carry[2]
            fits = np.flatnonzero(used[: len(bins)] + len(tokens) <= self.seq_len) if self.pack else []
            if len(fits):
                row = int(fits[0])
            elif len(bins) < self.rows:
                row = len(bins)
                bins.append([])
            else:
                break
            bins[row].append((tokens, loss))
            used[row] += len(tokens)
            self._carry = self._read()
        B = self.batch_size
        self._window = [self._batch(bins[i : i + B]) for i in range(0, self.rows, B)]
        self._emitted = 0

    def _batch(self, bins: list[list]) -> Packed:
        B, S = self.batch_size, self.seq_len
        tokens = np.full((B, S), self.pad_id, np.int32)
        loss = np.zeros((B, S), bool)
        segments = np.zeros((B, S), np.int32)
        positions = np.zeros((B, S), np.int32)
        for r, row in enumerate(bins):
            at = 0
            for k, (t, m) in enumerate(row, 1):
                n = len(t)
                tokens[r, at : at + n], loss[r, at : at + n] = t, m
                segments[r, at : at + n], positions[r, at : at + n] = k, np.arange(n)
                at += n
        return Packed(tokens, segments > 0, loss, segments, positions)

    def next(self) -> Packed:
        if self._emitted == len(self._window):
            self._fill()
        self._emitted += 1
        return self._window[self._emitted - 1]

    def get_state(self) -> dict:
        layout = [self.seq_len, self.batch_size, self.rows, self.too_long]
        if self._start is None:
            source, stats, emitted = self.source.get_state(), dataclasses.asdict(self.stats), 0
        elif self._emitted == len(self._window):  # the next window begins at the carried example
            (source, stats, _), emitted = self._carry, 0
        else:
            (source, stats), emitted = self._start, self._emitted
        return {"source": source, "stats": stats, "emitted": emitted, "layout": layout}

    def set_state(self, state: dict) -> None:
        layout = [self.seq_len, self.batch_size, self.rows, self.too_long]
        if state["layout"] != layout and state["emitted"]:
            raise ValueError(f"the saved position is inside a window packed as (seq_len, batch_size, window rows, "
                             f"too_long) = {state['layout']}; this stream packs {layout}")
        self.source.set_state(state["source"])
        self.stats = PackStats(**state["stats"])
        self._reset()
        if state["emitted"]:
            self._fill()
            self._emitted = state["emitted"]
