"""Tokenizers: round trips on both backends; encode, decode and chat templates equal transformers' on the same folder.

The Hugging Face folders are built here (a tiny BPE trained with `tokenizers`, saved by transformers) around the
real chat templates of Qwen2.5-Instruct, Qwen3, Llama 3 and Llama 3.2 (tests/data/chat_templates.json).
"""
import json
import os
import pickle
import time
import unicodedata

import jinja2
import pytest
import transformers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from r1jax.tokenizer import (R1_ZERO_TEMPLATE, HFTokenizer, SentencePieceTokenizer, load_tokenizer,
                             r1_zero_prompt, render_chat_template, train_sentencepiece)

with open(os.path.join(os.path.dirname(__file__), "data", "chat_templates.json"), encoding="utf-8") as _f:
    TEMPLATES = json.load(_f)

# The pre-tokenizer regexes of Qwen2 (transformers' Qwen2Tokenizer) and Llama 3 (tokenizer.json).
_WORDS = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"""
_REST = r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_SPLIT = _WORDS + r"\p{N}" + _REST  # digits one by one
LLAMA3_SPLIT = _WORDS + r"\p{N}{1,3}" + _REST  # digits in threes

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Don't stop; we'll see what you're doing!",
    "Question: what is 1234 + 5678? <think> 1234 + 5678 = 6912 </think> <answer> 6912 </answer>",
    "def add(a, b):\n    return a + b  # four spaces\n\n\tTabs\tand  double  spaces.",
    "Grüße aus München, señor! Ça va? 你好，世界。日本語のテキスト。😀🙂🚀 — «quotes» “curly” ‘single’",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}",
    "Solve for x: 3x + 7 = 22, so x = 5. The final answer is \\boxed{5}.",
] * 20

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_PLAIN = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|eom_id|>", "<|python_tag|>"]

TEXTS = [
    "Hello world",
    " leading space and trailing  ",
    "multiple   spaces\tand\ttabs\n\nnew\r\nlines",
    "12345 + 678 = 13023",
    "Grüße, 你好世界 🙂 e\u0301 — «ok»",
    "<|im_end|> inside <think>x</think> text<|endoftext|>",
    "<|begin_of_text|>Hi<|eot_id|>",
    "",
    "don't stop",
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Ville, e.g. Zürich"}},
                   "required": ["city"]}}}]
CHATS = {
    "user": [{"role": "user", "content": "What is 12 + 30?"}],
    "system": [{"role": "system", "content": "You are a careful mathematician."},
               {"role": "user", "content": "Solve x + 3 = 10."}],
    "multi_turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Hi!"},
                   {"role": "assistant", "content": "Hello. How can I help?"},
                   {"role": "user", "content": "Grüße 你好 🙂 \"quoted\" </tag>"}],
    "thinking": [{"role": "user", "content": "6 * 7?"},
                 {"role": "assistant", "content": "<think>\nsix sevens\n</think>\n\n42"},
                 {"role": "user", "content": "And 6 * 8?"}],
    "reasoning_field": [{"role": "user", "content": "6 * 7?"},
                        {"role": "assistant", "content": "42", "reasoning_content": "six sevens"}],
    "tools": [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": "{\"temperature\": 21}"},
              {"role": "assistant", "content": "It is 21 degrees."},
              {"role": "user", "content": "Thanks"}],
}
# Llama 3 (3.0) has no tool turns; the Qwen templates and Llama 3.2 take every chat.
FAMILY_CHATS = {
    "qwen2_5": list(CHATS), "qwen3": list(CHATS), "llama3_2": list(CHATS),
    "llama3": ["user", "system", "multi_turn", "thinking", "reasoning_field"],
}


def _bpe(split: str, specials: list[str], nfc: bool) -> RustTokenizer:
    tok = RustTokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _qwen_backend() -> RustTokenizer:
    tok = _bpe(QWEN_SPLIT, QWEN_SPECIAL, nfc=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_PLAIN])
    return tok


def _llama3_backend() -> RustTokenizer:
    tok = _bpe(LLAMA3_SPLIT, LLAMA3_SPECIAL, nfc=False)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    return tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """One Hugging Face tokenizer folder per chat-template family, as transformers' save_pretrained writes it."""
    root = tmp_path_factory.mktemp("hf_tokenizers")
    qwen = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=QWEN_SPECIAL[1:])
    llama = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    out = {}
    for family, backend, special in (("qwen2_5", _qwen_backend, qwen), ("qwen3", _qwen_backend, qwen),
                                     ("llama3", _llama3_backend, llama), ("llama3_2", _llama3_backend, llama)):
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend(), **special)
        fast.chat_template = TEMPLATES[family]
        fast.save_pretrained(root / family)
        out[family] = str(root / family)
    eos_ids = [RustTokenizer.from_file(os.path.join(out["llama3_2"], "tokenizer.json")).token_to_id(t)
               for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    with open(os.path.join(out["llama3_2"], "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": eos_ids}, f)
    out["qwen_hub"] = _hub_style_qwen_folder(root / "qwen_hub")
    return out


def _hub_style_qwen_folder(folder) -> str:
    """A folder laid out like Qwen/Qwen2.5-0.5B-Instruct on the Hub: the template and added tokens in the config."""
    os.makedirs(folder)
    tok = _qwen_backend()
    tok.save(os.path.join(folder, "tokenizer.json"))
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    config = {"add_prefix_space": False, "added_tokens_decoder": added, "additional_special_tokens": QWEN_SPECIAL[1:],
              "bos_token": None, "chat_template": TEMPLATES["qwen2_5"], "clean_up_tokenization_spaces": False,
              "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
              "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
              "unk_token": None}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return str(folder)


@pytest.fixture(scope="module")
def pairs(folders) -> dict[str, tuple]:
    return {name: (load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path))
            for name, path in folders.items()}


