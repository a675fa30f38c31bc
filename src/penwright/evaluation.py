"""Evaluating and comparing models on held-out text, as a report people read.

`evaluate(EvalConfig)` loads each model in turn and scores it on the same documents:

- perplexity with a sliding window (every token is predicted from at least context - stride
  tokens before it), token-weighted over the set, and bits per byte, which stays comparable
  between models with different tokenizers;
- the continuation test: hold back each document's last N words, write from the rest, and score
  the written ending against the real one with sacrebleu's BLEU and chrF (0-100);
- diversity of those samples (distinct-n, self-BLEU), the longest run of tokens they copy from
  the training text (found with a suffix array), and, for labelled data, whether a classifier
  trained on the held-out texts recognises the label each sample was written for.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import files, sources
from .config import EvalConfig, SampleConfig, TrainConfig
from .corpus import BadRows, Conversation, Document, load_corpus, read_documents
from .errors import PenwrightError
from .generate import Chat, Writer, load
from .runs import RunDir, plot_losses, read_metrics, trained_context
from .tokens import encode_texts
from .words import plural

COPY_TOKENS = 50  # a sample holding a verbatim copy of this many training tokens counts as reciting
EXAMPLES = 3  # continuations shown per model in report.md
PASSAGE_WORDS = 200  # a held-out document of twice this many words or more is cut into passages this long
FEW_PASSAGES = 10  # a continuation test on fewer passages than this gets a warning: its scores are noisy


def evaluate(cfg: EvalConfig, log=print) -> dict:
    """Score every `cfg.model` on the held-out text; write the report to `cfg.out` if given."""
    out = Path(cfg.out) if cfg.out else None
    if out and out.exists() and not out.is_dir():
        raise PenwrightError(f"--out {out} is a file; give a folder for the report")
    models = cfg.models()
    for spec in models.values():
        sources.resolve(spec)  # a missing model directory fails now, not after the first model's scores
    docs, source, train_docs, train_source = held_out(cfg)
    report = {"held_out": {"source": source, "documents": len(docs), "training_text": train_source},
              "settings": {k: v for k, v in asdict(cfg).items() if k not in ("model", "out")},
              "models": {}}
    chats = any(isinstance(d, Conversation) for d in docs)  # one passage each: the last reply
    passages = min(len(docs), cfg.max_passages) if chats else len(continuation_cases(docs, cfg.holdout_words,
                                                                                   cfg.max_passages))
    if passages < FEW_PASSAGES:
        log(f"warning: the continuation test rests on {plural(passages, 'passage')} of held-out text, so its "
            "BLEU and chrF are noisy; hold out more text for figures to compare")
    for name, spec in models.items():
        log(f"evaluating {spec}" if name == spec else f"evaluating {name} ({spec})")
        # transformers' engine: perplexity runs writer.model on whole windows; long prompts are cut on purpose
        writer = load(spec, cfg.precision, cfg.device, log=lambda *_: None, engine="hf")
        # A run dir is scored within the block it was trained on: past it, a fine-tune is the base model.
        writer.context = min(writer.context, trained_context(spec) or writer.context)
        report["models"][name] = score(writer, docs, cfg, train_docs, label_test=True)
        del writer  # free this model before the next one loads
    if out:
        write_report(report, out, {name: spec for name, spec in models.items() if _is_run(spec)})
        log(f"report written to {out}")
    return report


def score(writer: Writer, docs: list[Document] | list[Conversation], cfg: EvalConfig,
          train_docs: list[Document] | None = None, label_test: bool = False) -> dict:
    """Every metric for one model; the memorisation and label tests only where they apply. On
    conversations, perplexity is the replies' and the continuation test writes each last reply."""
    chats = any(isinstance(d, Conversation) for d in docs)
    if chats:
        cases = reply_cases(writer, docs, cfg.holdout_words, cfg.max_passages)
        result = {"perplexity": reply_perplexity(writer, docs, cfg.batch_size)}
    else:
        cases = continuation_cases(docs, cfg.holdout_words, cfg.max_passages)
        result = {"perplexity": perplexity(writer, docs, cfg.stride, cfg.batch_size)}
    # The prompt keeps at least half the context: the ending depends on what came before.
    sampling = replace(cfg.sampling(), max_new_tokens=min(cfg.max_new_tokens, writer.context // 2))
    samples = write_continuations(writer, cases, sampling)
    endings = [" ".join(s.split()[:cfg.holdout_words]) for s in samples]
    per_case = [samples[i:i + cfg.num_samples] for i in range(0, len(samples), cfg.num_samples)]
    result["continuation"] = {**overlap(endings, [c.ending for c in cases for _ in range(cfg.num_samples)]),
                              "passages": len(cases), "documents": len({c.document for c in cases}),
                              "holdout_words": cfg.holdout_words,
                              "max_new_tokens": sampling.max_new_tokens,
                              "too_short_documents": 0 if chats else
                              sum(len(d.text.split()) <= cfg.holdout_words for d in docs)}
    result["diversity"] = diversity(per_case)
    result["memorisation"] = memorisation(writer.tokenizer, samples, [d.text for d in train_docs]) \
        if train_docs else None
    result["label_control"] = label_control(writer, docs, train_docs or [], cfg) if label_test else None
    result["examples"] = [{"prompt_end": c.prompt[-200:], "reference": c.ending, "generated": e}
                          for c, e in zip(cases[:EXAMPLES], endings[::cfg.num_samples])]
    return result


# --- the held-out text ------------------------------------------------------------------------

def held_out(cfg: EvalConfig) -> tuple[list[Document], str, list[Document] | None, str | None]:
    """Held-out and training documents: --data/--train-data, else the first run dir's splits."""
    run = next((m for m in cfg.models().values() if _is_run(m)), None)
    run_corpus = _run_corpus(run) if run and not (cfg.data and cfg.train_data) else None
    if cfg.data:
        docs, source = read_documents(Path(cfg.data), cfg)[1], cfg.data
    elif run_corpus:
        docs, source = run_corpus.val, f"validation split of {run}"
    else:
        raise PenwrightError("no held-out text: pass --data HELD_OUT, "
                             "or a run dir as --model to use its validation split")
    if not docs:
        hint = "" if cfg.data else " (it was trained with --val-fraction 0)"
        raise PenwrightError(f"{source}: no held-out text{hint}; pass --data with text the models did not train on")
    if cfg.train_data:
        return docs, source, read_documents(Path(cfg.train_data), cfg)[1], cfg.train_data
    if run_corpus:
        return docs, source, run_corpus.train, f"training split of {run}"
    return docs, source, None, None


def _is_run(spec: str) -> bool:
    return RunDir(Path(spec)).read_config() is not None


def _run_corpus(run: str):
    """The train/validation split a run dir was trained on, read again with its own settings."""
    saved = RunDir(Path(run)).read_config()
    cfg = TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})
    try:
        return load_corpus(cfg)
    except PenwrightError as e:
        raise PenwrightError(f"{run} was trained on {cfg.data}, which cannot be read now ({e}); "
                             "pass --data HELD_OUT (and --train-data TRAIN)") from None


