"""The parity check: does an exported GGUF file write what its run writes?

`check` reads the file back on its own (transformers' GGUF loader, which de-quantizes it) and
compares it with the run's model, on what a user would notice:

- the tokenizer: the same ids for a prompt holding a label's control token, the same EOS, pad
  and labels (a broken vocabulary, merge list or token type shows here);
- greedy continuations of a few prompts (a label prompt among them when the run has labels):
  after the run's own continuation, token by token, both models name their likeliest next token;
  at f32 they must agree on every one, at f16 and q8_0 on all but one in 32, not counting
  near-ties (the run itself rates the file's pick within `NEAR_TIE` of its own);
- perplexity on a held-out slice of the run's validation split, with the same code as
  `penwright eval`: within 1%.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SampleConfig
from .corpus import Document
from .evaluation import perplexity
from .generate import Writer, load
from .sources import first_line

PROMPTS = ("Once upon a time", "The night was")
GREEDY_TOKENS = 32
PERPLEXITY_TOLERANCE = 0.01
NEAR_TIE = 0.1  # nats between the run's two picks: rounding may swap them
TOKENIZER_TEXT = " In 1999 the caf\u00e9's owner said: \"Don't go!\"\n\nShe didn't."


@dataclass
class Parity:
    lines: list[str] = field(default_factory=list)  # the comparison, to print
    failures: list[str] = field(default_factory=list)  # what disagreed beyond tolerance

    def add(self, what: str, text: str, failure: str | None = None) -> None:
        self.lines.append(f"  {what:<11} {text}")
        if failure:
            self.failures.append(failure)


def check(reference: Writer, path: Path, quantize: str, docs: list[Document], source: str) -> Parity:
    """Compare the GGUF file at `path` (written at `quantize`) with `reference`, the run's model."""
    parity = Parity([f"parity check: {path.name} ({quantize}, read back by transformers) against the run"])
    try:
        exported = load(str(path), "fp32", "cpu", log=lambda *_: None, engine="hf")
    except Exception as e:  # whatever stops transformers from reading the file fails the check
        parity.failures.append(f"transformers cannot read the file back ({first_line(e)})")
    else:
        exported.context = min(exported.context, reference.context)
        compare(reference, exported, 0 if quantize == "f32" else 1, docs, source, parity)
    parity.lines.append("passed" if not parity.failures else "did not pass: " + "; ".join(parity.failures))
    return parity


def compare(reference: Writer, exported: Writer, allowed: int, docs: list[Document], source: str,
            parity: Parity) -> None:
    """Tokenizers first: with different ids, comparing the models would say nothing more."""
    tokenizers(reference, exported, parity)
    if parity.failures:
        return
    for writer in (reference, exported):
        writer.model.eval()
    cases = [(prompt, None) for prompt in PROMPTS]
    cases += [(PROMPTS[0], label) for label in sorted(reference.labels)[:1]]
    for prompt, label in cases:
        greedy(reference, exported, prompt, label, allowed, parity)
    compare_perplexity(reference, exported, docs, source, parity)


def tokenizers(reference: Writer, exported: Writer, parity: Parity) -> None:
    label = min(reference.labels, default=None)
    head = reference.tokenizer.convert_ids_to_tokens(reference.labels[label]) if label else ""
    text = head + TOKENIZER_TEXT
    ids = [w.tokenizer.encode(text, add_special_tokens=False) for w in (reference, exported)]
    failure = None
    if ids[0] != ids[1]:
        at = next((i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b), min(map(len, ids)))
        failure = (f"the tokenizer gives other ids for {text!r} "
                   f"(from token {at}: {ids[0][at:at + 3]} vs {ids[1][at:at + 3]})")
    elif reference.labels != exported.labels:
        failure = f"the labels differ ({sorted(reference.labels)} vs {sorted(exported.labels)})"
    elif (reference.tokenizer.eos_token_id, reference.tokenizer.pad_token_id) != \
            (exported.tokenizer.eos_token_id, exported.tokenizer.pad_token_id):
        failure = "the end-of-text or padding token differs"
    verdict = "same" if not failure else "DIFFERENT"
    eos, labels = reference.tokenizer.eos_token_id, len(reference.labels)
    parity.add("tokenizer", f"{verdict} ids for {text!r} ({len(ids[0])} tokens); EOS {eos}, {labels} labels",
               failure)


def greedy(reference: Writer, exported: Writer, prompt: str, label: str | None, allowed: int,
           parity: Parity) -> None:
    """Both models' likeliest next token at each step of the run's own greedy continuation. With
    rounding allowed (f16, q8_0), a near-tie in the run's own probabilities may go either way."""
    settings = SampleConfig(greedy=True, max_new_tokens=GREEDY_TOKENS, label=label)
    ids, new = reference.token_ids(prompt, settings)
    run, file = (log_probs(w, ids, new) for w in (reference, exported))
    picks, other = run.argmax(-1), file.argmax(-1)
    gaps = run.gather(1, picks[:, None]) - run.gather(1, other[:, None])  # 0 where both pick the same
    differ = int((picks != other).sum())
    ties = int(((picks != other) & (gaps[:, 0] <= NEAR_TIE)).sum()) if allowed else 0
    shown = f"{prompt!r} --label {label}" if label else repr(prompt)
    failure = f"{differ} of {len(new)} greedy tokens differ after {shown}" if differ - ties > allowed else None
    text = reference.tokenizer.decode(new, skip_special_tokens=True)
    tied = f" ({ties} of the others near-ties)" if ties else ""
    parity.add("greedy", f"{len(new) - differ}/{len(new)} tokens agree{tied} after {shown}: {text!r}", failure)


def log_probs(writer: Writer, ids: list[int], new: list[int]) -> torch.Tensor:
    """The model's next-token log-probabilities at each position of `new` (len(new), vocab), fed `ids + new`
    in one pass."""
    x = torch.tensor([ids + new], device=writer.device)
    with torch.inference_mode():
        logits = writer.model(input_ids=x, use_cache=False).logits[0]
    return logits[len(ids) - 1:len(ids) - 1 + len(new)].float().log_softmax(-1).cpu()


def compare_perplexity(reference: Writer, exported: Writer, docs: list[Document], source: str,
                       parity: Parity) -> None:
    run, file = (perplexity(w, docs)["perplexity"] for w in (reference, exported))
    change = file / run - 1
    failure = f"perplexity {file:.3f} against the run's {run:.3f} ({change:+.2%})" \
        if not abs(change) <= PERPLEXITY_TOLERANCE else None  # NaN fails too
    parity.add("perplexity", f"run {run:.3f}, file {file:.3f} ({change:+.2%}; the limit is "
                             f"{PERPLEXITY_TOLERANCE:.0%}) on {len(docs)} documents of {source}", failure)
