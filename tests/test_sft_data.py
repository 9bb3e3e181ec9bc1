"""SFT data at scale: streaming JSONL/Parquet through grain (epochs, process slices, exact resume), the
assistant-only loss mask on real chat templates, weighted mixtures, packing with segment ids, and
that a packed batch and accumulated microbatches give the unpacked batch's loss and gradients."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from r1jax import sharding, train
from r1jax.model import ModelConfig, create_model, positions_from_segments
from r1jax.packing import Packed, PackedBatches
from r1jax.sft_data import Example, ExampleStream, mixture, render_record
from r1jax.tokenizer import HFTokenizer, train_sentencepiece

with open(os.path.join(os.path.dirname(__file__), "data", "chat_templates.json"), encoding="utf-8") as _f:
    TEMPLATES = json.load(_f)

CORPUS = ["The quick brown fox jumps over the lazy dog. What is 12 + 30? It is 42.",
          "Solve x + 3 = 10. So x = 7. Be brief. Hello. How can I help? <think> six sevens </think>"] * 20
# The pre-tokenizer regexes of Qwen2 (digits one by one) and Llama 3 (digits in threes).
_WORDS = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"""
_REST = r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
FAMILIES = {
    "qwen2_5": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], _WORDS + r"\p{N}" + _REST,
                dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>"])),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               _WORDS + r"\p{N}{1,3}" + _REST, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")),
}
FAMILIES["qwen3"], FAMILIES["llama3_2"] = FAMILIES["qwen2_5"], FAMILIES["llama3"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"}, {"role": "user", "content": "Solve x + 3 = 10."},
        {"role": "assistant", "content": "<think>\nsix sevens\n</think>\n\nx = 7"}]


def _hf_tokenizer(family: str) -> HFTokenizer:
    specials, split, config = FAMILIES[family]
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return HFTokenizer(tok, config, chat_template=TEMPLATES[family])


@pytest.fixture(scope="module")
def toy_tokenizer():
    return train_sentencepiece(CORPUS, None, vocab_size=400)


# ---------------------------------------------------------------------------------------------------------------
# Formats.


@pytest.mark.parametrize("family", ["qwen2_5", "qwen3", "llama3", "llama3_2"])
def test_chat_loss_covers_assistant_messages_and_their_end_of_turn_only(family):
    tok = _hf_tokenizer(family)
    eot = "<|im_end|>" if family.startswith("qwen") else "<|eot_id|>"
    chat = CHAT if family != "qwen3" else CHAT[:3]  # Qwen3 rewrites earlier assistant turns (below)
    ex = render_record({"messages": chat, "task": "chat"}, tok)
    # Encoded piece by piece, the chat still encodes as transformers' apply_chat_template(tokenize=True) does.
    assert ex.tokens.tolist() == tok.apply_chat_template(chat, add_generation_prompt=False, tokenize=True)
    assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == bool
    # Trained: each assistant message and its end-of-turn token; not the newline Qwen writes after it.
    trained = np.flatnonzero(ex.loss_mask)
    runs = np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)
    texts = [tok.decode(ex.tokens[r], skip_special_tokens=False) for r in runs]
    expected = [m["content"] + eot for m in chat if m["role"] == "assistant"]
    if family == "qwen3":  # the last turn's empty thinking block is written by the template and trained
        expected = ["<think>\n\n</think>\n\n" + expected[0]]
    assert texts == expected
    # What comes before each assistant message is exactly the prompt the sampler would encode.
    for run, i in zip(runs, [i for i, m in enumerate(chat) if m["role"] == "assistant"]):
        prompt = tok.apply_chat_template(chat[:i], add_generation_prompt=True, tokenize=True)
        assert ex.tokens[: run[0]].tolist() == prompt
    if family == "qwen3":
        with pytest.raises(ValueError, match="renders assistant message 2 differently"):
            ExampleStream([{"messages": CHAT}], tok, seed=0, read_threads=0).next()


