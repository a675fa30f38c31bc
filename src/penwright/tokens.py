"""Tokenizers and the token cache.

`prepare()` turns a corpus into a `TokenStore`: one flat memory-mapped token array per split
(uint16 when the vocabulary fits), an optional loss mask for prompt/completion corpora, the
exact tokenizer used, and a JSON manifest. The store lives in a cache folder named by a hash of
the corpus bytes, the options and the tokenizer, so unchanged input is never tokenized twice.

Stream layout: EOS, then for every document ``[<|label=value|>] [prompt] text EOS``, so each
document is preceded by EOS, which is also how generation starts a new text. Conversations are
laid out as their chat template renders them, one after another with no separator, and the store
records where each starts (`starts`): training packs them whole, each attending only to itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import chat, files, sources
from .config import PrepareConfig
from .corpus import BadRows, Corpus, Document, load_corpus
from .errors import PenwrightError
from .words import plural

FORMAT_VERSION = 1
EOS = "<|endoftext|>"
CHUNK_CHARS = 1 << 16  # long texts are cut into chunks so every core can tokenize
STALE_SECONDS = 60  # a temporary store this old whose process is gone was left by a killed prepare
CONTROL = re.compile(r"^<\|([^=|]+)=(.+)\|>$")  # a control token: <|column=value|>


def control_token(column: str, value: str) -> str:
    return f"<|{column}={value}|>"


def label_words(token: str) -> str | None:
    """The words of a control token's label (' horror' for <|genre=horror|>), or None for other tokens."""
    match = CONTROL.match(token)
    return " " + match[2].replace("_", " ") if match else None


def cache_root(cfg: PrepareConfig) -> Path:
    return files.cache_home(cfg.cache_dir) / "tokens"


# --- tokenizers -------------------------------------------------------------------------------

def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """A fast tokenizer from a hub id, a directory or a .gguf file, with EOS and pad set."""
    from transformers import AutoTokenizer, GPT2Tokenizer

    source = sources.resolve(spec)
    try:
        tokenizer = sources.load_pretrained(AutoTokenizer, source, trust_remote_code=trust_remote_code)
    except (ValueError, PenwrightError):
        # A bare GPT-2 vocabulary (vocab.json + merges.txt, no config) is common; read it as one.
        if not (Path(source.path) / "merges.txt").is_file():
            raise
        tokenizer = GPT2Tokenizer.from_pretrained(source.path)
    return _with_eos_and_pad(tokenizer, spec)


