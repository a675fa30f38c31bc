"""Conversations as a model reads them: its chat template, the rendered text, and which tokens are learned.

A model's own template (`tokenizer.chat_template`) is used as it is; one without gets ChatML, whose
role markers become special tokens and which is saved with the tokenizer, so transformers, the
server and an exported GGUF all render a conversation the same way. Templates are rendered here
with jinja2 exactly as transformers renders them, so penwright's light tokenizer needs no transformers.

What is learned is found from the rendered text's character offsets, so any template works: the
tokens of each assistant reply, and the end-of-turn token that closes it, so the model learns to stop.

Knows nothing of models or training: it takes a tokenizer (transformers' or tokens.TextTokenizer).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from .corpus import BadRows, Conversation
from .errors import PenwrightError

MARKERS = ("<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PROBE = "Probe reply 7f3a"  # an assistant reply rendered to see what the template writes after a reply


class RenderError(Exception):
    """The chat template refused or failed on a conversation."""


def install(tokenizer) -> list[str]:
    """Give a tokenizer without a chat template ChatML, its role markers added as special tokens; returns
    the tokens it added."""
    if tokenizer.chat_template:
        return []
    added = [m for m in MARKERS if m not in tokenizer.get_vocab()]
    tokenizer.add_tokens(added, special_tokens=True)
    tokenizer.chat_template = CHATML
    return added


def template_of(tokenizer) -> str:
    """The tokenizer's own template, else ChatML (as plain text: what a model without one would read)."""
    return tokenizer.chat_template or CHATML


# --- rendering ----------------------------------------------------------------------------------

def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the template writes it, with what transformers' `apply_chat_template` passes to it:
    the messages, add_generation_prompt and the tokenizer's special tokens (bos_token, eos_token, ...)."""
    import jinja2

    template = _compiled(template_of(tokenizer))
    try:
        return template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise RenderError(str(e) or type(e).__name__) from None


@functools.cache
def _compiled(template: str):
    """The template in the environment transformers uses: a sandbox, trimmed blocks, loop controls,
    `{% generation %}` blocks (rendered as their content), tojson, raise_exception and strftime_now."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise PenwrightError(f"the chat template is not valid jinja ({e.message}, line {e.lineno})") from None


def end_of_turn(tokenizer) -> int | None:
    """The special token the template writes right after an assistant's reply (<|im_end|>, <|eot_id|>,
    </s>...), which the model learns to write and writing stops at; None if it writes none."""
    try:
        text = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}])
    except (RenderError, PenwrightError):
        return None
    after = text.find(PROBE) + len(PROBE)
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    special = {i for i, token in added.items() if token.special}
    for token, (start, _) in zip(encoding.ids, encoding.offsets):
        if start >= after:
            return token if token in special else None
    return None


# --- what is learned ----------------------------------------------------------------------------

def reply_spans(tokenizer, messages: list[dict], text: str) -> tuple[list[tuple[int, int]], int]:
    """Character spans of the assistant replies in `text` (the whole conversation rendered), and how
    many replies the template did not write out verbatim (those are not learned).

    A reply is looked for where the conversation before it, rendered with the generation prompt,
    ends (when the template renders that as a prefix of the whole), else after the previous reply.
    """
    spans, missing, cursor = [], 0, 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        start = len(prefix) if text.startswith(prefix) else cursor
        content = message["content"]
        at = text.find(content, start)
        if at < 0:
            content = content.strip()
            at = text.find(content, start)
        if at < 0:
            missing += 1
            continue
        spans.append((at, at + len(content)))
        cursor = at + len(content)
    return spans, missing


def learned(offsets: np.ndarray, ids: np.ndarray, spans: list[tuple[int, int]],
            eot: int | None) -> np.ndarray:
    """Which tokens lie in (or overlap) a reply's span, plus the end-of-turn token right after each reply."""
    keep = np.zeros(len(ids), np.uint8)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for a, b in spans:
        keep[(starts < b) & (ends > a)] = 1
        after = int(np.searchsorted(starts, b, side="left"))  # the first token after the reply
        if eot is not None and after < len(ids) and ids[after] == eot:
            keep[after] = 1
    return keep


@dataclass
class Encoded:
    """Conversations as token ids with their loss mask (1: learned), one array each."""

    ids: list[np.ndarray]
    masks: list[np.ndarray]
    conversations: list[Conversation]  # the ones that rendered
    unrendered_replies: int  # assistant turns the template did not write out verbatim

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All of them one after another: tokens, mask, and where each starts (then the total length)."""
        lengths = [len(ids) for ids in self.ids]
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        return (np.concatenate([np.zeros(0, np.int64), *self.ids]),
                np.concatenate([np.zeros(0, np.uint8), *self.masks]), starts)


def encode(tokenizer, conversations: list[Conversation], train_on: str = "assistant",
           bad: BadRows | None = None) -> Encoded:
    """Render and tokenize every conversation; one the template fails on is a malformed row (`bad`)."""
    bad = bad or BadRows(0)
    eot = end_of_turn(tokenizer)
    kept, texts, spans, missing = [], [], [], 0
    for conversation in conversations:
        messages = conversation.messages()
        try:
            text = render(tokenizer, messages)
            found, lost = reply_spans(tokenizer, messages, text)
        except RenderError as e:
            bad.add(conversation.source or "a conversation", f"the chat template failed to render it ({e})")
            continue
        kept.append(conversation)
        texts.append(text)
        spans.append(found)
        missing += lost
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
    ids, masks = [], []
    for encoding, found in zip(encodings, spans):
        tokens = np.asarray(encoding.ids, np.int64)
        ids.append(tokens)
        if train_on == "all":
            mask = np.ones(len(tokens), np.uint8)
        else:
            mask = learned(np.asarray(encoding.offsets, np.int64).reshape(-1, 2), tokens, found, eot)
        mask[:1] = 0  # nothing comes before the first token to predict it
        masks.append(mask)
    return Encoded(ids, masks, kept, missing)