def test_pairs_render_as_prompt_completion_eos(toy_tokenizer):
    pairs = [("Compute 12 + 30.", " It is 42."), ("What is x?", " x = 7")]
    for prompt, completion in pairs:
        ex = render_record({"prompt": prompt, "completion": completion}, toy_tokenizer)
        p = toy_tokenizer.encode(prompt, add_bos=True)
        c = toy_tokenizer.encode(completion) + [toy_tokenizer.eos_id]
        assert ex.tokens.tolist() == p + c and ex.loss_mask.tolist() == [False] * len(p) + [True] * len(c)
        assert ex.tokens[-1] == toy_tokenizer.eos_id and toy_tokenizer.chat_template is None


def test_bad_records_raise_naming_file_and_line(tmp_path, toy_tokenizer):
    good = json.dumps({"prompt": "a", "completion": "b"})
    cases = {
        "not_json.jsonl": ([good, "", "{oops"], r"not_json.jsonl:3: not valid JSON"),
        "fields.jsonl": ([good, json.dumps({"question": "q"})], r"fields.jsonl:2: expected 'messages'.*question"),
        "role.jsonl": ([json.dumps({"messages": [{"from": "human", "value": "hi"}]})], r"role.jsonl:1: message 0"),
        "nochat.jsonl": ([json.dumps({"messages": CHAT})], r"nochat.jsonl:1: .*needs a tokenizer with a chat"),
        "no_assistant.jsonl": ([json.dumps({"messages": CHAT[:2]})], r"no_assistant.jsonl:1: .*no assistant"),
        "task.jsonl": ([json.dumps({"prompt": "a", "completion": "b", "task": 3})], r"task.jsonl:1: field 'task'"),
    }
    for name, (lines, pattern) in cases.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        stream = ExampleStream(str(tmp_path / name), toy_tokenizer, seed=0, shuffle_window=None, read_threads=0)
        with pytest.raises(ValueError, match=pattern):
            for _ in range(len(lines)):
                stream.next()
    pq.write_table(pa.table({"prompt": ["a", "b", None], "completion": ["1", "2", "3"]}), tmp_path / "p.parquet",
                   row_group_size=2)
    stream = ExampleStream(str(tmp_path / "p.parquet"), toy_tokenizer, seed=0, read_threads=0)
    with pytest.raises(ValueError, match=r"p.parquet: row index 2: field 'prompt' is null"):
        for _ in range(3):
            stream.next()


# ---------------------------------------------------------------------------------------------------------------
# Streaming.


def _write_folder(root, n_jsonl=13, n_parquet=11) -> list[str]:
    """A folder of a JSONL file (BOM, blank and CRLF lines) and a Parquet file of row groups of 3; the completions."""
    os.makedirs(root, exist_ok=True)
    lines = [json.dumps({"prompt": f"q{i}", "completion": f"j{i}"}) for i in range(n_jsonl)]
    lines[2] += "\r"
    text = "\ufeff" + "\n".join(lines[:5]) + "\n\n   \n" + "\n".join(lines[5:])  # no final newline
    with open(os.path.join(root, "a.jsonl"), "w", encoding="utf-8") as f:
        f.write(text)
    table = pa.table({"prompt": [f"q{i}" for i in range(n_parquet)], "completion": [f"p{i}" for i in range(n_parquet)]})
    pq.write_table(table, os.path.join(root, "b.parquet"), row_group_size=3)
    return [f"j{i}" for i in range(n_jsonl)] + [f"p{i}" for i in range(n_parquet)]


class _Text:
    """A stand-in tokenizer whose 'tokens' let tests read back which record an example came from."""

    bos_id, eos_id, chat_template = None, 0, None

    def encode(self, text, add_bos=False):
        return [ord(c) for c in text]


def _completion(ex: Example) -> str:
    return "".join(chr(t) for t in ex.tokens[ex.loss_mask][:-1])


