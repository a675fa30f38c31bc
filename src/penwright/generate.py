"""Writing text with a model: sampling, batching, stop strings, sentence trimming, streaming.

`Writer` wraps a model and its tokenizer: any HF causal LM, or penwright's own engine (engine.py,
with the GPT-2 and Llama families of gpt2.py and llama.py). One decode loop (`_decode`) serves every
use: it prefills the prompts once, then feeds one token per step through the KV cache and yields
the new tokens, so batch generation, streaming and the server share the same code. A stepper per
engine (`HFStepper`, `engine.Stepper`) hides how a model is fed: `first(prompt ids, steps)` and
`next(new ids)` each return the logits of the next token.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import gpt2, llama
from .config import SampleConfig
from .engine import Model, Stepper, folder_problem, read_config
from .errors import PenwrightError
from .quantize import int8_activations, int8_products
from .tokens import CONTROL
from .words import plural

SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
NUCLEUS_CANDIDATES = 256  # tokens top-p looks at first (usually enough: see `nucleus`)
FLOOR_BINS, FLOOR_SPAN = 4096, 32.0  # `top_p_floor`'s bins of log-probability, over this many nats


class Chat(str):
    """A conversation rendered by its chat template up to the reply (`Writer.render`): written from as it
    is, with no end-of-text token or label before it, as conversations are trained."""


@dataclass
class Sample:
    prompt: str | None
    text: str
    label: str | None = None
    finish_reason: str = "length"  # "stop" when EOS or a stop string ended it
    new_tokens: int = 0


class Writer:
    """A model ready to write. `load(path)` makes one; `generate` and `stream` use it."""

    def __init__(self, model, tokenizer, autocast: torch.dtype | None = None, log=print):
        self.model, self.tokenizer, self.log = model, tokenizer, log
        self.device = next(model.parameters()).device
        self.autocast = autocast
        if isinstance(model, Model):
            self.context = model.shape.context
        else:
            from .models import context_length

            self.context = context_length(model)
        self._capped = None  # the --max-new-tokens last said to be more than the context holds
        self.labels = {}  # label value -> control token id
        for token, token_id in tokenizer.get_added_vocab().items():
            if match := CONTROL.match(token):
                self.labels[match.group(2)] = token_id
        self._stops = (None, {tokenizer.eos_token_id})  # (for this template, these)

    @property
    def template(self) -> str | None:
        """The chat template (None: this model cannot chat)."""
        return getattr(self.tokenizer, "chat_template", None)

    @property
    def stops(self) -> set[int]:
        """The tokens that end a row: EOS and, for a chat model, its end-of-turn token."""
        if self._stops[0] != self.template:
            from .chat import end_of_turn

            self._stops = (self.template, {self.tokenizer.eos_token_id, end_of_turn(self.tokenizer)} - {None})
        return self._stops[1]

    # --- the public API ---------------------------------------------------------------------

    def generate(self, prompt: str | None = None, **settings) -> list[str]:
        """`num_samples` continuations of `prompt` (unconditional when None)."""
        cfg = SampleConfig(**settings)
        return [s.text for s in self.samples([prompt], cfg)]

    def samples(self, prompts: list[str | None], cfg: SampleConfig, abandoned=lambda: False) -> list[Sample]:
        """`cfg.num_samples` samples for each prompt, `cfg.batch_size` at a time, in prompt order.

        `abandoned()`, asked after every token, ends the writing early when nobody waits for it any more.
        """
        jobs = [p for p in prompts for _ in range(cfg.num_samples)]
        generator = self.generator(cfg.seed)
        out = []
        for start in range(0, len(jobs), cfg.batch_size):
            batch = jobs[start:start + cfg.batch_size]
            ids, budget = zip(*(self.prompt_ids(p, cfg) for p in batch))
            new = [[] for _ in batch]
            reasons = ["length"] * len(batch)
            for step in self._decode(list(ids), replace(cfg, max_new_tokens=min(budget)), generator):
                if abandoned():
                    break
                for i, token in step.items():
                    if token is None:
                        reasons[i] = "stop"
                    else:
                        new[i].append(token)
            for p, tokens, reason in zip(batch, new, reasons):
                text, stopped = finish(self.tokenizer.decode(tokens, skip_special_tokens=True), cfg)
                out.append(Sample(p, text, cfg.label, "stop" if stopped else reason, len(tokens)))
        return out

    def stream(self, prompt: str | None = None, cfg: SampleConfig | None = None,
               **settings) -> Generator[str, None, Sample]:
        """Yield one sample's text piece by piece as it is written; return the finished Sample."""
        cfg = cfg or SampleConfig(**settings)
        ids, budget = self.prompt_ids(prompt, cfg)
        draft = Draft(self.tokenizer, prompt, cfg)
        for step in self._decode([ids], replace(cfg, max_new_tokens=budget), self.generator(cfg.seed)):
            piece, stopped = draft.add(step[0])
            if piece:
                yield piece
            if stopped:
                break
        piece, sample = draft.close()
        if piece:
            yield piece
        return sample

    def token_ids(self, prompt: str | None, cfg: SampleConfig) -> tuple[list[int], list[int]]:
        """The ids fed for `prompt` (EOS, label token, prompt) and the ids written after them, EOS included."""
        ids, budget = self.prompt_ids(prompt, cfg)
        steps = self._decode([ids], replace(cfg, max_new_tokens=budget), self.generator(cfg.seed))
        return ids, [self.tokenizer.eos_token_id if step[0] is None else step[0] for step in steps]

    def render(self, messages: list[dict]) -> Chat:
        """The conversation in the model's chat template, ready for the assistant's reply."""
        from .chat import RenderError, render

        if not self.template:
            raise PenwrightError("this model has no chat template: train it on conversations (messages, "
                                 "ShareGPT or Alpaca data) to chat with it")
        try:
            return Chat(render(self.tokenizer, messages, add_generation_prompt=True))
        except RenderError as e:
            raise PenwrightError(f"the model's chat template refused these messages ({e})") from None

    # --- internals --------------------------------------------------------------------------

    def generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def prompt_ids(self, prompt: str | None, cfg: SampleConfig) -> tuple[list[int], int]:
        """EOS (how every training document starts), the label's token, then the prompt; a Chat alone."""
        head = [] if isinstance(prompt, Chat) else [self.tokenizer.eos_token_id]
        if cfg.label is not None and not head:
            raise PenwrightError("a label does not apply to a chat reply; leave it out")
        if cfg.label is not None:
            if cfg.label not in self.labels:
                known = ", ".join(sorted(self.labels)) or "none (train with --label-column)"
                raise PenwrightError(f"unknown label {cfg.label!r}; this model knows: {known}")
            head.append(self.labels[cfg.label])
        body = self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        max_new = min(cfg.max_new_tokens, self.context - len(head) - 1)
        if max_new < cfg.max_new_tokens and self._capped != cfg.max_new_tokens:  # said once, not per sample
            self._capped = cfg.max_new_tokens
            self.log(f"warning: --max-new-tokens {cfg.max_new_tokens} is more than the model's "
                     f"{self.context}-token context holds; writing at most {max_new} new tokens")
        room = self.context - max_new - len(head)
        if len(body) > room:
            self.log(f"warning: prompt is {plural(len(body), 'token')}, more than the {room} that fit with "
                     f"{max_new} new tokens in a {self.context}-token context; keeping its last {room}")
            body = body[len(body) - room:]
        return head + body, max_new

    def ends(self, tokens: list[int], cfg: SampleConfig) -> bool:
        """Whether a row whose new tokens are `tokens` is over: EOS (or end of turn), or a stop string."""
        return tokens[-1] in self.stops or _hit_stop(self.tokenizer, tokens, cfg.stop)

    def _stepper(self, rows: int):
        if rows > 1 and int8_products() == "fbgemm":
            # FBGEMM's int8 products beat the weight-only kernel's fp32 ones from 2 rows: the int8 layers
            # pack their weights for it once, the first time a batch comes (0.6 s for GPT-2 124M), and
            # keep the kernel for single rows
            int8_activations(self.model, keep_weights=True)
        if isinstance(self.model, Model):
            return Stepper(self.model)
        return HFStepper(self.model, self.autocast, self.tokenizer.pad_token_id or 0)

    @torch.inference_mode()
    def _decode(self, prompts: list[list[int]], cfg: SampleConfig, generator) -> Iterator[dict]:
        """Yield, per step, {row: new token id, or None when that row just finished}."""
        model, stops, stepper = self.model, self.stops, self._stepper(len(prompts))
        width = max(map(len, prompts))
        seen = torch.tensor([[-1] * (width - len(p)) + p for p in prompts], device=self.device)  # -1: no token
        done = [False] * len(prompts)
        texts, ids = [[] for _ in prompts], None
        was_training = model.training
        model.eval()
        try:
            for n in range(cfg.max_new_tokens):
                logits = stepper.next(ids) if n else stepper.first(prompts, cfg.max_new_tokens)
                choice = pick_tokens(logits, cfg, generator, seen)
                step = {}
                for row, token in enumerate(choice.tolist()):
                    if done[row]:
                        continue
                    texts[row].append(token)
                    if self.ends(texts[row], cfg):
                        done[row] = True
                        step[row] = None if token in stops else token
                    else:
                        step[row] = token
                yield step
                if all(done):
                    return
                ids = choice[:, None]
                if cfg.repetition_penalty != 1.0:  # the only reader of the history
                    seen = torch.cat([seen, ids], dim=1)
        finally:
            model.train(was_training)


