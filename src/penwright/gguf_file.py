"""Writing a model and its tokenizer as a GGUF file that llama.cpp, Ollama and LM Studio load.

The layout follows llama.cpp's own converter (convert_hf_to_gguf.py) for the two architectures
penwright trains, so those programs load the file as they load their own conversions:

- tensor names come from gguf's TensorNameMap, the table the converter uses; GPT-2's Conv1D
  weights are transposed to (out, in); Llama's q/k rows are permuted from Hugging Face's
  half-split rotary layout to the interleaved pairs llama.cpp rotates;
- 1-D tensors (norms, biases) and GPT-2's position table stay f32; the other weights become f32,
  f16 or q8_0 (blocks of 32 int8 values and one f16 scale, through gguf.quants, bit-exact with
  ggml's reference); a weight whose rows are not a multiple of 32 falls back to f16, as there;
- the tokenizer travels whole: byte-level BPE vocabulary and merges, token types, the name of
  the pre-tokenizer llama.cpp splits text with, special ids and the chat template. Label control
  tokens (<|genre=horror|>) are user-defined tokens, which llama.cpp always matches whole in a
  prompt; the end-of-text token is a control token. BOS is the end-of-text token with add_bos on,
  because penwright starts every text with it: llama.cpp then feeds a prompt as penwright does.

Tensors are planned first (names, shapes, types) and converted and written one at a time, so
memory holds one converted tensor, never a second copy of the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .errors import PenwrightError
from .generate import CONTROL

Q = gguf.GGMLQuantizationType
TYPES = {"f32": (gguf.LlamaFileType.ALL_F32, Q.F32), "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
         "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0)}
ARCHITECTURES = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA}
SUPPORTED = "gpt2 (GPT-2 family) and llama (Llama family, e.g. SmolLM2)"
END_OF_TURN = "<|im_end|>"  # ChatML's, the chat format penwright can also describe to Ollama
GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
DIGITS = {"type": "Digits", "individual_digits": True}


@dataclass
class Tensor:
    name: str  # the GGUF name
    shape: tuple[int, ...]  # numpy order (GGUF lists dimensions the other way round)
    type: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # float32 values in llama.cpp's layout

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.type)))


def write(model, tokenizer, path: Path, quantize: str, context: int, name: str, sampling) -> None:
    """Write `model` and `tokenizer` to `path` as GGUF; every check runs before the file is opened.

    `context` is the context the model learned (for GPT-2, the position table is cut to it);
    `sampling` (a SampleConfig) gives the default temperature, top-k and top-p stored in the file.
    """
    arch = architecture(model.config)
    file_type, weight_type = TYPES[quantize]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rows = model.get_input_embeddings().num_embeddings
    (_gpt2_parameters if arch == "gpt2" else _llama_parameters)(writer, model.config, context, rows)
    add_tokenizer(writer, tokenizer, rows)
    writer.add_sampling_temp(sampling.temperature)
    writer.add_sampling_top_k(sampling.top_k)
    writer.add_sampling_top_p(sampling.top_p)
    plan = tensors(model, arch, weight_type, context)
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))  # "135M", as the converter
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, plan)
    finally:
        writer.close()


def _write_tensors(writer, plan: list[Tensor]) -> None:
    """Convert and write each tensor in turn, aligned as GGUF wants, then flush the file to disk.

    As GGUFWriter.write_tensor_data, but through the file's own write: numpy's tofile reports a
    full disk as "N requested and M written", without the errno that says so.
    """
    out = writer.fout[0]
    for t in plan:
        data = gguf.quants.quantize(t.load(), t.type)
        assert data.nbytes == t.nbytes, t.name
        writer.write_padding(out, out.tell())
        out.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        writer.write_padding(out, data.nbytes)
    out.flush()
    os.fsync(out.fileno())


# --- architectures ----------------------------------------------------------------------------

def architecture(config) -> str:
    """The GGUF architecture of a model config, or a PenwrightError saying why it has none."""
    kind = config.model_type
    if kind not in ARCHITECTURES:
        raise PenwrightError(f"architecture {kind!r} cannot be exported to GGUF; supported: {SUPPORTED}")
    problem = _gpt2_problem(config) if kind == "gpt2" else _llama_problem(config)
    if problem:
        raise PenwrightError(f"this {kind} model cannot be exported to GGUF: {problem}")
    return kind


def _gpt2_problem(config) -> str | None:
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        return f"llama.cpp's GPT-2 uses the tanh GELU, this model {config.activation_function!r}"
    if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
        return "its attention is scaled differently from GPT-2's, which llama.cpp cannot express"
    return None


def _llama_problem(config) -> str | None:
    rope = getattr(config, "rope_parameters", None) or {}
    if config.hidden_act != "silu":
        return f"llama.cpp's Llama uses SiLU, this model {config.hidden_act!r}"
    if config.attention_bias or config.mlp_bias:
        return "it has attention or MLP biases, which transformers' GGUF reader would drop"
    if rope.get("rope_type", "default") != "default":
        return f"RoPE scaling {rope['rope_type']!r} is not written yet (plain RoPE only)"
    return None


def _gpt2_parameters(writer, config, context: int, rows: int) -> None:
    writer.add_context_length(context)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _llama_parameters(writer, config, context: int, rows: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(rows)
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)


# --- tensors ----------------------------------------------------------------------------------

def tensors(model, arch: str, weight_type, context: int) -> list[Tensor]:
    """Every tensor to write, in state-dict order, with its GGUF name, shape and type."""
    config = model.config
    names = gguf.get_tensor_name_map(ARCHITECTURES[arch], config.num_hidden_layers)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    plan = []
    for hf_name, value in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PenwrightError(f"no GGUF name for the {arch} tensor {hf_name!r}: an unknown variant")
        if name == "output.weight" and tied:
            continue  # the output head is the embedding table, which llama.cpp then reuses
        layout = _layout(arch, hf_name, config, context)
        shape = tuple(layout(torch.empty(value.shape, device="meta")).shape)
        plan.append(Tensor(name, shape, tensor_type(name, shape, weight_type),
                           lambda v=value, f=layout: f(v.detach().float()).contiguous().numpy()))
    return plan


def _layout(arch: str, hf_name: str, config, context: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """How a Hugging Face tensor becomes llama.cpp's: the same values, rearranged."""
    if arch == "gpt2":
        if hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            return lambda t: t.T  # Conv1D stores (in, out)
        if hf_name.endswith(".wpe.weight"):
            return lambda t: t[:context]  # positions past the learned context were never trained
    elif hf_name.endswith((".q_proj.weight", ".k_proj.weight")):
        query = hf_name.endswith(".q_proj.weight")
        heads = config.num_attention_heads if query else config.num_key_value_heads
        return lambda t: rotary_pairs(t, heads)
    return lambda t: t


