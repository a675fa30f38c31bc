"""Conversation data: the three formats, chat templates, what is learned, the preview, and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import tiny_config
from penwright import PenwrightError, chat
from penwright.cli import main
from penwright.config import DataConfig, PrepareConfig
from penwright.corpus import Conversation, Turn, load_corpus
from penwright.tokens import TextTokenizer, prepare, train_tokenizer

TEXT = ["Which genre is it? It is horror. Once more? Paris is a city. You are helpful."] * 20
# Llama 3's layout, with a default system prompt when none is given and the content trimmed.
LLAMA3 = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>\n\n"
          "You are helpful.<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
quiet = {"log": lambda *_: None}


def chatml_tokenizer():
    tokenizer = train_tokenizer(TEXT, 300)
    chat.install(tokenizer)
    return tokenizer


def llama3_tokenizer():
    tokenizer = train_tokenizer(TEXT, 300)
    tokenizer.add_tokens(LLAMA3_TOKENS, special_tokens=True)
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.chat_template = LLAMA3
    return tokenizer


def learned_runs(tokenizer, conversation: Conversation, train_on: str = "assistant") -> list[str]:
    """The learned tokens of one conversation, decoded run by run."""
    encoded = chat.encode(tokenizer, [conversation], train_on)
    ids, mask = encoded.ids[0], encoded.masks[0]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [tokenizer.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]


# --- formats --------------------------------------------------------------------------------------

EXPECTED = (Turn("system", "Be brief."), Turn("user", "Which genre is it?"), Turn("assistant", "horror."))


def write_formats(tmp_path) -> dict:
    messages = [{"role": t.role, "content": t.content} for t in EXPECTED]
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}.get(t.role, t.role), "value": t.content}
                for t in EXPECTED]
    files = {"messages.jsonl": json.dumps({"messages": messages, "id": 1}) + "\n",
             "sharegpt.jsonl": json.dumps({"conversations": sharegpt}) + "\n",
             "alpaca.json": json.dumps([{"instruction": "Which genre is it?", "input": "", "output": "horror."},
                                        {"instruction": "Name the genre.", "input": "A ghost story.",
                                         "output": "horror."}], indent=2)}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with open(tmp_path / "alpaca.csv", "w", newline="") as f:
        csv.writer(f).writerows([["instruction", "input", "output"], ["Which genre is it?", "", "horror."]])
    with open(tmp_path / "messages.csv", "w", newline="") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(messages)]])
    return {name: tmp_path / name for name in [*files, "alpaca.csv", "messages.csv"]}


def read(path, **options) -> list:
    corpus = load_corpus(DataConfig(data=str(path), val_fraction=0, **options))
    return corpus.train


def test_each_format_is_detected_from_its_columns_and_rendered(tmp_path):
    paths = write_formats(tmp_path)
    for name in ("messages.jsonl", "sharegpt.jsonl", "messages.csv"):
        assert [c.turns for c in read(paths[name])] == [EXPECTED], name
    alpaca = read(paths["alpaca.json"])
    assert [c.turns for c in alpaca] == [EXPECTED[1:], (Turn("user", "Name the genre.\n\nA ghost story."),
                                                        Turn("assistant", "horror."))]
    assert alpaca[1].source == f"{paths['alpaca.json']}:7"  # the line its object starts on
    assert [c.turns for c in read(paths["alpaca.csv"])] == [EXPECTED[1:]]
    rendered = chat.render(chatml_tokenizer(), read(paths["sharegpt.jsonl"])[0].messages())
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhich genre is it?<|im_end|>\n"
                        "<|im_start|>assistant\nhorror.<|im_end|>\n")


def test_format_can_be_forced_and_plain_rows_stay_documents(tmp_path):
    paths = write_formats(tmp_path)
    with pytest.raises(PenwrightError, match="no column 'conversations'; it has: id, messages"):
        read(paths["messages.jsonl"], format="sharegpt")
    (tmp_path / "plain.jsonl").write_text(json.dumps({"text": "A story.", "messages": "not chat"}) + "\n")
    assert [d.text for d in read(tmp_path / "plain.jsonl", format="text")] == ["A story."]


# --- templates and what is learned ----------------------------------------------------------------

MULTI = Conversation((Turn("system", "You are helpful."), Turn("user", "Which genre is it?"),
                      Turn("assistant", "It is horror."), Turn("user", "Once more?"), Turn("assistant", "horror."),
                      Turn("user", "And?"), Turn("assistant", "Paris is a city.")))


def test_the_mask_is_exactly_each_reply_and_its_end_of_turn_with_chatml():
    tokenizer = chatml_tokenizer()
    assert chat.end_of_turn(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert learned_runs(tokenizer, MULTI) == ["It is horror.<|im_end|>", "horror.<|im_end|>",
                                              "Paris is a city.<|im_end|>"]
    everything = learned_runs(tokenizer, MULTI, "all")
    assert len(everything) == 1 and chat.render(tokenizer, MULTI.messages()).endswith(everything[0])


def test_the_mask_follows_a_template_with_its_own_system_prompt():
    tokenizer = llama3_tokenizer()
    # Replies that also occur in the template's default system prompt and in a user turn, one with spaces
    # the template trims: found where each reply is written, not at the first match in the text.
    conversation = Conversation((Turn("user", "You are helpful. Once more?"), Turn("assistant", " You are helpful. "),
                                 Turn("user", "Once more?"), Turn("assistant", "Once more?")))
    text = chat.render(tokenizer, conversation.messages())
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.")
    assert learned_runs(tokenizer, conversation) == ["You are helpful.<|eot_id|>", "Once more?<|eot_id|>"]


@pytest.mark.parametrize("make", [chatml_tokenizer, llama3_tokenizer])
def test_templates_render_as_transformers_does_also_from_the_light_tokenizer(make, tmp_path):
    tokenizer = make()
    tokenizer.save_pretrained(tmp_path)
    light = TextTokenizer(tmp_path)
    for messages, prompt in ((MULTI.messages(), False), (MULTI.messages()[:4], True), (MULTI.messages()[1:2], True)):
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert chat.render(tokenizer, messages, prompt) == expected
        assert light.apply_chat_template(messages, add_generation_prompt=prompt) == expected


def test_a_model_without_a_template_gets_chatml_saved_with_its_markers_as_special_tokens(tmp_path, chat_jsonl):
    store = prepare(PrepareConfig(data=str(chat_jsonl), init="scratch", vocab_size=400), **quiet)
    tokenizer = store.tokenizer()
    assert tokenizer.chat_template == chat.CHATML and (store.path / "tokenizer" / "chat_template.jinja").is_file()
    for marker in chat.MARKERS:
        assert tokenizer.encode(f"a{marker}b", add_special_tokens=False)[1] == tokenizer.convert_tokens_to_ids(marker)
    tokens, mask, starts = store.tokens("train"), store.mask("train"), store.starts("train")
    first = tokens[starts[0]:starts[1]]
    assert tokenizer.decode(first.tolist()) == chat.render(tokenizer, store_conversation(chat_jsonl, tokenizer, first))
    assert store.stats["trained_tokens"] == int(mask.sum()) and 0 < mask.sum() < len(mask) / 3


def store_conversation(path, tokenizer, ids) -> list[dict]:
    """The conversation of the corpus whose rendering is `ids`."""
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        if tokenizer.encode(chat.render(tokenizer, messages), add_special_tokens=False) == ids.tolist():
            return messages
    raise AssertionError("no conversation renders as the store's first one")


# --- the preview ----------------------------------------------------------------------------------

def test_show_highlights_exactly_the_learned_tokens_and_prints_totals(chat_jsonl, capsys):
    from penwright.preview import LEARNED, examples

    store = prepare(PrepareConfig(data=str(chat_jsonl), init="scratch", vocab_size=400), **quiet)
    shown = examples(store, 2)
    assert len(shown) == 2
    tokenizer = store.tokenizer()
    starts, mask, tokens = store.starts("train"), store.mask("train"), store.tokens("train")
    for text, start, end in zip(shown, starts, starts[1:]):
        highlighted = "".join(text.plain[s.start:s.end] for s in text.spans if s.style == LEARNED)
        ids = tokens[start:end][mask[start:end] == 1]
        assert highlighted == tokenizer.decode(ids.tolist()) and highlighted.endswith("<|im_end|>")
    assert main(["prepare", "--data", str(chat_jsonl), "--init", "scratch", "--vocab-size", "400", "--show", "2",
                 "--block-size", "32"]) == 0
    out = capsys.readouterr().out
    assert out.count("example ") == 2 and "Which genre is" in out
    learned = int(mask.sum())
    assert f"{learned:,} of the training split's {len(tokens):,}" in out and "learning assistant" in out
    too_long = int((np.diff(starts) > 32).sum())
    assert too_long and f"{too_long:,} longer than 32 tokens left out" in out


# --- refusals and bad input -----------------------------------------------------------------------

def test_a_corpus_with_nothing_to_learn_is_refused_before_training(tmp_path, chat_jsonl):
    silent = train_tokenizer(TEXT, 300)  # a template that never writes the assistant's words
    silent.chat_template = ("{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}\n{% endif %}"
                            "{% endfor %}")
    silent.save_pretrained(tmp_path / "silent")
    cfg = tiny_config(chat_jsonl, tmp_path / "run", tokenizer=str(tmp_path / "silent"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(PenwrightError, match="no token of the training split would be learned; the chat template "
                                             "wrote none of its .* assistant replies out"):
        prepare(cfg, **quiet)
    assert nothing_in(tmp_path / "c"), "nothing half-written"

    from penwright import train

    with pytest.raises(PenwrightError, match="every conversation is longer than the block of 8 tokens; use --truncate"):
        train(tiny_config(chat_jsonl, tmp_path / "run", block_size=8), **quiet)
    assert not (tmp_path / "run").exists()


def nothing_in(cache) -> bool:
    return not (cache / "tokens").exists() or not any((cache / "tokens").iterdir())


def raising_template(path):
    tokenizer = train_tokenizer(TEXT, 300)
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}{{ m.content }}\n{% endfor %}")
    tokenizer.save_pretrained(path)
    return path


GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
GOOD_SHAREGPT = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}


@pytest.mark.parametrize("row, words", [
    ("{not json", "not valid JSON"),
    ({"messages": "Hello there"}, "'messages' is text that is not a JSON list"),
    ({"messages": {"role": "user", "content": "Hi"}}, "'messages' must be a list of {'role', 'content'} objects"),
    ({"messages": [{"role": "robot", "content": "Hi"}, GOOD["messages"][1]]},
     "messages[1] has role 'robot'; known ones are: system, user, assistant"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": " "}, GOOD["messages"][1]]}, "messages[1] (user) has no content"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
     "conversations[2] has from 'bot'; known ones are: system, human, user, gpt, assistant"),
    ({"messages": [{"role": "system", "content": "Be kind."}, *GOOD["messages"]]},
     "the chat template failed to render it (System role not supported)"),
])
def test_bad_rows_get_one_line_naming_file_and_line_and_exit_2(tmp_path, capsys, row, words):
    data = tmp_path / "chats.jsonl"
    bad = row if isinstance(row, str) else json.dumps(row)
    good = json.dumps(GOOD_SHAREGPT if "conversations" in bad else GOOD)
    data.write_text("\n".join([good, bad, good]) + "\n")
    argv = ["prepare", "--data", data, "--init", "scratch", "--cache-dir", tmp_path / "cache",
            "--tokenizer", raising_template(tmp_path / "tok")]
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"penwright: error: {data}:2: ") and words in err[0], err
    assert "--max-bad-rows" in err[0]
    assert nothing_in(tmp_path / "cache"), "nothing half-written"


def test_max_bad_rows_skips_and_counts_up_to_its_limit(tmp_path):
    rows = [json.dumps(GOOD)] * 12 + ["{broken", json.dumps({"messages": [{"role": "user", "content": "Hi"}]})]
    (tmp_path / "chats.jsonl").write_text("\n".join(rows) + "\n")
    corpus = load_corpus(DataConfig(data=str(tmp_path / "chats.jsonl"), max_bad_rows=2))
    assert corpus.skipped == 2 and len(corpus.train + corpus.val) == 12 and corpus.stats()["skipped_rows"] == 2
    with pytest.raises(PenwrightError, match=r"chats.jsonl:14: no assistant turn.*1 malformed rows before it were "
                                             r"skipped \(--max-bad-rows 1\)"):
        load_corpus(DataConfig(data=str(tmp_path / "chats.jsonl"), max_bad_rows=1))


def test_an_unknown_train_on_is_refused_by_the_cli_and_the_library(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["prepare", "--data", "x.jsonl", "--train-on", "user"])
    assert exit.value.code == 2 and "--train-on: invalid choice: 'user'" in capsys.readouterr().err
    with pytest.raises(PenwrightError, match="--train-on must be one of assistant, all, got 'user'"):
        PrepareConfig(train_on="user")


def test_lora_is_refused_the_chat_markers_it_could_not_learn(tmp_path, chat_jsonl, tiny_base):
    from penwright import train

    cfg = tiny_config(chat_jsonl, tmp_path / "run", init="pretrained", model=str(tiny_base), lora="r=4")
    with pytest.raises(PenwrightError, match=r"--lora cannot learn the chat markers <\|im_start\|>, <\|im_end\|> "
                                             "that .* lacks"):
        train(cfg, **quiet)
    assert not (tmp_path / "run").exists()
