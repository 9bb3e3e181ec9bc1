"""Chat templates rendered exactly as transformers 5.x renders them.

transformers is a test-only dependency: this mirrors its utils/chat_template_utils.py and
PreTrainedTokenizerBase.apply_chat_template (the same sandboxed jinja2 environment, globals,
`tojson` filter, message clean-up and template variables), so a prompt renders exactly as it
did when the model was tuned. Unlike transformers, tools must be JSON schemas.
"""
from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

ChatTemplate = str | dict[str, str]


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for assistant masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    # Templates may build dicts, but must not reach `dict`'s class attributes from the sandbox.
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Underscore attributes on a namespace are a route to CPython internals, so templates may not set them.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Templates come from the Hub and are untrusted code: they run in jinja2's immutable sandbox."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from JSON types, as transformers does, so the sandbox never sees foreign methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    prepared = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        # APIs return content=None or tool_calls=None; templates handle a missing key but may print "None".
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:  # templates read `reasoning_content` (Qwen3) or `thinking` (gpt-oss)
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def select_chat_template(chat_template: ChatTemplate | None, name_or_template: str | None = None,
                         has_tools: bool = False) -> str:
    """Pick the template as transformers does: a named one, the tool_use one when tools are given, or the default."""
    if isinstance(chat_template, dict):
        if name_or_template is not None:
            return chat_template.get(name_or_template, name_or_template)
        if has_tools and "tool_use" in chat_template:
            return chat_template["tool_use"]
        if "default" in chat_template:
            return chat_template["default"]
        raise ValueError(f"several chat templates and no default; name one of {sorted(chat_template)}")
    if name_or_template is not None:
        return name_or_template
    if chat_template is None:
        raise ValueError("this tokenizer has no chat template; pass chat_template=...")
    return chat_template


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
                         continue_final_message: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
                         documents: Sequence[Mapping[str, Any]] | None = None,
                         variables: Mapping[str, Any] | None = None) -> str:
    """Render one conversation. `variables` are extra template variables (special tokens, enable_thinking, ...)."""
    chat = _prepare_messages(messages)
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise TypeError("documents must be dicts with 'title' and 'text' keys")
    final = None
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are exclusive")
        final = chat[-1].get("content")
        if final is None:
            raise ValueError('continue_final_message is set but the final message has no "content"')
        if "content" not in template:
            raise ValueError("continue_final_message is set but the chat template never reads 'content'")
        if isinstance(final, (list, tuple)):
            blocks = [block for block in final if "text" in block]
            if not blocks:
                raise ValueError("continue_final_message is set but the final message has no text block")
            final = blocks[-1]["text"]
            blocks[-1]["text"] = final + _CONTINUE_TAG
        else:
            chat[-1]["content"] = final + _CONTINUE_TAG
    rendered = compile_chat_template(template).render(
        messages=chat, tools=_plain(None if tools is None else list(tools)),
        documents=_plain(None if documents is None else list(documents)),
        add_generation_prompt=add_generation_prompt, **_plain(dict(variables or {})))
    if final is None:
        return rendered
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message is set but the template drops part of the final message")
    at = rendered.rindex(tag)
    # The template may strip the message's trailing spaces, and the tag's with them.
    return rendered[:at] if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:at].rstrip()


