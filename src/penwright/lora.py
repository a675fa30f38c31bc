"""LoRA through peft: fine-tune small low-rank adapters instead of every weight.

`--lora r=16,alpha=32,dropout=0.05[,targets=c_attn,c_proj]` freezes the base model and trains
low-rank updates of the target layers (by default peft's choice for the architecture: c_attn,
the fused attention projection, for GPT-2). Tokens new to the base model (the control tokens of
`--label-column`) train too: their embedding rows alone (peft's trainable tokens), which start
from their label's words (models.fit_tokenizer). A LoRA run directory holds the adapter
(adapter_config.json, adapter_model.safetensors: the low-rank updates and those rows) and the
tokenizer, not a copy of the base.
`merged` folds an adapter into its base: `penwright export --merge` saves that as a plain HF
model, and `generate.load` writes with it.

torch and peft are imported inside the functions, so that importing penwright stays light.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from . import files
from .config import LoraSpec
from .errors import PenwrightError

ADAPTER_CONFIG = "adapter_config.json"


@contextmanager
def _peft():
    """peft still asks transformers for a property transformers 5 renamed: a warning nobody can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def is_adapter(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def attach(model, spec: LoraSpec, base: str, adapter: Path | None = None, new_tokens: list[int] = ()):
    """`model` frozen, with trainable adapters: new ones as `spec` says, or those saved in `adapter`.

    `base` (the --model spec) is recorded in the adapter's config, for `merged` to load later.
    The embedding rows of `new_tokens` (ids the base model did not have) train as well.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        with _peft():
            return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    config = LoraConfig(task_type="CAUSAL_LM", r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.targets) or None, trainable_token_indices=list(new_tokens) or None,
                        fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2 stores weights transposed
    try:
        with _peft():
            model = get_peft_model(model, config)
    except ValueError as e:  # unknown architecture or target names
        raise PenwrightError(f"--lora: {str(e).splitlines()[0]} (name the layers with targets=...)") from None
    local = Path(base).expanduser()
    model.peft_config["default"].base_model_name_or_path = str(local.resolve()) if local.exists() else base
    return model


def new_token_rows(model) -> list:
    """The trainable embedding rows of the new tokens (peft's trainable tokens), in a LoRA model."""
    return [p for name, p in model.named_parameters() if "trainable_tokens_delta" in name and p.requires_grad]


def merged(path, tokenizer, dtype=None, allow_pickle: bool = False):
    """The plain HF model of a LoRA run: its base model with the adapter folded into the weights."""
    import torch
    from peft import PeftModel

    from .models import fit_tokenizer, load_model

    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise PenwrightError(f"{path}: the adapter does not name its base model (base_model_name_or_path)")
    model = load_model(base, allow_pickle, dtype=dtype or torch.float32)
    fit_tokenizer(model, tokenizer)
    with _peft():
        return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


def _into_empty(tmp: Path, target: Path) -> None:
    files.remove(target)  # an empty folder, if any
    os.rename(tmp, target)


def export_merged(run: str, out: str, log=print) -> Path:
    """Write the merged model of LoRA run `run` to the new folder `out`, all at once or not at all."""
    from .runs import locked

    with locked(Path(run), "export"):  # no training may change the run while it is read
        return _export(run, out, log)


def _export(run: str, out: str, log) -> Path:
    from .models import save_model
    from .tokens import load_tokenizer

    if not is_adapter(run):
        raise PenwrightError(f"--merge {run}: holds no LoRA adapter ({ADAPTER_CONFIG}); only LoRA runs need merging, "
                             "a full fine-tune already is a plain HF model directory")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PenwrightError(f"--out {target} already exists and is not empty; choose a new folder")
    tokenizer = load_tokenizer(run)
    model = merged(run, tokenizer)
    with files.staged_dir(target, f"writing {target}", "run the same command again", publish=_into_empty) as tmp:
        save_model(model, tokenizer, tmp)
    log(f"merged {run} into its base model: {target}")
    return target