class TextTokenizer:
    """What writing needs of a tokenizer, read from a model folder with the `tokenizers` package alone.

    For penwright's own engine (engine.py: GPT-2 and the Llama family): transformers' tokenizer
    classes take seconds to import. The Rust tokenizer in tokenizer.json is the one transformers
    would wrap, so the ids are the same, and EOS and pad come from the same files transformers reads
    (SmolLM2-Instruct's EOS is `<|im_end|>`, its base model's `<|endoftext|>`, as its tokenizer_config.json says).
    """

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        path = Path(path)
        self.backend_tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
            try:
                settings.update(json.loads((path / name).read_text()))
            except (OSError, ValueError):
                pass
        self.eos_token = _token_text(settings.get("eos_token")) or EOS
        self.eos_token_id = self.backend_tokenizer.token_to_id(self.eos_token)
        if self.eos_token_id is None:
            raise PenwrightError(f"{path}: the tokenizer has no end-of-text token {self.eos_token!r}")
        self.pad_token_id = self.backend_tokenizer.token_to_id(_token_text(settings.get("pad_token")) or self.eos_token)
        self.special_tokens_map = {name: _token_text(settings[name]) for name in SPECIAL_TOKENS
                                   if settings.get(name)}
        self.chat_template = _chat_template(path, settings)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False):
        """As transformers' method of that name, for the few arguments writing uses."""
        text = chat.render(self, messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_added_vocab(self) -> dict[str, int]:
        return {token.content: i for i, token in self.backend_tokenizer.get_added_tokens_decoder().items()}

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _chat_template(path: Path, settings: dict) -> str | None:
    """The template transformers reads: chat_template.jinja, else tokenizer_config.json's (or its default)."""
    try:
        return (path / "chat_template.jinja").read_text()
    except OSError:
        pass
    template = settings.get("chat_template")
    if isinstance(template, list):  # several named templates
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _token_text(token) -> str | None:
    """A special token as tokenizer configs write it: a string, or an AddedToken's dict."""
    return token.get("content") if isinstance(token, dict) else token


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's scheme) trained on `texts`, for models trained from scratch."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def _with_eos_and_pad(tokenizer, spec: str):
    if not getattr(tokenizer, "is_fast", False):
        raise PenwrightError(f"{spec}: has no fast (Rust) tokenizer; penwright needs one")
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_control_tokens(tokenizer, tokens: list[str]) -> int:
    """Add label control tokens as special tokens (never split, skipped when decoding)."""
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    return tokenizer.add_tokens(new, special_tokens=True) if new else 0


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


# --- encoding ---------------------------------------------------------------------------------

def encode_texts(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text, in batches the Rust tokenizer spreads over every core."""
    pieces, owners = [], []
    for i, text in enumerate(texts):
        for chunk in _chunks(text):
            pieces.append(chunk)
            owners.append(i)
    encoded = tokenizer.backend_tokenizer.encode_batch_fast(pieces, add_special_tokens=False) if pieces else []
    out: list[list[np.ndarray]] = [[] for _ in texts]
    for owner, enc in zip(owners, encoded):
        out[owner].append(np.asarray(enc.ids, dtype=np.int64))
    return [np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in out]


def _chunks(text: str):
    """Cut long text before a line that starts with a non-space, where byte-level BPE never merges."""
    start = 0
    while len(text) - start > CHUNK_CHARS:
        match = re.compile(r"\n(?=\S)").search(text, start + CHUNK_CHARS)
        if not match:
            break
        yield text[start:match.end()]
        start = match.end()
    yield text[start:]


def encode_documents(tokenizer, docs: list[Document], label_column: str | None,
                     with_mask: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The packed token stream of `docs` and, `with_mask`, which tokens the loss learns."""
    eos = tokenizer.eos_token_id
    texts = encode_texts(tokenizer, [d.text for d in docs])
    prompts = encode_texts(tokenizer, [d.prompt or "" for d in docs]) if with_mask else None
    vocab = tokenizer.get_vocab()
    tokens, masks = [np.array([eos], np.int64)], [np.zeros(1, np.uint8)]
    for i, doc in enumerate(docs):
        head = [vocab[control_token(label_column, doc.label)]] if doc.label is not None else []
        head_ids = np.concatenate([np.asarray(head, np.int64), prompts[i] if prompts else np.zeros(0, np.int64)])
        body = np.concatenate([texts[i], [eos]])
        tokens += [head_ids, body]
        learn_head = 0 if doc.prompt is not None else 1
        masks += [np.full(len(head_ids), learn_head, np.uint8), np.ones(len(body), np.uint8)]
    return np.concatenate(tokens), (np.concatenate(masks) if with_mask else None)


# --- the store --------------------------------------------------------------------------------

@dataclass
class TokenStore:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: Path) -> "TokenStore":
        return cls(Path(path), json.loads((Path(path) / "manifest.json").read_text()))

    def tokens(self, split: str) -> np.ndarray:
        return self._array(f"{split}.bin", self.manifest["dtype"], self.manifest[f"{split}_tokens"])

    def mask(self, split: str) -> np.ndarray | None:
        if not self.manifest["has_mask"]:
            return None
        return self._array(f"{split}_mask.bin", "uint8", self.manifest[f"{split}_tokens"])

    @property
    def conversations(self) -> bool:
        return self.manifest.get("conversations", False)

    def starts(self, split: str) -> np.ndarray | None:
        """For conversations: where each one starts in the token array, then the array's length."""
        if not self.conversations:
            return None
        return np.fromfile(self.path / f"{split}_starts.bin", dtype=np.int64)

    def _array(self, name: str, dtype: str, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(self.path / name, dtype=dtype, mode="r", shape=(count,))

    def document_starts(self, split: str, block_size: int) -> np.ndarray:
        """Where documents begin (the EOS before each) with a block of text after them, off the grid of
        block starts, at most one per `block_size` tokens, spread evenly.

        Training windows from there see a document begin as writing does: EOS and its label at the
        first positions. Windows off the grid alone would almost never start so, and a pretrained
        model that saw each label only after a previous document's text writes nonsense from
        [EOS, label] alone.
        """
        tokens = self.tokens(split)
        starts = np.flatnonzero(tokens[:max(0, len(tokens) - block_size - 1)] == self.manifest["eos_token_id"])
        starts = starts[starts % block_size != 0]  # those on the grid have their window already
        most = (len(tokens) - 1) // block_size
        return starts[np.linspace(0, len(starts) - 1, most).astype(int)] if len(starts) > most else starts

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path / "tokenizer")

    @property
    def stats(self) -> dict:
        return self.manifest["stats"]


def prepare(cfg: PrepareConfig, log=print) -> TokenStore:
    """Read, split and tokenize the corpus, or reuse the cached result for the same input.

    The corpus is read first, so that a mistake in it (missing, empty, wrong encoding or column)
    is reported at once, before anything reaches for a tokenizer or the network.
    """
    corpus = load_corpus(cfg)
    if corpus.reflowed:
        first, width = next(iter(corpus.reflowed.items()))
        log(f"{plural(len(corpus.reflowed), 'hard-wrapped file')} ({first}: lines of about {width} characters): "
            "joined the lines of each paragraph; --keep-line-breaks keeps them")
    if unlabelled := corpus.stats().get("unlabelled_documents"):
        log(f"note: {plural(unlabelled, 'document')} of {corpus.stats()['documents']:,} "
            f"{'has' if unlabelled == 1 else 'have'} an empty {cfg.label_column!r} cell; "
            f"{'it trains' if unlabelled == 1 else 'they train'} without a label")
    base = None
    if cfg.tokenizer or cfg.init == "pretrained":
        base = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
        tokenizer_id = tokenizer_fingerprint(base)
    else:
        tokenizer_id = f"trained-bpe-{cfg.vocab_size}"
    options = {k: getattr(cfg, k) for k in ("text_column", "label_column", "prompt_column", "completion_column",
                                            "line_by_line", "val_fraction", "encoding", "keep_line_breaks", "format",
                                            "max_bad_rows")}
    if corpus.conversations:  # how a conversation is rendered and learned
        options.update(train_on=cfg.train_on, template=chat.template_of(base) if base else chat.CHATML)
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, corpus.fingerprint, options, bool(cfg.val_file), tokenizer_id],
                                    sort_keys=True).encode()).hexdigest()[:24]
    path = cache_root(cfg) / key
    if (path / "manifest.json").is_file():
        log(f"prepared tokens found in cache: {path}")
        return TokenStore.open(path)
    tokenizer = base if base is not None else train_tokenizer([d.text for d in corpus.train], cfg.vocab_size)
    return _write_store(path, corpus, tokenizer, cfg, log)