@pytest.mark.parametrize("window", [None, 4])
def test_stream_epochs_cover_every_record_shuffled_and_processes_share_them(tmp_path, window):
    names = _write_folder(tmp_path / "data")
    n = len(names)
    stream = ExampleStream(str(tmp_path / "data"), _Text(), seed=3, shuffle_window=window)
    assert stream.num_records == n
    epochs = [[_completion(stream.next()) for _ in range(n)] for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(names)
    assert epochs[0] != names and epochs[0] != epochs[1]  # shuffled, afresh every epoch
    again = ExampleStream(str(tmp_path / "data"), _Text(), seed=3, shuffle_window=window)
    assert [_completion(again.next()) for _ in range(n)] == epochs[0]  # deterministic by seed
    # Two processes split each epoch: process i takes positions i, i+2, ... of the same order.
    parts = [ExampleStream(str(tmp_path / "data"), _Text(), seed=3, shuffle_window=window, process_index=i,
                           process_count=2) for i in range(2)]
    split = [[_completion(p.next()) for _ in range(n // 2)] for p in parts]
    assert split[0] == epochs[0][0::2] and split[1] == epochs[0][1::2]


def test_stream_state_is_json_and_resumes_exactly(tmp_path):
    _write_folder(tmp_path / "data")
    stream = ExampleStream(str(tmp_path / "data"), _Text(), seed=1)
    for _ in range(30):  # into the second epoch
        stream.next()
    state = json.loads(json.dumps(stream.get_state()))
    expected = [_completion(stream.next()) for _ in range(20)]
    resumed = ExampleStream(str(tmp_path / "data"), _Text(), seed=1)
    resumed.set_state(state)
    assert [_completion(resumed.next()) for _ in range(20)] == expected
    other = ExampleStream([{"prompt": "x", "completion": "y"}], _Text(), seed=1)
    with pytest.raises(ValueError, match="data of 24 records"):
        other.set_state(state)


def test_parquet_row_groups_are_read_lazily_once_per_epoch_in_windows(tmp_path, monkeypatch):
    n, group = 600, 20
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(n)], "completion": [f"c{i}" for i in range(n)]}),
                   tmp_path / "big.parquet", row_group_size=group)
    monkeypatch.setattr(pq, "read_table", None)  # never the whole file
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, *a, **k: reads.append(i) or
                        original(self, i, *a, **k))
    stream = ExampleStream(str(tmp_path / "big.parquet"), _Text(), seed=0, shuffle_window=2 * group)
    seen = [_completion(stream.next()) for _ in range(n)]
    assert sorted(seen) == sorted(f"c{i}" for i in range(n))
    assert len(reads) <= n // group + 4  # each group decoded about once (the reader prefetches ahead)


# ---------------------------------------------------------------------------------------------------------------
# Mixtures.


