"""Models: resolving `--model`, scratch presets, control-token embeddings, devices and precision.

Every model is a plain `transformers` causal LM, so what penwright saves loads without penwright.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from . import sources
from .errors import PenwrightError
from .tokens import label_words

hf_logging.disable_progress_bar()  # per-shard bars on every save/load drown the training bar

# GPT-2 shapes; "small" is the 124M model.
PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256),
    "small": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "medium": dict(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
}


def scratch_model(preset: str, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset not in PRESETS:
        raise PenwrightError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **PRESETS[preset])
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def load_model(spec: str, allow_pickle: bool = False, trust_remote_code: bool = False, dtype=torch.float32):
    """A pretrained causal LM from a hub id, a directory or a .gguf file; safetensors only by default."""
    from transformers import AutoModelForCausalLM

    source = sources.resolve(spec)
    if not source.is_hub:
        _check_weights(Path(source.path), allow_pickle)
    safetensors_only = None if allow_pickle else True
    try:
        model = sources.load_pretrained(AutoModelForCausalLM, source, dtype=dtype, use_safetensors=safetensors_only,
                                        trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    except ValueError as e:  # e.g. an architecture that is not a causal LM
        raise PenwrightError(f"{spec}: cannot load as a causal language model ({sources.first_line(e)})") from None
    return model


def _check_weights(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise PenwrightError(f"{path}: no config.json; not a Hugging Face model directory")
    pickled = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if pickled and not allow_pickle and not any(path.glob("*.safetensors")):
        raise PenwrightError(f"{path}: holds only pickled weights (.bin/.pt), which can run code when loaded; "
                             "pass --allow-pickle if you trust them")


def fit_tokenizer(model, tokenizer) -> list[int]:
    """Grow the embeddings for added (control) tokens and agree on EOS and pad ids; returns the new ids."""
    known = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > known:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        _init_new_rows(model, tokenizer, known)
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.chat_template:
        from .chat import end_of_turn

        turn = end_of_turn(tokenizer)
        if turn not in (None, tokenizer.eos_token_id):  # transformers' generate stops at the end of a turn too
            model.generation_config.eos_token_id = [tokenizer.eos_token_id, turn]
    return list(range(known, len(tokenizer)))


MAX_DEFAULT_BLOCK = 512  # the default block size is the model's context, up to this


def default_block_size(spec: str, init: str, preset: str, trust_remote_code: bool = False) -> int:
    """The block size training picks for a model, read from its config alone (no weights loaded)."""
    if init == "scratch":
        return min(PRESETS[preset]["n_positions"], MAX_DEFAULT_BLOCK)
    from transformers import AutoConfig

    config = sources.load_pretrained(AutoConfig, sources.resolve(spec), trust_remote_code=trust_remote_code)
    return min(context_length(config), MAX_DEFAULT_BLOCK)


@torch.no_grad()
def _init_new_rows(model, tokenizer, known: int) -> None:
    """Start each new token where the model already understands it.

    A control token <|genre=horror|> starts at the mean input embedding of its label's words
    (" horror"), so a short fine-tune only has to refine a meaning the model has, not find one
    from noise; any other new token at the mean of all rows. An untied output head's new rows
    start at the mean of its rows, so no new token is predicted more than any other.
    """
    rows = model.get_input_embeddings().weight
    for token_id in range(known, len(tokenizer)):
        words = label_words(tokenizer.convert_ids_to_tokens(token_id))
        ids = [i for i in tokenizer.encode(words, add_special_tokens=False) if i < known] if words else []
        rows[token_id] = rows[ids].mean(0) if ids else rows[:known].mean(0)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != rows.data_ptr():
        head.weight[known:] = head.weight[:known].mean(0)
        if getattr(head, "bias", None) is not None:
            head.bias[known:] = head.bias[:known].mean()


def context_length(model) -> int:
    """The context of a model (or of a model's config)."""
    config = getattr(model, "config", model)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def save_model(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """Write an HF-format model directory (safetensors, config, tokenizer, generation config).

    `state_dict` replaces the model's own weights (FSDP gathers them into one for rank 0). A LoRA
    model saves its adapter, holding the rows of its new tokens: never the base's whole embeddings,
    which peft would add because the vocabulary grew."""
    lora = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict, **lora)
    tokenizer.save_pretrained(path)
