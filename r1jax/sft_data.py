"""Streaming SFT examples: JSONL/Parquet records read lazily through grain, rendered to tokens
with a loss mask over the assistant's tokens only, and weighted mixtures of such streams.

A record is a chat, {"messages": [{"role": ..., "content": ...}, ...]}, rendered with the
tokenizer's chat template, or a pair, {"prompt": ..., "completion": ...}, rendered as plain
text (prompt as written, completion, EOS); either may carry a "task" string. A stream's
position is a small JSON object (`get_state`), so it goes into every checkpoint.

Shapes: L tokens of one example.
"""
import bisect
import collections
import dataclasses
import functools
import os
import sys
import threading
from collections.abc import Sequence

import grain
import jax
import jinja2
import numpy as np

from r1jax.data import _BadRecord, _kind, _parse_line
from r1jax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
_BLOCK = 1 << 24  # bytes scanned at a time while indexing a JSONL file
_WHITESPACE = np.frombuffer(b" \t\r\n\f\v", np.uint8)


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # bool [L]: tokens that are trained (predicted from those before them)


def list_files(paths: str | Sequence[str]) -> list[str]:
    """The .jsonl and .parquet files named, folders expanded to their such files (sorted)."""
    files = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".jsonl", ".parquet")))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"no SFT data at {path}")
    return files