# --- perplexity -------------------------------------------------------------------------------

def perplexity(writer: Writer, docs: list[Document], stride: int | None = None, batch_size: int = 8) -> dict:
    """Token-weighted perplexity and bits per byte of the documents' text.

    Documents are laid out as in training (EOS, label token if the model knows it, prompt, text)
    and only the text's tokens are scored, so every model is judged on the same bytes.
    """
    from tqdm.auto import tqdm

    tokens, scored = _stream(writer, docs)
    context = writer.context
    stride = min(stride or context // 2, context)
    plan = windows(len(tokens), context, stride)
    data = torch.from_numpy(tokens)
    nats = torch.zeros((), dtype=torch.float64)
    model, was_training = writer.model, writer.model.training
    model.eval()
    bar = tqdm(total=len(plan), desc="perplexity", unit="window", leave=False, **_bar_settings())
    try:
        for at in range(0, len(plan), batch_size):
            batch = plan[at:at + batch_size]
            x = torch.stack([data[start:end] for start, end, _ in batch]).to(writer.device)
            y = torch.stack([data[start + 1:end + 1] for start, end, _ in batch]).to(writer.device)
            keep = torch.stack([torch.from_numpy(scored[start + 1:end + 1]) & (torch.arange(start, end) >= first)
                                for start, end, first in batch]).to(writer.device)
            with torch.inference_mode(), torch.autocast(writer.device.type, dtype=writer.autocast,
                                                        enabled=writer.autocast is not None):
                logits = model(input_ids=x, use_cache=False).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
            nats += (loss * keep.flatten()).double().sum().cpu()
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    count = int(scored.sum())
    size = sum(len(d.text.encode()) for d in docs)
    loss = nats.item() / max(count, 1)
    return {"perplexity": math.exp(min(loss, 50)), "bits_per_byte": nats.item() / math.log(2) / max(size, 1),
            "loss": loss, "tokens": count, "bytes": size, "context": context, "stride": stride}


def _stream(writer: Writer, docs: list[Document]) -> tuple[np.ndarray, np.ndarray]:
    """All documents as one token stream, and which of its tokens are text to be scored."""
    eos = writer.tokenizer.eos_token_id
    texts = encode_texts(writer.tokenizer, [d.text for d in docs])
    prompts = encode_texts(writer.tokenizer, [d.prompt or "" for d in docs])
    tokens, scored = [], []
    for doc, text, prompt in zip(docs, texts, prompts):
        head = [eos] + ([writer.labels[doc.label]] if doc.label in writer.labels else []) + prompt.tolist()
        tokens += [np.asarray(head, np.int64), text]
        scored += [np.zeros(len(head), bool), np.ones(len(text), bool)]
    return np.concatenate(tokens), np.concatenate(scored)


def reply_perplexity(writer: Writer, conversations: list[Conversation], batch_size: int = 8) -> dict:
    """Perplexity and bits per byte of the assistant's replies (with their end-of-turn tokens) alone, each
    conversation read on its own from its start, as in training; one longer than the context is cut to it."""
    from .batches import Packed
    from .chat import encode
    from .losses import IGNORE, lm_loss

    encoded = encode(writer.tokenizer, conversations, "assistant", BadRows(len(conversations)))
    pad = writer.tokenizer.pad_token_id or 0
    packed = Packed(*encoded.arrays(), writer.context, 1, 0, truncate=True, pad=pad)
    nats, count = torch.zeros((), dtype=torch.float64), 0
    model, was_training = writer.model, writer.model.training
    model.eval()
    try:
        for at in range(0, packed.windows, batch_size):
            rows = packed.rows(range(at, min(at + batch_size, packed.windows)))
            x, y, positions = (a.to(writer.device) for a in rows)
            with torch.inference_mode(), torch.autocast(writer.device.type, dtype=writer.autocast,
                                                        enabled=writer.autocast is not None):
                nats += lm_loss(model, x, y, reduction="sum", positions=positions).double().cpu()
            count += int((y != IGNORE).sum())
    finally:
        model.train(was_training)
    replies = [t.content for c in encoded.conversations for t in c.turns if t.role == "assistant"]
    size = sum(len(reply.encode()) for reply in replies)
    loss = nats.item() / max(count, 1)
    return {"perplexity": math.exp(min(loss, 50)), "bits_per_byte": nats.item() / math.log(2) / max(size, 1),
            "loss": loss, "tokens": count, "bytes": size, "context": writer.context, "stride": None,
            "scored": "assistant replies", "cut_to_context": packed.too_long}


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first): feed tokens[start:end] and score the predictions made at positions
    first..end-1 (of tokens first+1..end). Each of tokens 1..n-1 is scored exactly once, the
    later ones with at least context - stride tokens before them."""
    plan, first, end = [], 0, min(context, n - 1)
    while end > first:
        plan.append((max(0, end - context), end, first))
        first, end = end, min(end + stride, n - 1)
    return plan


# --- the continuation test --------------------------------------------------------------------

@dataclass
class Case:
    prompt: str | Chat  # the passage without its ending (or a conversation before its last reply)
    ending: str  # the held-back words, joined by single spaces
    label: str | None
    document: int  # which held-out document the passage is from


def continuation_cases(docs: list[Document], words: int, limit: int) -> list[Case]:
    """The continuation test's passages, at most `limit` spread over them: each held-out document, or for
    one of 2 x PASSAGE_WORDS words or more, consecutive pieces of it; the last `words` words are held back."""
    cases = []
    for number, doc in enumerate(docs):
        starts = [m.start() for m in re.finditer(r"\S+", doc.text)]
        pieces = max(1, len(starts) // max(PASSAGE_WORDS, 2 * words))
        bounds = [len(starts) * k // pieces for k in range(pieces + 1)]
        for k, (first, end) in enumerate(zip(bounds, bounds[1:])):
            if end - first > words:
                cut, stop = starts[end - words], starts[end] if end < len(starts) else len(doc.text)
                head = (doc.prompt or "") if k == 0 else ""  # a prompt/completion row's prompt leads its first
                cases.append(Case(head + doc.text[starts[first]:cut].rstrip(), " ".join(doc.text[cut:stop].split()),
                                  doc.label, number))
    if not cases:
        longest = max(len(d.text.split()) for d in docs)
        raise PenwrightError(f"--holdout-words {words} leaves nothing to continue from: the longest held-out "
                             f"document has {plural(longest, 'word')}; use --holdout-words {max(1, longest // 4)} "
                             "or longer documents")
    picked = np.unique(np.linspace(0, len(cases) - 1, min(limit, len(cases))).round().astype(int))
    return [cases[i] for i in picked]


def reply_cases(writer: Writer, conversations: list[Conversation], words: int, limit: int) -> list[Case]:
    """Per conversation (at most `limit`), the turns before its last reply as a chat prompt, and the first
    `words` words of that reply as what the written one is compared with."""
    from .chat import RenderError, render

    cases = []
    for number, conversation in enumerate(conversations):
        last = max(i for i, turn in enumerate(conversation.turns) if turn.role == "assistant")
        try:
            prompt = render(writer.tokenizer, conversation.messages()[:last], add_generation_prompt=True)
        except RenderError:
            continue
        cases.append(Case(Chat(prompt), " ".join(conversation.turns[last].content.split()[:words]), None, number))
    if not cases:
        return []
    picked = np.unique(np.linspace(0, len(cases) - 1, min(limit, len(cases))).round().astype(int))
    return [cases[i] for i in picked]


def write_continuations(writer: Writer, cases: list[Case], sampling: SampleConfig) -> list[str]:
    """`num_samples` continuations per case, in case order, each conditioned on its case's label."""
    from tqdm.auto import tqdm

    per_label: dict[str | None, list[int]] = {}
    for i, case in enumerate(cases):
        per_label.setdefault(case.label, []).append(i)
    chunk = max(1, sampling.batch_size // sampling.num_samples)
    calls = [ids[at:at + chunk] for ids in per_label.values() for at in range(0, len(ids), chunk)]
    texts = [""] * (len(cases) * sampling.num_samples)
    with tqdm(total=len(cases), desc="continuations", unit="doc", leave=False, **_bar_settings()) as bar:
        for n, group in enumerate(calls):  # small calls with one label each, so the bar moves
            label = cases[group[0]].label
            settings = replace(sampling, label=label if label in writer.labels else None,
                               seed=None if sampling.seed is None else sampling.seed + n)
            made = writer.samples([cases[i].prompt for i in group], settings)
            for k, i in enumerate(group):
                for j in range(sampling.num_samples):
                    texts[i * sampling.num_samples + j] = made[k * sampling.num_samples + j].text
            bar.update(len(group))
    return texts


def overlap(generated: list[str], references: list[str]) -> dict:
    """Corpus-level and mean sentence-level BLEU and chrF of `generated` against `references`."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf, sentence_bleu = BLEU(), CHRF(), BLEU(effective_order=True)
    return {"bleu": bleu.corpus_score(generated, [references]).score,
            "chrf": chrf.corpus_score(generated, [references]).score,
            "sentence_bleu": float(np.mean([sentence_bleu.sentence_score(g, [r]).score
                                            for g, r in zip(generated, references)])),
            "sentence_chrf": float(np.mean([chrf.sentence_score(g, [r]).score for g, r in zip(generated, references)]))}


# --- diversity, copying, labels ---------------------------------------------------------------

def diversity(groups: list[list[str]]) -> dict:
    """distinct-n over all samples (unique n-grams / n-grams), self-BLEU among each prompt's samples."""
    from sacrebleu.metrics import BLEU

    words = [s.split() for group in groups for s in group]
    out = {}
    for n in (1, 2, 3):
        grams = [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else None
    bleu = BLEU(effective_order=True)
    scores = [bleu.sentence_score(s, group[:i] + group[i + 1:]).score
              for group in groups if len(group) > 1 for i, s in enumerate(group)]
    out["self_bleu"] = float(np.mean(scores)) if scores else None  # needs --num-samples 2 or more
    return out


def memorisation(tokenizer, samples: list[str], train_texts: list[str]) -> dict:
    """Per sample, the longest run of its tokens found verbatim in the training text."""
    eos = np.array([tokenizer.eos_token_id], np.int64)
    corpus = np.concatenate([part for ids in encode_texts(tokenizer, train_texts) for part in (eos, ids)])
    queries = encode_texts(tokenizer, samples)
    finder = CopyFinder(corpus, depth=max([1, *map(len, queries)]))
    longest = [finder.longest_copy(q) for q in queries]
    return {"longest_copy": max(longest), "mean_longest_copy": float(np.mean(longest)),
            f"share_with_{COPY_TOKENS}_token_copy": float(np.mean([n >= COPY_TOKENS for n in longest])),
            "training_tokens": len(corpus)}


class CopyFinder:
    """Longest common substrings with a fixed token array, via a suffix array built with numpy.

    Suffixes are sorted by their first `depth` tokens by prefix doubling (one argsort per
    doubling, so about log2(depth) sorts), and a query is binary-searched for all its suffixes at
    once. Copies are measured up to `depth` tokens.
    """

    def __init__(self, tokens: np.ndarray, depth: int):
        self.depth = depth
        self.order = _suffix_array(np.asarray(tokens, np.int64), depth)
        self.padded = np.concatenate([np.asarray(tokens, np.int64), np.full(depth, -1)])  # -1: past the end

    def longest_copy(self, query) -> int:
        query = np.asarray(query, np.int64)
        m, n = len(query), len(self.order)
        if m == 0 or n == 0:
            return 0
        width = min(m, self.depth)
        index = np.arange(m)[:, None] + np.arange(width)
        suffixes = np.where(index < m, query[np.minimum(index, m - 1)], -2)  # -2: the query ended
        lo, hi = np.zeros(m, np.int64), np.full(m, n, np.int64)
        while (lo < hi).any():
            mid = np.minimum((lo + hi) // 2, n - 1)
            less = _less(self._prefixes(mid, width), suffixes)
            active = lo < hi
            lo = np.where(active & less, mid + 1, lo)
            hi = np.where(active & ~less, mid, hi)
        # The longest match of each suffix is with a neighbour of its place in the sorted order.
        best = [(self._prefixes(np.clip(at, 0, n - 1), width) == suffixes).cumprod(1).sum(1) for at in (lo - 1, lo)]
        return int(np.maximum(*best).max())

    def _prefixes(self, rows: np.ndarray, width: int) -> np.ndarray:
        return self.padded[self.order[rows][:, None] + np.arange(width)]


def _suffix_array(tokens: np.ndarray, depth: int) -> np.ndarray:
    """Start positions of the suffixes, sorted by their first `depth` tokens (shorter first)."""
    n = len(tokens)
    rank = np.unique(tokens, return_inverse=True)[1].astype(np.int64)
    order = np.argsort(rank, kind="stable")
    width = 1
    while width < depth and n and rank.max() < n - 1:  # stop once every prefix is distinct
        after = np.zeros(n, np.int64)  # rank + 1 of the suffix `width` further on, 0 past the end
        after[:max(0, n - width)] = rank[width:] + 1
        key = rank * (n + 1) + after
        order = np.argsort(key)
        ordered = key[order]
        rank = np.empty(n, np.int64)
        rank[order] = np.concatenate([[0], np.cumsum(ordered[1:] != ordered[:-1])])
        width *= 2
    return order


def _less(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise lexicographic a < b."""
    differ = a != b
    first = differ.argmax(1)
    rows = np.arange(len(a))
    return differ.any(1) & (a[rows, first] < b[rows, first])


def label_control(writer: Writer, docs: list[Document], train_docs: list[Document], cfg: EvalConfig) -> dict | None:
    """How often a TF-IDF + logistic-regression classifier recognises the label each of the model's
    labelled samples was written for. It learns the labels from all the labelled text there is, held
    out and training: a few held-out documents per label make too weak a judge. Beside it, the
    same classifier's accuracy on the held-out texts when it learns from the training ones alone:
    what it makes of real text, the ceiling to read the samples' figure against."""
    labelled = [d for d in docs if d.label is not None]
    trained = [d for d in train_docs if d.label is not None]
    classes = sorted({d.label for d in labelled})
    known = [c for c in classes if c in writer.labels]
    if len(classes) < 2 or not known:
        return None  # unlabelled data, or a model without control tokens for these labels
    ceiling = None
    if len({d.label for d in trained}) >= 2:
        ceiling = float(np.mean(genre_classifier(trained).predict([d.text for d in labelled]) ==
                                np.array([d.label for d in labelled])))
    classifier = genre_classifier(labelled + trained)
    sampling = replace(cfg.sampling(), num_samples=cfg.label_samples)
    per_label = {}
    for label in known:
        texts = [s.text for s in writer.samples([None], replace(sampling, label=label))]
        per_label[label] = float(np.mean(classifier.predict(texts) == label))
    return {"accuracy": float(np.mean(list(per_label.values()))), "chance": 1 / len(classes),
            "per_label": per_label, "samples_per_label": cfg.label_samples, "real_text_accuracy": ceiling,
            "classifier_documents": len(labelled) + len(trained)}


def genre_classifier(docs: list[Document]):
    """TF-IDF on words and word pairs, then logistic regression, fitted to the documents' labels."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    classifier = make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2)),
                               LogisticRegression(max_iter=1000))
    return classifier.fit([d.text for d in docs], [d.label for d in docs])


def end_of_training(writer: Writer, cfg: TrainConfig, log=print) -> dict:
    """`train --eval-at-end`: perplexity and the continuation test on the validation split, as card rows."""
    try:
        docs = load_corpus(cfg).val
        if not docs:
            raise PenwrightError("there is no validation split")
        # The training model, quiet about prompts cut to fit: that is what the test wants.
        quiet = Writer(writer.model, writer.tokenizer, writer.autocast, log=lambda *_: None)
        quiet.context = min(quiet.context, cfg.block_size or quiet.context)  # the block it was trained on
        result = score(quiet, docs, EvalConfig(model=[str(cfg.out)], seed=cfg.seed, batch_size=cfg.batch_size))
    except PenwrightError as e:
        log(f"--eval-at-end skipped: {e}")
        return {}
    ppl, cont = result["perplexity"], result["continuation"]
    return {"eval perplexity (sliding window)": f"{ppl['perplexity']:.2f}",
            "eval bits per byte": f"{ppl['bits_per_byte']:.4f}",
            f"continuation BLEU / chrF (last {plural(cont['holdout_words'], 'word')} of "
            f"{plural(cont['passages'], 'passage')})":
                f"{cont['bleu']:.2f} / {cont['chrf']:.2f}"}


# --- the report -------------------------------------------------------------------------------

COLUMNS = [  # (heading, path into a model's results, format)
    ("perplexity", ("perplexity", "perplexity"), "{:.2f}"),
    ("bits/byte", ("perplexity", "bits_per_byte"), "{:.3f}"),
    ("context", ("perplexity", "context"), "{:,} tokens"),
    ("passages", ("continuation", "passages"), "{}"),
    ("BLEU", ("continuation", "bleu"), "{:.2f}"),
    ("chrF", ("continuation", "chrf"), "{:.2f}"),
    ("distinct-1", ("diversity", "distinct_1"), "{:.3f}"),
    ("distinct-2", ("diversity", "distinct_2"), "{:.3f}"),
    ("distinct-3", ("diversity", "distinct_3"), "{:.3f}"),
    ("self-BLEU", ("diversity", "self_bleu"), "{:.2f}"),
    ("longest copy", ("memorisation", "longest_copy"), "{} tokens"),
    (f">= {COPY_TOKENS}-token copy", ("memorisation", f"share_with_{COPY_TOKENS}_token_copy"), "{:.0%}"),
    ("label accuracy", ("label_control", "accuracy"), "{:.0%}"),
]


def _cell(result: dict, path: tuple[str, str], fmt: str) -> str:
    value = (result.get(path[0]) or {}).get(path[1])
    return "-" if value is None else fmt.format(value)


def table(report: dict):
    """The comparison as a rich table for the terminal: one row per metric, one column per model."""
    from rich.table import Table

    grid = Table(title=f"penwright eval on {report['held_out']['source']}")
    grid.add_column("metric")
    for name in report["models"]:
        grid.add_column(name, justify="right", overflow="fold")
    for heading, path, fmt in COLUMNS:
        grid.add_row(heading, *(_cell(result, path, fmt) for result in report["models"].values()))
    return grid


def write_report(report: dict, out: Path, runs: dict[str, str]) -> None:
    """report.json, report.md, and charts of perplexity, BLEU and the training losses of `runs` (name -> run dir)."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(report["models"])
    charts = {"perplexity.png": ("perplexity", [report["models"][n]["perplexity"]["perplexity"] for n in names]),
              "bleu.png": ("continuation BLEU", [report["models"][n]["continuation"]["bleu"] for n in names])}
    for file, (metric, values) in charts.items():
        _bar_chart(names, values, metric, out / file)
    curves = {name: read_metrics(Path(run) / "metrics.jsonl") for name, run in runs.items()}
    if any(curves.values()):
        plot_losses(curves, out / "loss.png")
        charts["loss.png"] = ("training loss", [])
    files.write_text(out / "report.json", json.dumps(report, indent=2))
    files.write_text(out / "report.md", _markdown(report, list(charts)))


def _bar_chart(names: list[str], values: list[float], metric: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = bar_figure(names, values, metric)
    with files.replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def bar_figure(names: list[str], values: list[float], metric: str):
    """One horizontal bar per model, its value written at the end, every name whole (wrapped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_wrap(name) for name in names]
    rows = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.3 * rows + 0.3 * len(names)), dpi=110)
    ax.barh(range(len(names)), values, color="#4c72b0")  # horizontal: long model names stay readable
    ax.set_yticks(range(len(names)), labels, fontsize=8)
    for y, value in enumerate(values):  # inside the axes, so that no value is cut off at the edge
        ax.text(value, y, f" {value:.2f}", va="center", fontsize=9)
    ax.set_xlim(0, 1.25 * max([v for v in values if math.isfinite(v)] + [1e-9]))
    ax.invert_yaxis()  # first model on top, as in the table
    ax.set_xlabel(metric)
    ax.set_title(f"{metric} per model")
    fig.tight_layout()
    return fig


def _few(report: dict) -> bool:
    return any(r["continuation"]["passages"] < FEW_PASSAGES for r in report["models"].values())


def _markdown(report: dict, charts: list[str]) -> str:
    held, settings = report["held_out"], report["settings"]
    lines = ["# penwright eval", "",
             f"Held-out text: {held['source']} ({plural(held['documents'], 'document')}). "
             f"Copies are looked for in: {held['training_text'] or 'nothing (pass --train-data)'}.", "",
             "| metric | " + " | ".join(f"`{name}`" for name in report["models"]) + " |",
             "| --- |" + " ---: |" * len(report["models"])]
    for heading, path, fmt in COLUMNS:
        lines.append(f"| {heading} | " + " | ".join(_cell(r, path, fmt) for r in report["models"].values()) + " |")
    sampling = ", ".join(f"{k} {settings[k]}" for k in ("temperature", "top_k", "top_p", "repetition_penalty",
                                                        "greedy", "max_new_tokens", "num_samples", "seed"))
    chats = any(r["perplexity"].get("scored") for r in report["models"].values())
    lines += ["", "## How these were measured", "",
              "- **perplexity** and **bits per byte**: of the assistant's replies alone (each with its "
              "end-of-turn token), each conversation read on its own; the BLEU test writes each last reply, "
              "comparing its first words." if chats else
              "- **perplexity** and **bits per byte**: sliding window over the held-out text, as wide as the "
              "*context* row (a run dir's: the block it was trained on), stride "
              f"{settings['stride'] or 'half the context'}; only the documents' text is scored, "
              "not labels or prompts.",
              f"- **BLEU** and **chrF** (sacrebleu, 0-100): the last {plural(settings['holdout_words'], 'word')} "
              "of each of the *passages* were held back and written by the model from the rest of the passage; "
              f"corpus-level scores. A passage is a held-out document, or a piece of about {PASSAGE_WORDS} "
              "words of a long one." + (" **Few passages: these scores are noisy.**" if _few(report) else ""),
              f"- Sampling: {sampling} (new tokens are capped at half of each model's context).",
              "- **distinct-n**: unique n-word sequences / n-word sequences over all samples; **self-BLEU**: BLEU of "
              "each sample against the other samples for the same document (lower is more varied).",
              f"- **longest copy**: the longest run of a sample's tokens found verbatim in the training text; "
              f"**>= {COPY_TOKENS}-token copy**: share of samples holding such a copy (reciting, not writing).",
              "- **label accuracy**: share of samples written for a label that a TF-IDF + logistic-regression "
              "classifier, trained on the labelled held-out and training texts, assigns to that label; beside it, "
              "that classifier's accuracy on the real held-out texts when trained on the training texts alone.", ""]
    lines += [f"![{name}]({name})" for name in charts] + [""]
    for name, result in report["models"].items():
        cont, labels = result["continuation"], result["label_control"]
        lines += [f"## {name}", "", f"Continuation test on {plural(cont['passages'], 'passage')} from "
                  f"{plural(cont['documents'], 'document')} ({cont['too_short_documents']} had "
                  f"{plural(cont['holdout_words'], 'word')} or fewer), at most {cont['max_new_tokens']} new tokens "
                  f"and {plural(settings['num_samples'], 'sample')} each; perplexity on "
                  f"{plural(result['perplexity']['tokens'], 'token')} in a {result['perplexity']['context']}-token "
                  "window."]
        if labels:
            per_label = ", ".join(f"{k} {v:.0%}" for k, v in labels["per_label"].items())
            real = labels["real_text_accuracy"]
            lines.append(f"Label control: {labels['accuracy']:.0%} recognised "
                         f"(chance {labels['chance']:.0%}; {plural(labels['samples_per_label'], 'sample')} "
                         f"per label): {per_label}." +
                         (f" On the real held-out texts the classifier gets {real:.0%}." if real is not None else ""))
        lines.append("")
        for example in result["examples"]:
            lines += [f"> ...{_one_line(example['prompt_end'][-120:])}", ">", f"> **real:** {example['reference']}",
                      ">", f"> **written:** {_one_line(example['generated'])}", ""]
    return "\n".join(lines)


def _wrap(name: str, width: int = 32) -> str:
    """A long model name (a path, a .gguf file) on several lines, broken after / _ - . where it can be."""
    lines = [""]
    for piece in re.findall(r"[^/_.-]*[/_.-]?", name):
        while len(piece) > width:  # no break in sight: cut it
            lines += [piece[:width], ""]
            piece = piece[width:]
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(line for line in lines if line)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _bar_settings() -> dict:
    return {"dynamic_ncols": True, "mininterval": 0.5 if sys.stderr.isatty() else 30}
