"""penwright: fine-tune GPT-2-family models on your own text and write in its style.

    from penwright import TrainConfig, train, load
    run = train(TrainConfig(data="book.txt", model="gpt2", out="runs/book", max_steps=500))
    writer = load(run)
    writer.generate("Malfoy hadn't noticed anything.", num_samples=3, temperature=0.8, seed=1)

Names are imported on first use, so `import penwright` stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "PenwrightError": "errors",
    "DataConfig": "config", "PrepareConfig": "config", "TrainConfig": "config",
    "SampleConfig": "config", "GenerateConfig": "config", "EvalConfig": "config",
    "prepare": "tokens", "TokenStore": "tokens",
    "train": "training",
    "evaluate": "evaluation",
    "load": "generate", "Writer": "generate", "Sample": "generate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'penwright' has no attribute {name!r}")
    return getattr(import_module(f"penwright.{_EXPORTS[name]}"), name)