def test_mixture_follows_weights_and_resumes_exactly():
    def streams():
        a = ExampleStream([{"prompt": "", "completion": f"a{i}"} for i in range(50)], _Text(), seed=1)
        b = ExampleStream([{"prompt": "", "completion": f"b{i}"} for i in range(7)], _Text(), seed=2)
        return mixture([(a, 0.7), (b, 0.3)], seed=5)

    mix = streams()
    drawn = [_completion(mix.next()) for _ in range(3000)]
    share_a = np.mean([d.startswith("a") for d in drawn])
    assert abs(share_a - 0.7) < 0.03
    fresh = streams()
    assert [_completion(fresh.next()) for _ in range(100)] == drawn[:100]  # deterministic
    state = json.loads(json.dumps(mix.get_state()))
    expected = [_completion(mix.next()) for _ in range(200)]
    resumed = streams()
    resumed.set_state(state)
    assert [_completion(resumed.next()) for _ in range(200)] == expected
    with pytest.raises(ValueError, match="positive"):
        mixture([(mix, 1.0), (mix, 0.0)], seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Packing.


class _ListSource:
    """Examples from a list, in order and endlessly; records what it handed out."""

    def __init__(self, examples):
        self.examples, self.i, self.log = examples, 0, []

    def next(self):
        ex = self.examples[self.i % len(self.examples)]
        self.i += 1
        self.log.append(ex)
        return ex

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def _examples(n, max_len, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(2, max_len + 1))
        prompt = int(rng.integers(1, length))
        out.append(Example(rng.integers(1, vocab, length).astype(np.int32), np.arange(length) >= prompt))
    return out


def _segments(batches: list[Packed]) -> list[tuple]:
    out = []
    for b in batches:
        for r in range(b.tokens_BxS.shape[0]):
            for s in range(1, b.segment_ids_BxS[r].max() + 1):
                at = b.segment_ids_BxS[r] == s
                assert np.array_equal(b.positions_BxS[r, at], np.arange(at.sum()))  # restart at 0, contiguous
                assert np.all(np.diff(np.flatnonzero(at)) == 1) and not b.loss_mask_BxS[r, at][0]
                out.append((tuple(b.tokens_BxS[r, at]), tuple(b.loss_mask_BxS[r, at][1:])))
    return out


def test_packing_is_deterministic_and_loses_no_tokens():
    examples = _examples(200, 24)
    runs = []
    for _ in range(2):
        source = _ListSource(examples)
        packer = PackedBatches(source, seq_len=32, batch_size=4, window_batches=3)
        runs.append(([packer.next() for _ in range(15)], source, packer))
    (a, source, packer), (b, _, _) = runs
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    # Every example handed out, except the one carried into the next window, is in exactly one segment.
    packed = _segments(a)
    handed = [(tuple(e.tokens), tuple(e.loss_mask[1:])) for e in source.log[:-1]]
    assert sorted(packed) == sorted(handed) and packer.stats.examples == len(source.log)
    assert packer.stats.truncated == packer.stats.dropped == 0
    for batch in a:
        assert batch.tokens_BxS.shape == (4, 32) and batch.tokens_BxS.dtype == np.int32
        np.testing.assert_array_equal(batch.mask_BxS, batch.segment_ids_BxS > 0)
        assert np.all(batch.tokens_BxS[~batch.mask_BxS] == 0)
    fill = np.mean([b.mask_BxS.mean() for b in a])
    assert fill > 0.8, fill  # first-fit over 12 rows keeps padding low


def test_packing_truncates_or_drops_long_examples_and_counts_them():
    long = Example(np.arange(1, 41, dtype=np.int32), np.arange(40) >= 5)
    prompt_only = Example(np.arange(1, 41, dtype=np.int32), np.arange(40) >= 35)  # its loss lies past S
    short = Example(np.arange(1, 9, dtype=np.int32), np.arange(8) >= 2)
    packer = PackedBatches(_ListSource([long, short, prompt_only]), seq_len=16, batch_size=2, window_batches=1)
    batch = packer.next()
    np.testing.assert_array_equal(batch.tokens_BxS[0], np.arange(1, 17))  # its start is kept
    np.testing.assert_array_equal(batch.tokens_BxS[1, :8], np.arange(1, 9))
    # Counted as read: the prompt-only example (nothing to train within S) is dropped, and the
    # second long one, read and carried into the next window, is truncated too.
    assert (packer.stats.examples, packer.stats.truncated, packer.stats.dropped) == (3, 2, 1)
    drop = PackedBatches(_ListSource([long, short]), seq_len=16, batch_size=1, window_batches=1, too_long="drop")
    assert drop.next().segment_ids_BxS.max() == 2 and drop.next().segment_ids_BxS.max() == 2  # short + short
    assert drop.stats.dropped >= 2 and drop.stats.truncated == 0
    with pytest.raises(ValueError, match="too_long"):
        PackedBatches(_ListSource([short]), seq_len=16, batch_size=1, too_long="cut")
    # A source whose every example is dropped (an endless stream) stops with the reason, not a silent loop.
    for source, kwargs in (([prompt_only], {}), ([long], {"too_long": "drop"})):
        with pytest.raises(ValueError, match="examples in a row were dropped.*raise the stage's max_len"):
            PackedBatches(_ListSource(source), seq_len=16, batch_size=1, window_batches=1, **kwargs).next()


def test_packed_stream_resumes_mid_window_through_a_mixture(tmp_path):
    _write_folder(tmp_path / "data")

    def build():
        a = ExampleStream(str(tmp_path / "data"), _Text(), seed=0, shuffle_window=5)
        b = ExampleStream([{"prompt": "p" * k, "completion": "c" * (k % 7 + 1)} for k in range(9)], _Text(), seed=1)
        return PackedBatches(mixture([(a, 2.0), (b, 1.0)], seed=4), seq_len=24, batch_size=2, window_batches=3)

    packer = build()
    for _ in range(4):  # one window and a batch into the next
        packer.next()
    state = json.loads(json.dumps(packer.get_state()))
    assert state["emitted"] == 1
    expected = [packer.next() for _ in range(7)]
    resumed = build()
    resumed.set_state(state)
    for x, y in zip(expected, [resumed.next() for _ in range(7)]):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert resumed.stats == packer.stats


# ---------------------------------------------------------------------------------------------------------------
# Training on packed rows.


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig.toy().replace(vocab_size=64, n_layers=2, d_model=64, d_ff=128, head_dim=16)
    return create_model(cfg, mesh=sharding.MeshConfig(8, 1, 1).make(), seed=1)


def _sgd_state(model):
    """A fresh state on a copy of the weights (sft_step donates its state); SGD with lr 1: the
    parameter change is the gradient itself (Adam would turn rounding noise into full steps)."""
    graphdef, params = nnx.split(model)
    return train.create_train_state(nnx.merge(graphdef, jax.tree.map(jnp.copy, params)), optax.sgd(1.0))


def _unpacked(examples, S):
    n = len(examples)
    tokens, mask, loss = np.zeros((n, S), np.int32), np.zeros((n, S), bool), np.zeros((n, S), bool)
    for i, e in enumerate(examples):
        tokens[i, : len(e.tokens)], mask[i, : len(e.tokens)], loss[i, : len(e.tokens)] = e.tokens, True, e.loss_mask
    return train.SFTBatch(tokens, mask, loss)


def _packed(batch: Packed):
    return train.SFTBatch(batch.tokens_BxS, batch.mask_BxS, batch.loss_mask_BxS,
                          segment_ids_BxS=batch.segment_ids_BxS, positions_BxS=batch.positions_BxS)


def test_packed_batch_equals_its_examples_unpacked(tiny_model):
    S = 32
    source = _ListSource(_examples(40, 14, seed=2))
    packed = PackedBatches(source, seq_len=S, batch_size=2, window_batches=1).next()
    examples = [Example(np.array(t, np.int32), np.array((False,) + m)) for t, m in _segments([packed])]
    assert len(examples) >= 5
    ref = _unpacked(examples, S)
    np.testing.assert_array_equal(positions_from_segments(packed.segment_ids_BxS), packed.positions_BxS)

    @jax.jit
    def hidden(params):  # each packed token's hidden state, and each token's run alone in a row
        model = nnx.merge(nnx.graphdef(tiny_model), params)
        h_packed, _ = model.hidden(packed.tokens_BxS, segment_ids_BxT=packed.segment_ids_BxS)
        h_alone, _ = model.hidden(ref.tokens_BxS, None, ref.mask_BxS)
        return h_packed, h_alone

    h_packed, h_alone = hidden(nnx.state(tiny_model))
    np.testing.assert_allclose(np.asarray(h_packed)[packed.mask_BxS], np.asarray(h_alone)[ref.mask_BxS],
                               atol=1e-5, rtol=0)
    results = []
    for batch in (_packed(packed), ref):
        state = _sgd_state(tiny_model)
        before = jax.tree.map(np.asarray, state.params)
        state, metrics = train.sft_step(state, batch)
        results.append((float(metrics["loss"]), jax.tree.map(lambda b, a: b - np.asarray(a), before, state.params)))
    n_loss = sum(int(e.loss_mask.sum()) for e in examples)
    (loss_p, grad_p), (loss_u, grad_u) = results
    np.testing.assert_allclose(loss_p * n_loss, loss_u * n_loss, atol=1e-5, rtol=0)  # the summed token loss
    for g_p, g_u in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_u)):
        np.testing.assert_allclose(g_p, g_u, atol=1e-5, rtol=0)


def test_accumulated_microbatches_equal_one_batch(tiny_model):
    batch = _packed(PackedBatches(_ListSource(_examples(100, 20, seed=3)), seq_len=24, batch_size=8).next())
    results = []
    for micro in (1, 4):
        state, metrics = train.sft_step(_sgd_state(tiny_model), batch, microbatches=micro)
        results.append((metrics, state.params))
    (ma, pa_), (mb, pb) = results
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-5, atol=0)
    for x, y in zip(jax.tree.leaves(pa_), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="microbatches"):
        train.sft_step(_sgd_state(tiny_model), batch, microbatches=3)
