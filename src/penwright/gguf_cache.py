"""A `.gguf` file as a Hugging Face model folder, converted once and cached.

transformers reads a GGUF file by de-quantizing every tensor and rebuilding the tokenizer from
its metadata: about 14 s for SmolLM2-135M on 2 cores, on every load. `folder` does that once and
keeps the result in the cache (`$PENWRIGHT_CACHE/gguf/`) as a plain HF folder: fp32 safetensors
(the exact de-quantized weights), config.json, generation_config.json and the tokenizer files.
Everything that takes `--model x.gguf` reads that folder (sources.resolve), so training, writing
(either engine), evaluation and serving load a GGUF model like any other local model.

The key is the file's name, size and modification time and a hash of its first and last MiB,
not a hash of all of it: that costs little for a 100 MB file (0.1 s) but seconds for a
multi-GB one, on every load. A copied or rewritten file gets a new key and is converted again.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from importlib.metadata import version
from pathlib import Path

from . import files
from .errors import PenwrightError

FORMAT_VERSION = 1
EDGE = 1 << 20  # bytes hashed at each end of the file


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)  # stdout may be the samples being written


def folder(path: str | Path, log=_stderr) -> Path:
    """The cached HF model folder of GGUF file `path`, converting the file on first use."""
    path = Path(path).expanduser()
    target = files.cache_home() / "gguf" / f"{path.stem}-{key(path)}"
    if (target / "config.json").is_file():
        return target
    check(path)
    log(f"converting {path.name} to a Hugging Face model folder, once: {target}")
    hint = "run the same command again"
    with files.staged_dir(target, f"converting {path} into {target}", hint, publish=files.first_wins) as tmp:
        _convert(path, tmp)
    return target


def key(path: Path) -> str:
    """Content key of a GGUF file: name, size, mtime and both ends, and the converter's version."""
    stat = path.stat()
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, version("transformers"), path.name, stat.st_size,
                                        stat.st_mtime_ns]).encode())
    with open(path, "rb") as f:
        digest.update(f.read(EDGE))
        f.seek(max(0, stat.st_size - EDGE))
        digest.update(f.read(EDGE))
    return digest.hexdigest()[:20]


def check(path: Path) -> None:
    """Refuse, in one line, a file that is not a complete GGUF model (renamed, truncated, empty) or
    one of an architecture transformers cannot load."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)  # parses the header and maps every tensor: a short file fails here
    except (ValueError, IndexError, OSError) as e:  # numpy's errors on bytes that do not fit the header
        what = "not a GGUF file" if "magic" in str(e) or path.stat().st_size < 8 else "truncated or damaged"
        raise PenwrightError(f"{path}: {what} ({str(e).strip()[:120] or type(e).__name__}); "
                             "download or export the .gguf again") from None
    if "general.architecture" not in reader.fields:
        raise PenwrightError(f"{path}: a GGUF file without general.architecture, so not a model "
                             "(a LoRA adapter or vocabulary-only file?)")
    architecture = reader.fields["general.architecture"].contents()
    # llama.cpp's names for what transformers calls qwen2_moe, gpt_oss, minimax_m2...
    if re.sub(r"(?<!_)moe$", "_moe", architecture.replace("-", "_")) not in loadable_architectures():
        raise PenwrightError(f"{path}: transformers cannot load GGUF architecture {architecture!r}; "
                             f"it loads {', '.join(loadable_architectures())}")


def loadable_architectures() -> list[str]:
    """The GGUF architectures transformers de-quantizes into a causal language model."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a in causal or f"{a}_text" in causal]


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name}
    try:
        config = AutoConfig.from_pretrained(**where)
        # transformers puts a GPT-2 file's context_length into `n_ctx`, which GPT2Config ignores, so every
        # GPT-2 got 1024 positions and one with another context (penwright's scratch models) failed to load.
        if config.model_type == "gpt2" and isinstance(getattr(config, "n_ctx", None), int):
            config.n_positions = config.n_ctx
        model = AutoModelForCausalLM.from_pretrained(**where, config=config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except ValueError as e:  # e.g. a tokenizer kind transformers cannot rebuild
        raise PenwrightError(f"{path}: cannot load as a causal language model ({str(e).splitlines()[0]})") from None
    # The weights arrive de-quantized: a plain fp32 model, saved as one.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