def _index_jsonl(file: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start byte, length, 1-based line number) of every non-blank line, from one pass over the file."""
    size = os.path.getsize(file)
    if size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    data = np.memmap(file, np.uint8, mode="r")
    newlines = np.concatenate([np.flatnonzero(data[at : at + _BLOCK] == ord("\n")) + at
                               for at in range(0, size, _BLOCK)])
    ends = np.append(newlines + 1, size)  # one past each line's last byte
    starts = np.concatenate([[0], ends[:-1]])
    keep = ends > starts
    # Only a line that starts with whitespace can be blank (JSON lines start with "{"): check those alone.
    for k in np.flatnonzero(keep & np.isin(data[np.minimum(starts, size - 1)], _WHITESPACE)):
        keep[k] = bool(data[starts[k] : ends[k]].tobytes().strip())
    return starts[keep], (ends - starts)[keep], np.flatnonzero(keep) + 1


class RecordSource:
    """Random access to every record of some files (or an in-memory list), reading only what is asked.

    JSONL lines are read by byte offset from a one-pass index; Parquet rows by decoding their row
    group, kept in an LRU cache sized to the shuffle window. Blocks (`block_starts`, `block_sizes`)
    are the row ranges worth reading together: one per Parquet row group, one per JSONL line
    (seeks are cheap). Safe across grain's reader threads.
    """

    def __init__(self, source: str | Sequence[str] | Sequence[dict], window: int | None = None):
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._parquet_files: dict = {}
        if not isinstance(source, (str, os.PathLike)) and source and all(isinstance(r, dict) for r in source):
            self.name, self._files, self._records = "records", [], list(source)
            sizes = [np.ones(len(self._records), np.int64)]
        else:
            self.name, self._records = str(source), None
            self._files, sizes = [], []
            for file in list_files(source):
                if file.endswith(".parquet"):
                    meta = self._parquet(file).metadata
                    groups = np.array([meta.row_group(i).num_rows for i in range(meta.num_row_groups)], np.int64)
                    self._files.append((file, "parquet", np.concatenate([[0], np.cumsum(groups)])))
                    sizes.append(groups[groups > 0])
                else:
                    index = _index_jsonl(file)
                    self._files.append((file, "jsonl", index))
                    sizes.append(np.ones(len(index[0]), np.int64))
        sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
        self.block_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.block_sizes = sizes
        self._n = int(sizes.sum())
        self._file_starts = np.cumsum([0] + [self._count(f) for f in self._files]).tolist()
        self._fds: dict[str, int] = {}
        # Enough row groups for the rows of two windows (one may be read ahead) plus their edges.
        groups = [g for _, kind, index in self._files if kind == "parquet" for g in np.diff(index) if g > 0]
        self._capacity = 8 if window is None or not groups else 2 * (-(-window // int(min(groups))) + 1)

    @staticmethod
    def _count(entry) -> int:
        _, kind, index = entry
        return int(index[-1]) if kind == "parquet" else len(index[0])

    def _parquet(self, file: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if file not in self._parquet_files:
            try:
                self._parquet_files[file] = pq.ParquetFile(file)
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{file}: not a readable Parquet file ({e})") from e
        return self._parquet_files[file]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[str, bytes | dict]:
        """(where, raw): an undecoded JSONL line, or a Parquet / in-memory row; `where` names it in errors."""
        if self._records is not None:
            return f"records[{i}]", self._records[i]
        f = bisect.bisect_right(self._file_starts, i) - 1
        file, kind, index = self._files[f]
        j = i - self._file_starts[f]
        if kind == "jsonl":
            starts, lengths, numbers = index
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
            raw = os.pread(fd, int(lengths[j]), int(starts[j]))
            return f"{file}:{numbers[j]}", raw.removeprefix(b"\xef\xbb\xbf") if starts[j] == 0 else raw
        group = bisect.bisect_right(index, j) - 1
        with self._lock:  # one decode per row group; other threads wait for it rather than decode it again
            rows = self._cache.pop((f, group), None)
            if rows is None:
                rows = self._parquet(file).read_row_group(group).to_pylist()
            self._cache[(f, group)] = rows
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return f"{file}: row index {j}", rows[j - int(index[group])]

    def record(self, i: int):
        """Record i parsed (a JSONL line decoded); ValueError naming its file and line if it is not JSON."""
        where, raw = self[i]
        try:
            return _parse_line(raw) if isinstance(raw, bytes) else raw
        except _BadRecord as e:
            raise ValueError(f"{where}: {e}") from None

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


class _EpochShuffle(grain.MapDataset):
    """The rows of every epoch in a new order: blocks in random order, then rows shuffled within
    consecutive windows of `window` rows (None: one window, a global shuffle).

    A window of a few Parquet row groups decodes each group about once per epoch; a global
    shuffle of Parquet decodes a group for most rows it reads. The order of an epoch is
    O(rows) ints, drawn from (seed, epoch) alone.
    """

    def __init__(self, parent: grain.MapDataset, rows: RecordSource, window: int | None, seed: int):
        super().__init__(parent)
        self._rows, self._window, self._seed = rows, window, seed
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._orders:
                rng = np.random.default_rng((self._seed, epoch))
                n, sizes, starts = len(self._rows), self._rows.block_sizes, self._rows.block_starts
                if self._window is None:
                    order = rng.permutation(n)
                else:
                    perm = rng.permutation(len(sizes))
                    order = np.repeat(starts[perm] - (np.cumsum(sizes[perm]) - sizes[perm]), sizes[perm]) + np.arange(n)
                    for w in range(0, n, self._window):
                        rng.shuffle(order[w : w + self._window])
                self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # prefetch may straddle two
                self._orders[epoch] = order
            return self._orders[epoch]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, len(self._rows))
        return self._parent[int(self._order(epoch)[i])]


def _text(row: dict, field: str) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise _BadRecord(f"field {field!r} is {_kind(value)}, expected a string")
    return value


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list):
        raise _BadRecord(f"field 'messages' is {_kind(messages)}, expected a list of messages")
    if not messages:
        raise _BadRecord("field 'messages' is an empty list")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _BadRecord(f"message {n} is not {{'role': one of {list(ROLES)}, 'content': a string}}: "
                             f"{str(m)[:120]}")
    if messages[0]["role"] == "assistant":
        raise _BadRecord("the conversation starts with an assistant message")
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRecord("the conversation has no assistant message to train on")
    return messages


def _render_chat(messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """The chat as the template renders it; the loss covers each assistant message and its end-of-turn token.

    Each assistant message's text is found by rendering the conversation up to it (with the
    generation prompt) and through it, as TRL's assistant-only loss does. Each piece is encoded on
    its own, so a prompt encodes exactly as the sampler encodes it, and the loss stops at the last
    stop token of the turn (not on the newline some templates write after it).
    """
    if tokenizer.chat_template is None:
        raise _BadRecord("a chat record needs a tokenizer with a chat template, and this one has none; "
                         "write it as {'prompt', 'completion'}")
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    cuts = [0]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and cuts[-1] <= len(before) <= len(through)):
            raise _BadRecord(f"the chat template renders assistant message {i} differently once later messages "
                             "follow (it rewrites earlier turns), so its tokens cannot be found; split the "
                             "conversation into one record per assistant turn")
        cuts += [len(before), len(through)]
    pieces = [full[a:b] for a, b in zip(cuts, cuts[1:] + [len(full)])]
    tokens, loss = [], []
    stops = set(tokenizer.stop_ids)
    for k, ids in enumerate(tokenizer.encode_batch(pieces)):
        trained = [False] * len(ids)
        if k % 2:  # an assistant piece: trained through its last stop token, or whole if it has none
            last = max((j for j, t in enumerate(ids) if t in stops), default=len(ids) - 1)
            trained[: last + 1] = [True] * (last + 1)
        tokens += ids
        loss += trained
    return tokens, loss


def render_record(row, tokenizer: Tokenizer) -> Example:
    """One record's tokens and loss mask (chat through the template; pair as prompt, completion, EOS)."""
    if not isinstance(row, dict):
        raise _BadRecord(f"expected an object with fields, got {_kind(row)}")
    if "task" in row and not isinstance(row["task"], str):
        raise _BadRecord(f"field 'task' is {_kind(row['task'])}, expected a string")
    if "messages" in row:
        tokens, loss = _render_chat(_check_messages(row["messages"]), tokenizer)
    elif "prompt" in row and "completion" in row:
        prompt = tokenizer.encode(_text(row, "prompt"), add_bos=True)
        completion = tokenizer.encode(_text(row, "completion")) + [tokenizer.eos_id]
        tokens, loss = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    else:
        names = ", ".join(str(k) for k in list(row)[:20]) or "no fields"
        raise _BadRecord(f"expected 'messages' (a chat) or 'prompt' and 'completion'; the record has: {names}")
    return Example(np.asarray(tokens, np.int32), np.asarray(loss, bool))