class HFStepper:
    """Feeds an HF causal LM: left-pads the prompts to one width, grows the attention mask and
    positions, keeps its past_key_values."""

    def __init__(self, model, autocast: torch.dtype | None, pad: int = 0):
        self.model, self.autocast, self.pad = model, autocast, pad

    def first(self, prompts: list[list[int]], steps: int) -> torch.Tensor:
        width, device = max(map(len, prompts)), next(self.model.parameters()).device
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        self.mask, self.past = mask, None
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._forward(ids)

    def next(self, ids: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return self._forward(ids)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(ids.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions,
                             past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1, :]


class Draft:
    """One row's text as its tokens arrive: the pieces safe to show so far, and the finished Sample.
    Streaming (`Writer.stream`) and the server's batches (serve/batcher.py) both write through it."""

    def __init__(self, tokenizer, prompt: str | None, cfg: SampleConfig):
        self.tokenizer, self.prompt, self.cfg = tokenizer, prompt, cfg
        self.tokens: list[int] = []
        self.sent, self.reason = 0, "length"

    def add(self, token: int | None) -> tuple[str, bool]:
        """Take the next token (None: end of text); the new text safe to show, and whether a stop string ended it."""
        if token is None:
            self.reason = "stop"
        else:
            self.tokens.append(token)
        safe, stopped = finish(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.cfg, final=False)
        piece = safe[self.sent:]
        self.sent = max(self.sent, len(safe))
        return piece, stopped

    def close(self) -> tuple[str, Sample]:
        """The text not shown yet, and the Sample."""
        final, stopped = finish(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.cfg)
        piece = final[self.sent:]
        self.sent = len(final)
        return piece, Sample(self.prompt, final, self.cfg.label, "stop" if stopped else self.reason, len(self.tokens))


def _hit_stop(tokenizer, tokens: list[int], stops: list[str]) -> bool:
    if not stops:
        return False
    tail = tokenizer.decode(tokens[-32:], skip_special_tokens=True)
    return any(s in tail for s in stops)


def pick_tokens(logits: torch.Tensor, cfg: SampleConfig, generator, seen: torch.Tensor) -> torch.Tensor:
    """One token per row: repetition penalty, then greedy or temperature / top-k / top-p sampling."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        index = seen.clamp(min=0)
        scores = logits.gather(1, index)
        scores = torch.where(scores < 0, scores * cfg.repetition_penalty, scores / cfg.repetition_penalty)
        logits = logits.scatter(1, index, torch.where(seen >= 0, scores, logits.gather(1, index)))
    if cfg.greedy:
        return logits.argmax(-1)
    order = None
    if 0 < cfg.top_k < logits.size(-1):
        logits, order = torch.topk(logits, cfg.top_k)  # sorted: softmax and sampling then read k scores
    logits = (logits - logits.max(-1, keepdim=True).values) / cfg.temperature  # no overflow for tiny temperatures
    if cfg.top_p < 1.0:
        logits, order = nucleus(logits, order, cfg.top_p)
    choice = draw(logits.softmax(-1), generator)
    return (choice if order is None else order.gather(1, choice)).squeeze(1)


def nucleus(logits: torch.Tensor, order: torch.Tensor | None, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-p: `logits` with all but the smallest set of likeliest tokens holding `top_p` of the
    probability masked, and their ids through `order` (the ids of a top-k before, or None).

    A sort of the vocabulary would find the set but costs 3 ms for GPT-2's on a CPU core, half a
    decode step. A trained model's set is usually a few dozen tokens, inside a top-k of a few
    hundred (returned sorted, like a top-k's); a flatter one's (high temperature, untrained
    weights) is cut at `top_p_floor`'s probability instead (returned unsorted, the whole vocabulary).
    """
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    top, index = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.size(-1)))
    if bool((top.sum(-1) > top_p).all()):
        drop = top.cumsum(-1) - top > top_p  # keep the smallest set reaching top_p
        top_ids = index if order is None else order.gather(1, index)
        return logits.gather(1, index).masked_fill(drop, float("-inf")), top_ids
    return logits.masked_fill(logp < top_p_floor(logp, probs, top_p), float("-inf")), order