def _hf_chat(hf, messages, **kwargs):
    return hf.apply_chat_template(messages, return_dict=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face folders against transformers.


@pytest.mark.parametrize("family", ["qwen2_5", "qwen3", "llama3", "llama3_2", "qwen_hub"])
def test_hf_special_ids_match_transformers(pairs, family):
    ours, hf = pairs[family]
    assert isinstance(ours, HFTokenizer)
    # The hub-style folder goes through transformers' Qwen2Tokenizer, rebuilt from vocab and merges.
    assert type(hf).__name__ == ("Qwen2Tokenizer" if family == "qwen_hub" else "TokenizersBackend")
    assert ours.bos_id == hf.bos_token_id
    assert ours.eos_id == hf.eos_token_id
    assert ours.pad_id == (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
    assert ours.vocab_size == len(hf)
    assert ours.special_tokens == hf.special_tokens_map
    for token in ("<|im_end|>", "<think>", "<|eot_id|>", "no-such-token"):
        assert ours.token_to_id(token) == hf.get_vocab().get(token)


def test_stop_ids(pairs):
    qwen, _ = pairs["qwen2_5"]
    assert qwen.stop_ids == (qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>"))
    llama, _ = pairs["llama3_2"]  # eos, then generation_config.json's list, then end-of-turn tokens
    ids = [llama.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")]
    assert llama.stop_ids == tuple(ids)
    assert llama.pad_id == llama.eos_id  # Llama 3 has no pad token


@pytest.mark.parametrize("family", ["qwen2_5", "llama3", "qwen_hub"])
def test_hf_encode_decode_match_transformers(pairs, family):
    ours, hf = pairs[family]
    for text in TEXTS:
        plain = hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == plain, text
        assert ours.encode(text, add_bos=True) == hf(text, add_special_tokens=True)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(plain, skip_special_tokens=skip) == hf.decode(plain, skip_special_tokens=skip)
    assert ours.encode_batch(TEXTS) == hf(TEXTS, add_special_tokens=False)["input_ids"]
    assert ours.encode_batch(TEXTS, add_bos=True) == hf(TEXTS, add_special_tokens=True)["input_ids"]
    rows = ours.encode_batch(TEXTS)
    assert ours.decode_batch(rows) == hf.batch_decode(rows, skip_special_tokens=True)


def test_hf_bos_follows_post_processor(pairs):
    llama, _ = pairs["llama3"]
    assert llama.encode("Hi", add_bos=True) == [llama.bos_id, *llama.encode("Hi")]
    qwen, _ = pairs["qwen2_5"]  # Qwen has no BOS: add_bos adds nothing
    assert qwen.bos_id is None and qwen.encode("Hi", add_bos=True) == qwen.encode("Hi")


@pytest.mark.parametrize("family", ["qwen2_5", "llama3"])
def test_hf_round_trip(pairs, family):
    ours, _ = pairs[family]
    for text in TEXTS:
        expected = unicodedata.normalize("NFC", text) if family.startswith("qwen") else text  # Qwen normalises NFC
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == expected
    ids = ours.encode("<think>x</think>")
    if family == "qwen2_5":  # added, not special: one token each, kept by decode
        assert ids[0] == ours.token_to_id("<think>") and ids[-1] == ours.token_to_id("</think>")
        assert ours.decode(ids) == "<think>x</think>"
    # Each family's own special tokens are skipped; the other family's are plain text to it.
    expected = "ab<|eot_id|>" if family == "qwen2_5" else "a<|im_end|>b"
    assert ours.decode(ours.encode("a<|im_end|>b<|eot_id|>")) == expected


@pytest.mark.parametrize("family", ["qwen2_5", "qwen3", "llama3", "llama3_2", "qwen_hub"])
def test_chat_template_matches_transformers(pairs, family):
    ours, hf = pairs[family]
    rendered = 0
    for name in FAMILY_CHATS["qwen2_5" if family == "qwen_hub" else family]:
        messages = CHATS[name]
        tools = TOOLS if name == "tools" else None
        extras = [{}, {"enable_thinking": False}, {"enable_thinking": True}] if family == "qwen3" else [{}]
        if family == "llama3_2":
            extras = [{}, {"date_string": "26 Jul 2024"}]
        for add_generation_prompt in (True, False):
            for extra in extras:
                kwargs = dict(add_generation_prompt=add_generation_prompt, tools=tools)
                text = _hf_chat(hf, messages, tokenize=False, **kwargs, **extra)
                assert ours.apply_chat_template(messages, extra=extra, **kwargs) == text, (name, extra)
                ids = _hf_chat(hf, messages, tokenize=True, **kwargs, **extra)
                assert ours.apply_chat_template(messages, tokenize=True, extra=extra, **kwargs) == ids
                rendered += 1
    assert rendered >= 10


def test_chat_template_details(pairs):
    qwen3, _ = pairs["qwen3"]
    chat = CHATS["user"]
    assert qwen3.apply_chat_template(chat, extra={"enable_thinking": False}).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # The reasoning field is aliased as transformers does, so Qwen3 renders it in <think>.
    assert "<think>\nsix sevens\n</think>\n\n42" in qwen3.apply_chat_template(CHATS["reasoning_field"],
                                                                              add_generation_prompt=False)
    qwen, _ = pairs["qwen2_5"]  # the default system prompt, and the template's eos as one token
    text = qwen.apply_chat_template(chat)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    ids = qwen.apply_chat_template(chat, tokenize=True)
    assert ids.count(qwen.token_to_id("<|im_end|>")) == 2
    llama, _ = pairs["llama3"]
    assert llama.apply_chat_template(chat, tokenize=True)[0] == llama.bos_id


def test_continue_final_message_matches_transformers(pairs):
    ours, hf = pairs["qwen2_5"]
    messages = [*CHATS["user"], {"role": "assistant", "content": "<think>\nLet me add "}]
    expected = _hf_chat(hf, messages, tokenize=False, continue_final_message=True)
    got = ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert got == expected and got.endswith("<think>\nLet me add ")
    with pytest.raises(ValueError):
        ours.apply_chat_template(messages, continue_final_message=True)  # add_generation_prompt defaults to True


def test_template_errors_and_sandbox_match_transformers(pairs):
    ours, hf = pairs["llama3_2"]
    two_calls = [CHATS["tools"][0], {**CHATS["tools"][1], "tool_calls": CHATS["tools"][1]["tool_calls"] * 2}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="single tool-calls"):
        _hf_chat(hf, two_calls, tokenize=False, tools=TOOLS)
    with pytest.raises(jinja2.exceptions.TemplateError, match="single tool-calls"):
        ours.apply_chat_template(two_calls, tools=TOOLS)
    for template in ("{% set ns = namespace(_x=1) %}", "{{ ''.__class__.__mro__ }}"):
        with pytest.raises(jinja2.exceptions.SecurityError):
            render_jinja_template([CHATS["user"]], chat_template=template)
        with pytest.raises(jinja2.exceptions.SecurityError):
            render_chat_template(template, CHATS["user"], add_generation_prompt=False)


def test_template_environment_matches_transformers():
    template = (
        "{%- set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% generation %}[{{ m.content | tojson }}]{% endgeneration %}\n{% endfor %}"
        "{{ ns.n }} {{ tools | tojson(indent=2, sort_keys=True) }} {{ dict(a=1) | tojson }} {{ strftime_now('%Y') }}"
        " {{ documents is none }} {{ bos_token is defined }} {{ answer }} {{ add_generation_prompt }}"
        "{% if messages | length > 9 %}{{ raise_exception('too long') }}{% endif %}")
    messages = [{"role": "user", "content": "<b>é & \"x\"</b>"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "third"}]
    variables = {"answer": 42}
    expected = render_jinja_template([messages], tools=TOOLS, chat_template=template, add_generation_prompt=True,
                                     **variables)[0][0]
    got = render_chat_template(template, messages, add_generation_prompt=True, tools=TOOLS, variables=variables)
    assert got == expected
    assert '"<b>é & \\"x\\"</b>"' in got  # no HTML escaping, no ASCII escaping
    with pytest.raises(jinja2.exceptions.TemplateError, match="too long"):
        render_chat_template(template, messages * 4, add_generation_prompt=False)


@pytest.mark.parametrize("family", ["qwen_hub", "llama3_2"])
def test_hf_save_loads_back_in_transformers_and_r1jax(pairs, tmp_path, family):
    ours, hf = pairs[family]
    ours.save(tmp_path)
    again, hf_again = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text) == hf_again(text, add_special_tokens=False)["input_ids"]
        assert again.encode(text, add_bos=True) == hf_again(text, add_special_tokens=True)["input_ids"]
    for name in ("system", "tools"):
        tools = TOOLS if name == "tools" else None
        expected = _hf_chat(hf, CHATS[name], tokenize=False, add_generation_prompt=True, tools=tools)
        assert again.apply_chat_template(CHATS[name], tools=tools) == expected
        assert _hf_chat(hf_again, CHATS[name], tokenize=False, add_generation_prompt=True, tools=tools) == expected
    assert (again.bos_id, again.eos_id, again.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)


def test_hf_named_templates_round_trip(pairs, tmp_path):
    ours, _ = pairs["llama3"]
    both = HFTokenizer(ours.backend, ours.config, chat_template={"default": TEMPLATES["llama3"],
                                                                 "tool_use": TEMPLATES["llama3_2"]})
    both.save(tmp_path)
    assert os.path.isfile(tmp_path / "additional_chat_templates" / "tool_use.jinja")
    again, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for tools in (None, TOOLS):  # tools select the tool_use template, in both
        messages = CHATS["tools"] if tools else CHATS["system"]
        assert again.apply_chat_template(messages, tools=tools) == _hf_chat(
            hf, messages, tokenize=False, add_generation_prompt=True, tools=tools)
    assert "Environment: ipython" in again.apply_chat_template(CHATS["tools"], tools=TOOLS)
    assert "Cutting Knowledge" in again.apply_chat_template(CHATS["system"], chat_template="tool_use")


def test_bare_and_legacy_folders(tmp_path):
    bare = tmp_path / "bare"
    os.makedirs(bare)
    _qwen_backend().save(str(bare / "tokenizer.json"))
    tok = load_tokenizer(bare / "tokenizer.json")  # no config: EOS from the usual end-of-text tokens, no template
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, tok.token_to_id("<|endoftext|>"), tok.eos_id)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHATS["user"])
    assert tok.apply_chat_template(CHATS["user"], chat_template=TEMPLATES["qwen2_5"]).endswith("assistant\n")
    legacy = tmp_path / "legacy"  # transformers 4.x era: special tokens in special_tokens_map.json
    os.makedirs(legacy)
    _qwen_backend().save(str(legacy / "tokenizer.json"))
    with open(legacy / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATES["qwen2_5"]}, f)
    with open(legacy / "special_tokens_map.json", "w") as f:
        json.dump({"eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False}, "pad_token": "<|endoftext|>"}, f)
    ours, hf = load_tokenizer(legacy), transformers.AutoTokenizer.from_pretrained(legacy)
    assert (ours.eos_id, ours.pad_id) == (hf.eos_token_id, hf.pad_token_id)
    assert ours.apply_chat_template(CHATS["system"]) == _hf_chat(hf, CHATS["system"], tokenize=False,
                                                                 add_generation_prompt=True)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece.


@pytest.fixture(scope="module")
def sp_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("spm")
    tok = train_sentencepiece(CORPUS, root / "toy", vocab_size=600)
    return {"model": str(root / "toy.model"), "tok": tok, "root": str(root)}


SP_TEXTS = ["What is 1234 + 5678?", "  two leading spaces, three   inside, tab\tand\nnewline ",
            "Grüße 你好 🙂 — unseen: ☃ ж", "<think> 12 + 30 = 42 </think> <answer> 42 </answer>", "x"]


def test_sentencepiece_round_trip_and_pieces(sp_files):
    tok = sp_files["tok"]
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.id_to_token(0), tok.bos_id, tok.eos_id, tok.pad_id) == ("<unk>", 1, 2, 3)
    assert tok.stop_ids == (2,)
    for text in SP_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.decode(ids, skip_special_tokens=False) == text
        assert 0 not in ids  # byte fallback: nothing is unknown
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        tag_id = tok.token_to_id(tag)
        assert tag_id is not None and tok.encode(f"a{tag}b").count(tag_id) == 1
        assert tok.decode([tag_id]) == tag
    pieces = [tok.id_to_token(i) for i in tok.encode("1234+5678")]
    assert pieces == ["▁", "1", "2", "3", "4", "+", "5", "6", "7", "8"]  # one piece per digit


def test_sentencepiece_special_tokens(sp_files):
    tok = sp_files["tok"]
    ids = tok.encode("hi</s>", add_bos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id  # control-piece text encodes to the control id
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi</s>"
    assert tok.encode_batch(["a", "b</s>"]) == [tok.encode("a"), tok.encode("b</s>")]
    assert tok.encode_batch(SP_TEXTS, add_bos=True) == [tok.encode(t, add_bos=True) for t in SP_TEXTS]
    assert tok.decode_batch([ids, ids[1:]]) == ["hi", "hi"]
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(SP_TEXTS[2]) == tok.encode(SP_TEXTS[2]) and clone.stop_ids == tok.stop_ids


def test_sentencepiece_loads_from_file_and_folder(sp_files, tmp_path):
    tok = sp_files["tok"]
    from_file = load_tokenizer(sp_files["model"])
    assert isinstance(from_file, SentencePieceTokenizer)
    template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}" \
               "{% if add_generation_prompt %}assistant:{% endif %}"
    tok_with_template = SentencePieceTokenizer(tok.model_proto, chat_template=template)
    tok_with_template.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["chat_template.jinja", "tokenizer.model", "tokenizer_config.json"]
    from_dir = load_tokenizer(tmp_path)
    assert isinstance(from_dir, SentencePieceTokenizer)
    for text in SP_TEXTS:
        assert from_file.encode(text) == from_dir.encode(text) == tok.encode(text)
    assert from_dir.apply_chat_template(CHATS["user"]) == "<s>user: What is 12 + 30?</s>assistant:"
    ids = from_dir.apply_chat_template(CHATS["user"], tokenize=True)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1
    trained_into_dir = train_sentencepiece(CORPUS[:7], str(tmp_path / "dir") + os.sep, vocab_size=400)
    assert load_tokenizer(tmp_path / "dir").encode("1 + 2") == trained_into_dir.encode("1 + 2")


def test_sentencepiece_folder_loads_in_transformers(sp_files, tmp_path):
    tok = sp_files["tok"]
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ("What is 1234 + 5678?", "the final answer is 42"):
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf(text)["input_ids"] == tok.encode(text, add_bos=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_train_sentencepiece_is_fast_on_a_megabyte():
    lines = [f"Question {i}: what is {i * 37 % 9973} + {i * 91 % 8191}? The answer is {i * 37 % 9973 + i * 91 % 8191}."
             f" Some words about apples, oranges and the weather {i}." for i in range(12_000)]
    assert sum(map(len, lines)) > 1_000_000
    start = time.perf_counter()
    tok = train_sentencepiece(lines, None, vocab_size=1000)
    assert time.perf_counter() - start < 30.0  # about a second on two cores; generous for loaded CI machines
    assert tok.decode(tok.encode(lines[5])) == lines[5]


# ---------------------------------------------------------------------------------------------------------------
# The R1-Zero prompt.


def test_r1_zero_template_is_the_papers():
    assert R1_ZERO_TEMPLATE == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
        "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
        "User: {prompt}. Assistant:")
    prompt = r1_zero_prompt("What is {x} if x = 2 + 3")
    assert prompt.startswith("A conversation between User and Assistant.")
    assert prompt.endswith("User: What is {x} if x = 2 + 3. Assistant:")
