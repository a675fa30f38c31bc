"""Label control tokens on pretrained models: they start at their label's words, and LoRA trains them too."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from penwright import TrainConfig, load, train
from penwright.lora import export_merged
from penwright.models import fit_tokenizer
from penwright.runs import read_metrics
from penwright.tokens import add_control_tokens, load_tokenizer

quiet = {"log": lambda *_: None}
GENRES = ["comedy", "fantasy", "horror", "mystery", "romance", "scifi"]


def base_and_tokenizer(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(str(path))


def test_new_tokens_start_at_their_label_words_or_the_mean(tiny_base):
    model, tokenizer = base_and_tokenizer(tiny_base)
    before = model.get_input_embeddings().weight.detach().clone()
    add_control_tokens(tokenizer, ["<|genre=horror|>", "<|genre=science_fiction|>"])
    tokenizer.add_tokens(["<plain>"])
    new = fit_tokenizer(model, tokenizer)
    known = len(before)
    assert new == [known, known + 1, known + 2]
    rows = model.get_input_embeddings().weight.detach()
    assert torch.equal(rows[:known], before), "old rows untouched"
    for token_id, words in zip(new, [" horror", " science fiction"]):
        ids = tokenizer.encode(words, add_special_tokens=False)
        assert len(ids) > 0 and torch.allclose(rows[token_id], before[ids].mean(0))
    assert torch.allclose(rows[new[2]], before.mean(0))  # not a control token: the mean of all rows
    assert fit_tokenizer(model, tokenizer) == [] and torch.equal(model.get_input_embeddings().weight[new], rows[new])


def test_the_model_reads_a_fresh_control_token_as_its_label_word(tiny_base):
    """Before any training, <|genre=WORD|> conditions the model as WORD itself would: the point of the init."""
    model, tokenizer = base_and_tokenizer(tiny_base)
    word = next(t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
                if t.startswith("\u0120") and t[1:].isalpha() and len(t) > 4)  # a whole word, one token
    add_control_tokens(tokenizer, [f"<|genre={word[1:]}|>"])
    fit_tokenizer(model, tokenizer)
    eos, control, known = tokenizer.eos_token_id, len(tokenizer) - 1, len(tokenizer) - 1
    with torch.no_grad():
        as_token = model(input_ids=torch.tensor([[eos, control]])).logits[0, -1, :known]
        as_word = model(input_ids=torch.tensor([[eos, tokenizer.convert_tokens_to_ids(word)]])).logits[0, -1, :known]
    assert torch.allclose(as_token, as_word, atol=1e-5)


def test_an_untied_head_gives_new_tokens_the_mean_output_row():
    from transformers import LlamaConfig, LlamaForCausalLM

    from penwright.tokens import train_tokenizer

    tokenizer = train_tokenizer(["the house on the hill was dark and the night was long"] * 4, 300)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=False))
    head = model.get_output_embeddings().weight.detach().clone()
    add_control_tokens(tokenizer, ["<|genre=horror|>"])
    (new,) = fit_tokenizer(model, tokenizer)
    assert torch.allclose(model.get_output_embeddings().weight[new], head.mean(0))
    assert not torch.allclose(model.get_input_embeddings().weight[new], model.get_output_embeddings().weight[new])


def lora_labels_config(data, base, out, **overrides) -> TrainConfig:
    settings = dict(data=str(data), model=str(base), out=str(out), text_column="synopsis", label_column="genre",
                    lora="r=4,alpha=8,dropout=0", lr=1e-2, block_size=32, batch_size=8, max_steps=8, log_every=2,
                    save_every=4, eval_every=0, eval_batches=2, sample_every=0, sample_length=8, precision="fp32",
                    seed=1)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def lora_labels_run(tmp_path_factory, stories_csv, tiny_base):
    return train(lora_labels_config(stories_csv, tiny_base, tmp_path_factory.mktemp("runs") / "lora-labels"), **quiet)


def test_lora_trains_the_control_tokens_rows_and_saves_only_those(lora_labels_run, tiny_base):
    saved = load_file(lora_labels_run / "adapter_model.safetensors")
    rows = [name for name in saved if "lora_" not in name]
    assert len(rows) == 1 and rows[0].endswith("wte.token_adapter.trainable_tokens_delta"), sorted(saved)
    base, tokenizer = base_and_tokenizer(tiny_base)
    add_control_tokens(tokenizer, [f"<|genre={g}|>" for g in GENRES])
    new = fit_tokenizer(base, tokenizer)
    trained = saved[rows[0]]
    assert trained.shape == (len(GENRES), base.config.n_embd)
    moved = (trained - base.get_input_embeddings().weight[new]).norm(dim=1)
    assert (moved > 1e-3).all(), "every control token's row trained"


def test_a_lora_run_with_labels_writes_and_merges_with_its_control_tokens(lora_labels_run, tmp_path):
    from transformers import AutoModelForCausalLM

    writer = load(str(lora_labels_run), precision="fp32", device="cpu", **quiet)
    assert sorted(writer.labels) == GENRES
    assert writer.generate(None, label="horror", max_new_tokens=6, seed=1)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(str(lora_labels_run), str(tmp_path / "m"), **quiet))
    x = torch.tensor([[writer.tokenizer.eos_token_id, writer.labels["horror"], 40, 41, 42]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, writer.model(input_ids=x).logits, atol=1e-5)


def test_a_lora_run_with_labels_resumes_exactly(lora_labels_run, tmp_path, stories_csv, tiny_base):
    run = tmp_path / "lora-labels"
    shutil.copytree(lora_labels_run, run)
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    train(lora_labels_config(stories_csv, tiny_base, run, resume=True), **quiet)

    def losses(path):
        return {r["step"]: r["loss"] for r in read_metrics(path / "metrics.jsonl") if "loss" in r}

    expected, got = losses(lora_labels_run), losses(run)
    assert all(abs(got[s] - expected[s]) < 1e-5 for s in (6, 8)), (got, expected)


def test_training_windows_also_start_where_documents_start(stories_csv, stories_txt):
    """Writing starts from [EOS, label]; so does part of training, or a pretrained model never learns to."""
    from conftest import tiny_config
    from penwright.batches import Blocks
    from penwright.tokens import prepare

    store = prepare(tiny_config(stories_csv, "unused", text_column="synopsis", label_column="genre"), **quiet)
    tokens, eos = store.tokens("train"), store.manifest["eos_token_id"]
    starts = store.document_starts("train", 64)
    grid = (len(tokens) - 1) // 64
    assert 0 < len(starts) <= grid and (tokens[starts] == eos).all() and (starts % 64 != 0).all()
    assert starts.max() + 65 <= len(tokens)
    blocks = Blocks(tokens, None, 64, 4, seed=0, starts=starts)
    assert blocks.windows == grid + len(starts)
    labels = set(store.tokenizer().convert_tokens_to_ids([f"<|genre={g}|>" for g in GENRES]))
    firsts = [blocks.get(i)[0][:, :2] for i in range(blocks.per_epoch)]
    from_documents = [row.tolist() for batch in firsts for row in batch if row[0] == eos]
    assert len(from_documents) >= len(starts) * 0.9 and all(label in labels for _, label in from_documents)

    book = prepare(tiny_config(stories_txt, "unused"), **quiet)  # one document: nothing to add
    assert len(book.document_starts("train", 64)) == 0