def top_p_floor(logp: torch.Tensor, probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Each row's smallest log-probability in its top-p set (B, 1), from its log-probabilities and
    probabilities: where a descending sort's running sum first passes `top_p`.

    One pass sums the probability in `FLOOR_BINS` bins of log-probability (the lowest also holds
    everything `FLOOR_SPAN` nats or more below the likeliest token, too little to matter); the
    running sum from the top bin down finds the bin where it passes `top_p`, and only that bin's
    tokens (a few hundred of GPT-2's 50,257 on a flat distribution) are sorted."""
    rows = logp.size(0)
    top = logp.amax(-1, keepdim=True)
    bins = (logp - top).add_(FLOOR_SPAN).mul_(FLOOR_BINS / FLOOR_SPAN).clamp_(0, FLOOR_BINS - 1).long()
    flat = (bins + torch.arange(rows, device=logp.device)[:, None] * FLOOR_BINS).view(-1)
    mass = torch.bincount(flat, weights=probs.reshape(-1).double(), minlength=rows * FLOOR_BINS)
    above = mass.view(rows, FLOOR_BINS).flip(-1).cumsum(-1).flip(-1)  # probability of each bin and those above
    floors = []
    for row, row_bins, row_above in zip(logp, bins, above):
        cut = int((row_above > top_p).sum()) - 1  # the highest bin whose running sum passes top_p
        if cut < 0:  # the whole row holds less than top_p, by rounding: keep it all
            floors.append(row.min())
            continue
        sure = row_above[cut + 1] if cut + 1 < FLOOR_BINS else row_above.new_zeros(())
        undecided = row[row_bins == cut].sort(descending=True).values
        at = int(torch.searchsorted(sure + undecided.double().exp().cumsum(0), top_p, right=True))
        floors.append(undecided[min(at, len(undecided) - 1)])  # (the end only by rounding)
    return torch.stack(floors)[:, None]


def draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """A token per row (B, 1) from its probabilities, by one uniform number per row against their
    running sum: `torch.multinomial` draws a random number per token, 0.8 ms for GPT-2's vocabulary."""
    total = probs.cumsum(-1)
    at = torch.rand(probs.size(0), 1, generator=generator, device=probs.device) * total[:, -1:]
    return torch.searchsorted(total, at, right=True).clamp_(max=probs.size(-1) - 1)


def finish(text: str, cfg: SampleConfig, final: bool = True) -> tuple[str, bool]:
    """Cut `text` at the first stop string and, if asked, after its last sentence.

    With `final=False` (streaming), also hold back what might still become a stop string or an
    unfinished sentence. Returns the text and whether a stop string was found.
    """
    stopped = False
    for stop in cfg.stop:
        at = text.find(stop)
        if at >= 0:
            text, stopped = text[:at], True
    if not final and not stopped:
        text = text.rstrip("\ufffd")  # half of a multi-byte character
        for stop in cfg.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    text = text[:-n]
                    break
    if cfg.trim_to_sentence:
        ends = list(SENTENCE_END.finditer(text))
        if ends:
            text = text[:ends[-1].end()]
        elif not final:
            text = ""
    return text, stopped


FAMILIES = {kind: family for family in (gpt2, llama) for kind in family.MODEL_TYPES}  # model_type -> module


def engine_family(spec: str):
    """The family module (gpt2, llama) that runs the folder `spec` in penwright's engine, and None;
    or None and why the engine cannot run it."""
    path = Path(spec).expanduser()
    if reason := folder_problem(path):
        return None, reason
    kind = read_config(path).get("model_type")
    if kind not in FAMILIES:
        return None, f"model_type {kind!r} is not one it runs ({', '.join(FAMILIES)})"
    reason = FAMILIES[kind].unsupported(read_config(path))
    return (None, reason) if reason else (FAMILIES[kind], None)


def load(spec: str, precision: str = "auto", device: str = "auto", allow_pickle: bool = False, log=print,
         quantize: str = "none", engine: str = "auto") -> Writer:
    """Load a run dir (or any HF model dir, hub id or .gguf) for writing; a LoRA run is merged into its base.

    `quantize="int8"` stores the weights as int8 when writing on CPU, in fp32 or bf16 (quantize.py).
    `engine`: "penwright" writes with penwright's own engine (engine.py: GPT-2, Llama, Mistral, Qwen2
    folders), "hf" with transformers, "auto" with penwright's wherever it can (see `engine_family`).
    Only "hf" gives a Writer whose `model` and `tokenizer` are transformers' own (`penwright eval`
    and the server use them).
    """
    from .devices import pick_device, pick_dtype
    from .runs import check_finished, learned_context

    check_finished(spec)
    if Path(spec).suffix.lower() == ".gguf":  # its converted HF folder (gguf_cache.py), which either engine reads
        from .sources import resolve

        spec = resolve(spec).path
    target = pick_device(device)
    dtype = pick_dtype(precision, target, log)
    int8 = quantize == "int8" and target.type == "cpu"
    family, reason = (None, "--engine hf") if engine == "hf" else engine_family(spec)
    if engine == "penwright" and reason:
        raise PenwrightError(f"--engine penwright cannot write with {spec}: {reason}; use --engine hf")
    if family is not None:
        from .tokens import TextTokenizer

        model, tokenizer = family.load(spec, dtype, int8).to(target), TextTokenizer(Path(spec).expanduser())
    else:
        model, tokenizer = _hf_model(spec, dtype, target, allow_pickle, int8)
    writer = Writer(model, tokenizer, log=log)
    writer.context = min(writer.context, learned_context(spec) or writer.context)
    return writer


def _hf_model(spec: str, dtype: torch.dtype, target: torch.device, allow_pickle: bool, int8: bool):
    """An HF causal LM and its tokenizer, through transformers."""
    from . import lora
    from .models import load_model
    from .tokens import load_tokenizer

    tokenizer = load_tokenizer(spec)
    if lora.is_adapter(spec):
        model = lora.merged(spec, tokenizer, dtype, allow_pickle).to(target)
    else:
        model = load_model(spec, allow_pickle=allow_pickle, dtype=dtype).to(target)
    if int8:
        from .quantize import quantize_int8

        quantize_int8(model, dtype)
    return model, tokenizer