def rotary_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's rotary layout (dims i and i + d/2 rotate together) to
    llama.cpp's (dims 2i and 2i+1), as the converter's `permute` does."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def tensor_type(name: str, shape: tuple[int, ...], weight_type) -> gguf.GGMLQuantizationType:
    """The converter's rule: norms, biases, 1-D tensors and position tables stay f32."""
    if len(shape) <= 1 or not name.endswith(".weight") or name.endswith("_norm.weight") \
            or name == "position_embd.weight":
        return Q.F32
    if shape[-1] % gguf.GGML_QUANT_SIZES[weight_type][0]:
        return Q.F16  # q8_0 blocks cannot cut such rows
    return weight_type


# --- the tokenizer ----------------------------------------------------------------------------

def add_tokenizer(writer, tokenizer, rows: int) -> None:
    """The whole tokenizer as llama.cpp's metadata, for a model with `rows` embeddings."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre_tokenizer(spec))
    tokens, types = vocabulary(tokenizer, rows)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.eos_token_id)  # penwright starts every text with end-of-text
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template:
        writer.add_chat_template(template)
        if chatml(tokenizer):
            writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(END_OF_TURN))


def pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for how this tokenizer splits text before BPE."""
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("ignore_merges") \
            or spec.get("normalizer") or decoder.get("type") != "ByteLevel":
        raise PenwrightError("only byte-level BPE tokenizers (GPT-2's kind, also SmolLM2's) can be exported "
                             f"to GGUF; this one is a {model.get('type')} tokenizer of another kind")
    pre = spec.get("pre_tokenizer") or {}
    steps = [{k: s.get(k) for k in ("type", "add_prefix_space", "use_regex", "individual_digits") if k in s}
             for s in ((pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre])]
    if steps == [GPT2_SPLIT]:
        return "gpt-2"
    if steps == [DIGITS, GPT2_SPLIT]:
        return "smollm"
    raise PenwrightError(f"the tokenizer splits text in a way penwright cannot name for llama.cpp "
                         f"({json.dumps(pre)[:120]}); supported: GPT-2's byte-level split and SmolLM's")


def vocabulary(tokenizer, rows: int) -> tuple[list[str], list[int]]:
    """Token texts and llama.cpp token types by id, padded with unused tokens to `rows`."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= rows:
        raise PenwrightError(f"the tokenizer has token ids up to {max(by_id)} but the model only {rows} "
                             "embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            control = added[i].special and not CONTROL.match(added[i].content)  # labels: user-defined
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def chatml(tokenizer) -> bool:
    """Whether the chat template is ChatML's, ending each turn with <|im_end|>."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return END_OF_TURN in template and END_OF_TURN in tokenizer.get_vocab()
