"""One tokenizer interface over SentencePiece `.model` files and Hugging Face `tokenizer.json`, with chat templates."""
from __future__ import annotations

import abc
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np
import sentencepiece as spm
import tokenizers

from r1jax.chat_template import (ChatTemplate, compile_chat_template, render_chat_template,  # noqa: F401
                                 select_chat_template)

# DeepSeek-R1 paper, Table 1: the R1-Zero training template, verbatim; {prompt} is the question.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)
R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# transformers' named special tokens; each one that is set becomes a template variable.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens that end a turn in the chat formats we port; generation stops on any that the vocabulary has.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>",
    "<｜end▁of▁sentence｜>",
)
# Used only when a folder names no eos_token at all (a bare tokenizer.json).
_FALLBACK_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")
_CHAT_TEMPLATE_FILE = "chat_template.jinja"
_CHAT_TEMPLATE_DIR = "additional_chat_templates"


def r1_zero_prompt(question: str) -> str:
    return R1_ZERO_TEMPLATE.format(prompt=question)


class Tokenizer(abc.ABC):
    """What the trainer, sampler and rewards use; `HFTokenizer` and `SentencePieceTokenizer` implement it.

    `encode` never appends EOS, and special-token text in the input (e.g. "<|im_end|>") encodes to that special
    token in both backends, as transformers does. `add_bos=True` adds what the tokenizer itself adds around one
    sequence: BOS for Llama 3 and DeepSeek-R1-Distill, nothing for Qwen (whose tokenizers have no BOS).
    """

    bos_id: int | None
    eos_id: int
    pad_id: int  # the EOS id when the tokenizer defines no pad token
    stop_ids: tuple[int, ...]  # EOS, generation_config's eos_token_id, and end-of-turn tokens in the vocabulary
    chat_template: ChatTemplate | None
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the chat template sees them

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """One past the largest token id (added tokens included); the model's embedding may be larger."""

    @abc.abstractmethod
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]: ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str: ...

    def decode_batch(self, rows: Iterable[Sequence[int] | np.ndarray], *, skip_special_tokens: bool = True
                     ) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None: ...

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write this tokenizer's files into the folder `path` (created if missing)."""

    @overload
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                            tokenize: Literal[False] = False, continue_final_message: bool = False,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            extra: Mapping[str, Any] | None = None, chat_template: str | None = None) -> str: ...

    @overload
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                            tokenize: Literal[True], continue_final_message: bool = False,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            extra: Mapping[str, Any] | None = None, chat_template: str | None = None
                            ) -> list[int]: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                            tokenize: bool = False, continue_final_message: bool = False,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            extra: Mapping[str, Any] | None = None, chat_template: str | None = None
                            ) -> str | list[int]:
        """Render `messages` with the folder's chat template, as transformers' `apply_chat_template` does.

        `tools` are JSON schemas (not Python callables); `extra` holds further template variables, e.g.
        {"enable_thinking": False} for Qwen3 or {"date_string": "26 Jul 2024"} for Llama 3.x, and overrides the
        special-token variables. `chat_template` names one of the folder's templates or is a template itself.
        `tokenize=True` encodes the rendered text without adding BOS: the template writes the special tokens.
        """
        template = select_chat_template(self.chat_template, chat_template, tools is not None)
        text = render_chat_template(
            template, messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools, documents=documents,
            variables={**self.special_tokens, **(extra or {})})
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, stop_ids={self.stop_ids})")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a token as a string or as a serialized AddedToken {"content": ...}.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _template_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """The special-token template variables transformers 5.x passes: named tokens plus model-specific `*_token`s."""
    tokens = {}
    for key, value in config.items():
        if key in SPECIAL_TOKEN_KEYS:
            text = _token_text(value)
        else:  # transformers collects model-specific tokens only when they are plain strings
            text = value if key.endswith("_token") and isinstance(value, str) else None
        if text is not None:
            tokens[key] = text
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        tokens.update({k: t for k, v in extra.items() if (t := _token_text(v)) is not None})
    return tokens


def _extra_special_tokens(config: Mapping[str, Any]) -> list[str]:
    listed = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(listed, Mapping):
        listed = list(listed.values())
    return [t for v in listed if (t := _token_text(v)) is not None]


def _stop_ids(tokenizer: Tokenizer, eos_id: int, generation_eos: Sequence[int]) -> tuple[int, ...]:
    found = [tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS]
    return tuple(dict.fromkeys([eos_id, *generation_eos, *(i for i in found if i is not None)]))


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _as_template(value: Any) -> ChatTemplate | None:
    if isinstance(value, list):  # legacy form of several templates: [{"name": ..., "template": ...}]
        return {t["name"]: t["template"] for t in value}
    return value


def _read_folder_config(folder: str) -> tuple[dict[str, Any], ChatTemplate | None, list[int]]:
    """tokenizer_config.json (with legacy special_tokens_map.json folded in), the chat template, generation EOS ids."""
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    if "added_tokens_decoder" not in config:  # transformers reads the legacy map only for old-style configs
        config.update(_read_json(os.path.join(folder, "special_tokens_map.json")))
    template = _as_template(config.get("chat_template"))
    # Template files take priority over the config's entry, as in transformers.
    files = {}
    if os.path.isfile(os.path.join(folder, _CHAT_TEMPLATE_FILE)):
        files["default"] = os.path.join(folder, _CHAT_TEMPLATE_FILE)
    template_dir = os.path.join(folder, _CHAT_TEMPLATE_DIR)
    if os.path.isdir(template_dir):
        for name in sorted(os.listdir(template_dir)):
            if name.endswith(".jinja"):
                files[name.removesuffix(".jinja")] = os.path.join(template_dir, name)
    if files:
        texts = {}
        for name, file in files.items():
            with open(file, encoding="utf-8") as f:
                texts[name] = f.read()
        template = texts["default"] if list(texts) == ["default"] else texts
    eos = _read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id")
    generation_eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return config, template, generation_eos


def _write_config(path: str, config: Mapping[str, Any], chat_template: ChatTemplate | None) -> None:
    """Write tokenizer_config.json and the chat template as transformers 5.x does (templates in .jinja files)."""
    os.makedirs(path, exist_ok=True)
    config = {k: v for k, v in config.items() if k != "chat_template"}
    if isinstance(chat_template, str):
        chat_template = {"default": chat_template}
    for name, template in (chat_template or {}).items():
        if name == "default":
            file = os.path.join(path, _CHAT_TEMPLATE_FILE)
        else:
            if os.path.basename(name) != name or name.startswith("."):
                raise ValueError(f"invalid chat template name {name!r}")
            os.makedirs(os.path.join(path, _CHAT_TEMPLATE_DIR), exist_ok=True)
            file = os.path.join(path, _CHAT_TEMPLATE_DIR, f"{name}.jinja")
        with open(file, "w", encoding="utf-8") as f:
            f.write(template)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (owned from here on) and its tokenizer_config.json, read as transformers 5.x reads
    them: the config's special tokens are registered as special, tokenizer.json's post-processor adds BOS."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None, *,
                 chat_template: ChatTemplate | None = None, generation_eos_ids: Sequence[int] = ()) -> None:
        self.config = dict(config or {})
        self.chat_template = _as_template(chat_template or self.config.get("chat_template"))
        self._tok = tokenizer
        # Kept for save(); encoding here never pads or truncates, as transformers' default call doesn't.
        self._saved_padding, self._saved_truncation = tokenizer.padding, tokenizer.truncation
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tokenizer.encode_special_tokens = bool(self.config.get("split_special_tokens", False))
        self.special_tokens = _template_tokens(self.config)
        self._add_missing_special_tokens()
        self._clean_up_spaces = (bool(self.config.get("clean_up_tokenization_spaces", False))
                                 and type(tokenizer.model).__name__ != "BPE")  # transformers never cleans BPE
        self.bos_id = self._id_of(self.special_tokens.get("bos_token"))
        eos_id = self._id_of(self.special_tokens.get("eos_token"))
        if eos_id is None:
            eos_id = next(iter(generation_eos_ids), None)
        if eos_id is None:
            eos_id = next((i for t in _FALLBACK_EOS if (i := self._id_of(t)) is not None), None)
        if eos_id is None:
            raise ValueError("tokenizer has no eos_token and no known end-of-text token")
        self.eos_id = eos_id
        pad_id = self._id_of(self.special_tokens.get("pad_token"))
        self.pad_id = eos_id if pad_id is None else pad_id
        self.stop_ids = _stop_ids(self, eos_id, generation_eos_ids)
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> HFTokenizer:
        folder = os.fspath(folder)
        config, template, generation_eos = _read_folder_config(folder)
        tok = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        return cls(tok, config, chat_template=template, generation_eos_ids=generation_eos)

    def _add_missing_special_tokens(self) -> None:
        # transformers registers every special token the config names (bos/eos/..., model-specific *_token, extra
        # special tokens) as a special added token when loading: they split out of text and decode can skip them.
        added = {t.content: t for t in self._tok.get_added_tokens_decoder().values()}
        for text in dict.fromkeys([*self.special_tokens.values(), *_extra_special_tokens(self.config)]):
            old = added.get(text)
            if old is None or not old.special:
                keep = {} if old is None else dict(single_word=old.single_word, lstrip=old.lstrip, rstrip=old.rstrip)
                self._tok.add_special_tokens([tokenizers.AddedToken(text, special=True, normalized=False, **keep)])

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        # add_bos runs tokenizer.json's post-processor: transformers' add_special_tokens=True.
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_bos)]

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(np.asarray(ids, dtype=np.int64).reshape(-1).tolist(),
                                skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def decode_batch(self, rows: Iterable[Sequence[int] | np.ndarray], *, skip_special_tokens: bool = True
                     ) -> list[str]:
        lists = [np.asarray(row, dtype=np.int64).reshape(-1).tolist() for row in rows]
        texts = self._tok.decode_batch(lists, skip_special_tokens=skip_special_tokens)
        return [_clean_up_tokenization(t) for t in texts] if self._clean_up_spaces else texts

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        _write_config(path, config, self.chat_template)
        data = json.loads(self._tok.to_str())
        data["padding"], data["truncation"] = self._saved_padding, self._saved_truncation
        with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)


def _clean_up_tokenization(text: str) -> str:
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model. Text is split at control-piece strings ("<s>", "</s>", ...) first, so a rendered chat
    template's special tokens encode to their ids; each piece between them gets SentencePiece's dummy prefix."""

    def __init__(self, model_proto: bytes, config: Mapping[str, Any] | None = None, *,
                 chat_template: ChatTemplate | None = None, generation_eos_ids: Sequence[int] = ()) -> None:
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.config = dict(config or {})
        self.chat_template = _as_template(chat_template or self.config.get("chat_template"))
        self._generation_eos_ids = tuple(generation_eos_ids)
        n = self._sp.get_piece_size()
        self._control = {self._sp.id_to_piece(i): i for i in range(n) if self._sp.is_control(i)}
        self._control_ids = frozenset(self._control.values())
        longest_first = sorted(self._control, key=len, reverse=True)
        self._control_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None
        own = {key: self._sp.id_to_piece(i) for key, i in (("bos_token", self._sp.bos_id()),
                                                           ("eos_token", self._sp.eos_id()),
                                                           ("unk_token", self._sp.unk_id()),
                                                           ("pad_token", self._sp.pad_id())) if i >= 0}
        # A tokenizer_config.json next to the model overrides the model's own special pieces (null removes one).
        own = {k: v for k, v in own.items() if k not in self.config or self.config[k] is not None}
        self.special_tokens = {**own, **_template_tokens(self.config)}
        self.bos_id = self._id_of(self.special_tokens.get("bos_token"))
        eos_id = self._id_of(self.special_tokens.get("eos_token"))
        if eos_id is None:
            raise ValueError("the SentencePiece model has no eos piece (train it with eos_id >= 0)")
        self.eos_id = eos_id
        pad_id = self._id_of(self.special_tokens.get("pad_token"))
        self.pad_id = eos_id if pad_id is None else pad_id
        self.stop_ids = _stop_ids(self, eos_id, generation_eos_ids)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        """A `.model` file; tokenizer_config.json and a chat template beside it are read when present."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        config, template, generation_eos = _read_folder_config(folder)
        with open(path, "rb") as f:
            return cls(f.read(), config, chat_template=template, generation_eos_ids=generation_eos)

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None  # piece_to_id answers unk for unknown pieces

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        if self._control_re is None or self._control_re.search(text) is None:
            return ids + self._sp.encode(text)
        for i, part in enumerate(self._control_re.split(text)):
            if i % 2:
                ids.append(self._control[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]:
        texts = list(texts)
        if self._control_re is not None and any(self._control_re.search(t) for t in texts):
            return [self.encode(t, add_bos=add_bos) for t in texts]
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [bos + ids for ids in self._sp.encode(texts)]  # one threaded call

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        if skip_special_tokens:  # SentencePiece drops control pieces itself
            return self._sp.decode(ids)
        parts, run = [], []
        for i in ids:
            if i in self._control_ids:
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(parts) + self._sp.decode(run)

    def token_to_id(self, token: str) -> int | None:
        return self._id_of(token)

    def id_to_token(self, token_id: int) -> str | None:
        token_id = int(token_id)
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def save(self, path: str | os.PathLike) -> None:
        """tokenizer.model plus a tokenizer_config.json naming the special pieces, as a Llama-style HF folder.

        transformers rebuilds it as its own Llama tokenizer, which agrees with SentencePiece on ordinary text but
        not on a run of leading spaces or on a user-defined symbol at the very start of a text.
        """
        path = os.fspath(path)
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": self.bos_id is not None,
                  "add_eos_token": False, **self.special_tokens, **self.config}
        _write_config(path, config, self.chat_template)
        with open(os.path.join(path, "tokenizer.model"), "wb") as f:
            f.write(self._proto)

    def __getstate__(self) -> dict[str, Any]:
        # Data-loader workers receive the tokenizer by pickle; rebuild the processor from the proto.
        return {"proto": self._proto, "config": self.config, "chat_template": self.chat_template,
                "generation_eos_ids": self._generation_eos_ids}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["proto"], state["config"], chat_template=state["chat_template"],
                      generation_eos_ids=state["generation_eos_ids"])


def train_sentencepiece(texts: Iterable[str], model_prefix_or_dir: str | os.PathLike | None, vocab_size: int, *,
                        user_defined_symbols: Sequence[str] = R1_TAGS, model_type: str = "bpe",
                        character_coverage: float = 1.0, num_threads: int | None = None,
                        max_piece_length: int = 16, split_by_whitespace: bool = True,
                        split_by_unicode_script: bool = True,
                        chat_template: str | None = None) -> SentencePieceTokenizer:
    """Train a small SentencePiece model in-process (well under a second for 1 MB of text on two cores).

    Byte fallback is on (no text is unknown), digits split so arithmetic tokenizes per digit, text is not
    normalised (so decode(encode(s)) == s), and ids are unk 0, bos 1, eos 2, pad 3, then `user_defined_symbols`,
    which always encode as one piece each. `model_prefix_or_dir`: a folder (existing, or ending in a path
    separator) gets `tokenizer.model`; anything else is a prefix that gets `.model`; None writes nothing.
    `vocab_size` is an upper bound: a small corpus may give fewer pieces. A larger `max_piece_length` lets text
    that repeats verbatim in the corpus (a prompt template) become a few long pieces, more so with pieces
    allowed across whitespace and punctuation (`split_by_whitespace=False`, `split_by_unicode_script=False`).
    """
    if isinstance(texts, str):
        texts = [texts]

    def lines() -> Iterable[str]:  # SentencePiece trains on lines; a newline is never inside a piece
        for text in texts:
            yield from (line for line in text.splitlines() if line.strip())

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines()), model_writer=buffer, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, split_digits=True, user_defined_symbols=list(user_defined_symbols),
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=character_coverage, hard_vocab_limit=False,
        max_sentence_length=1 << 16, max_sentencepiece_length=max_piece_length,
        split_by_whitespace=split_by_whitespace, split_by_unicode_script=split_by_unicode_script,
        num_threads=num_threads or min(os.cpu_count() or 1, 16), minloglevel=2)
    tokenizer = SentencePieceTokenizer(buffer.getvalue(), chat_template=chat_template)
    if model_prefix_or_dir is not None:
        target = os.fspath(model_prefix_or_dir)
        if os.path.isdir(target) or target.endswith(os.sep):
            tokenizer.save(target)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            with open(target + ".model", "wb") as f:
                f.write(tokenizer.model_proto)
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A Hugging Face folder (tokenizer.json preferred, as transformers does), a folder with tokenizer.model, or a
    SentencePiece `.model` / `tokenizer.json` file."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if os.path.basename(path) == "tokenizer.json":
            return HFTokenizer.from_folder(os.path.dirname(os.path.abspath(path)))
        return SentencePieceTokenizer.from_file(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no tokenizer at {path}")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return HFTokenizer.from_folder(path)
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        return SentencePieceTokenizer.from_file(os.path.join(path, "tokenizer.model"))
    raise FileNotFoundError(f"{path} holds neither tokenizer.json nor tokenizer.model")