def _example(item: tuple[str, bytes | dict], tokenizer: Tokenizer) -> Example:
    where, raw = item
    try:
        return render_record(_parse_line(raw) if isinstance(raw, bytes) else raw, tokenizer)
    except _BadRecord as e:
        raise ValueError(f"{where}: {e}") from None
    except (jinja2.TemplateError, ValueError, TypeError) as e:  # the template rejected the conversation
        raise ValueError(f"{where}: {e}") from e


class ExampleStream:
    """Endless tokenized examples for this process, from files, folders or in-memory records.

    Every epoch has a fresh order drawn from the seed; process `i` of `n` takes positions i, i+n,
    ... of it, so the processes share each epoch. The order puts blocks (Parquet row groups,
    single JSONL lines) in random order, then shuffles `shuffle_window` rows at a time; None
    shuffles all rows at once, which for Parquet decodes a row group for most rows read. Records
    are read, parsed and tokenized lazily in grain's reader threads. A bad record raises
    ValueError naming its file and line (Parquet: row index) when it is reached.
    """

    def __init__(self, source: str | Sequence[str] | Sequence[dict], tokenizer: Tokenizer, *, seed: int,
                 shuffle_window: int | None = 4096, process_index: int | None = None,
                 process_count: int | None = None, read_threads: int = 2, prefetch: int = 64):
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        if shuffle_window is not None and shuffle_window < 1:
            raise ValueError(f"shuffle_window={shuffle_window} must be >= 1 (or None for a global shuffle)")
        rows = RecordSource(source, shuffle_window)
        if len(rows) == 0:
            raise ValueError(f"no records in {rows.name}")
        order = _EpochShuffle(grain.MapDataset.source(rows), rows, shuffle_window, seed)
        dataset = order[index::count].map(functools.partial(_example, tokenizer=tokenizer))
        options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self._iter = iter(dataset.to_iter_dataset(options))
        self.num_records = len(rows)

    def next(self) -> Example:
        return next(self._iter)

    def get_state(self) -> dict:
        return {"records": self.num_records, "reader": self._iter.get_state()}

    def set_state(self, state: dict) -> None:
        if state["records"] != self.num_records:
            raise ValueError(f"the saved position is in data of {state['records']} records; this data has "
                             f"{self.num_records}, so it cannot resume where it was")
        self._iter.set_state(state["reader"])


class Mixture:
    """Examples from several streams, each next one from stream i with probability weights[i].

    The draws are a pure function of (seed, draw number), so the state is the draw count and the
    streams' own states, and resuming is O(1).
    """

    _DRAWS_PER_BLOCK = 1024

    def __init__(self, streams: Sequence[tuple[object, float]], seed: int):
        if not streams:
            raise ValueError("a mixture needs at least one stream")
        weights = np.array([w for _, w in streams], np.float64)
        if not np.all(np.isfinite(weights) & (weights > 0)):
            raise ValueError(f"mixture weights must be positive, got {weights.tolist()}")
        self.streams = [s for s, _ in streams]
        self._cumulative = np.cumsum(weights / weights.sum())
        self._seed, self._draws = seed, 0
        self._block, self._choices = -1, None

    def next(self):
        block, i = divmod(self._draws, self._DRAWS_PER_BLOCK)
        if block != self._block:
            u = np.random.default_rng((self._seed, block)).random(self._DRAWS_PER_BLOCK)
            self._block = block
            self._choices = np.minimum(np.searchsorted(self._cumulative, u, side="right"), len(self.streams) - 1)
        self._draws += 1
        return self.streams[int(self._choices[i])].next()

    def get_state(self) -> dict:
        return {"draws": self._draws, "streams": [s.get_state() for s in self.streams]}

    def set_state(self, state: dict) -> None:
        if len(state["streams"]) != len(self.streams):
            raise ValueError(f"the saved mixture has {len(state['streams'])} streams; this one has "
                             f"{len(self.streams)}")
        for stream, s in zip(self.streams, state["streams"]):
            stream.set_state(s)
        self._draws = int(state["draws"])


def mixture(streams: Sequence[tuple[object, float]], seed: int) -> Mixture:
    """`mixture([(stream_a, 0.7), (stream_b, 0.3)], seed)`: see `Mixture`."""
    return Mixture(streams, seed)