def _write_store(path: Path, corpus: Corpus, tokenizer, cfg: PrepareConfig, log) -> TokenStore:
    add_control_tokens(tokenizer, [control_token(cfg.label_column, v) for v in sorted(corpus.labels)])
    added = chat.install(tokenizer) if corpus.conversations else []  # new tokens the model must learn
    if corpus.conversations:
        splits, stats = encode_conversations(tokenizer, corpus, cfg)
    else:
        has_mask = any(d.prompt is not None for d in corpus.train + corpus.val)
        splits = {split: encode_documents(tokenizer, docs, cfg.label_column, has_mask) + (None,) if docs
                  else (np.zeros(0), np.zeros(0, np.uint8) if has_mask else None, None)
                  for split, docs in (("train", corpus.train), ("val", corpus.val))}
        stats = corpus.stats()
    dtype = "uint16" if len(tokenizer) <= 1 << 16 else "uint32"
    path.parent.mkdir(parents=True, exist_ok=True)
    files.remove_stale(path.parent, ".tmp-*", min_age=STALE_SECONDS)  # left by a prepare that was killed
    hint = "run the same command again"
    with files.staged_dir(path, f"writing the token cache {path}", hint, publish=files.first_wins) as tmp:
        for split, (tokens, mask, starts) in splits.items():
            tokens.astype(dtype).tofile(tmp / f"{split}.bin")
            for name, array in (("mask", mask), ("starts", starts)):
                if array is not None:
                    array.tofile(tmp / f"{split}_{name}.bin")
        tokenizer.save_pretrained(tmp / "tokenizer")
        counts = {split: len(tokens) for split, (tokens, _, _) in splits.items()}
        stats = {**stats, "tokens": counts["train"] + counts["val"],
                 "train_tokens": counts["train"], "val_tokens": counts["val"], "vocab_size": len(tokenizer)}
        manifest = {"version": FORMAT_VERSION, "dtype": dtype, "has_mask": splits["train"][1] is not None,
                    "conversations": corpus.conversations, "chat_tokens_added": added, "stats": stats,
                    "label_column": cfg.label_column, "eos_token_id": tokenizer.eos_token_id,
                    "train_tokens": counts["train"], "val_tokens": counts["val"],
                    "data": str(cfg.data), "val_file": cfg.val_file}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(f"tokenized into {path}")
    return TokenStore.open(path)


def encode_conversations(tokenizer, corpus: Corpus, cfg: PrepareConfig) -> tuple[dict, dict]:
    """Each split's (tokens, mask, starts) and the corpus statistics; refuses a corpus with nothing learned."""
    bad, splits, unrendered = BadRows(cfg.max_bad_rows, corpus.skipped), {}, 0
    kept = {}
    for split, conversations in (("train", corpus.train), ("val", corpus.val)):
        encoded = chat.encode(tokenizer, conversations, cfg.train_on, bad)
        splits[split] = encoded.arrays()
        kept[split], unrendered = encoded.conversations, unrendered + encoded.unrendered_replies
    if not splits["train"][1].any():
        why = (f"; the chat template wrote none of its {unrendered} assistant replies out as they are"
               if unrendered else "")
        raise PenwrightError(f"{cfg.data}: no token of the training split would be learned{why}; "
                             "check the corpus with `penwright prepare --show 3`")
    done = Corpus(kept["train"], kept["val"], corpus.files, corpus.labels, corpus.fingerprint, bad.seen)
    stats = {**done.stats(), "trained_tokens": int(splits["train"][1].sum()), "train_on": cfg.train_on}
    return splits, ({**stats, "unrendered_replies": unrendered} if unrendered else stats)
