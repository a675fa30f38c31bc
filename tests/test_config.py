"""Settings are checked where they are declared, the same way for the library, the CLI and the server."""

from __future__ import annotations

import pytest

from penwright import PenwrightError
from penwright.cli import build_parser
from penwright.config import EvalConfig, GenerateConfig, PrepareConfig, SampleConfig, ServeConfig, TrainConfig

# --- the mechanism ------------------------------------------------------------------------------


def test_each_class_checks_its_own_fields_once_base_classes_first(monkeypatch):
    calls = []
    for cls in EvalConfig.__mro__:  # Runtime, SampleConfig and DataConfig meet in EvalConfig
        if real := cls.__dict__.get("check"):
            monkeypatch.setattr(cls, "check", lambda self, real=real, cls=cls: calls.append(cls.__name__) or real(self))
    EvalConfig(model=["runs/x"])
    assert calls == ["DataConfig", "SampleConfig", "EvalConfig"]  # each once, bases first (Runtime has none)


def test_the_wrong_type_from_the_library_or_the_server_is_named():
    with pytest.raises(PenwrightError, match=r"--batch-size must be a whole number or auto, got '8'"):
        TrainConfig(batch_size="8")
    with pytest.raises(PenwrightError, match=r"--temperature must be a finite number, got inf"):
        SampleConfig(temperature=float("inf"))
    with pytest.raises(PenwrightError, match=r"--greedy must be true or false, got 1"):
        SampleConfig(greedy=1)


@pytest.mark.parametrize("config, field, value, choices", [
    (TrainConfig, "precision", "fp64", "auto, fp32, bf16, fp16"),
    (GenerateConfig, "precision", "int4", "auto, fp32, bf16, fp16"),
    (ServeConfig, "precision", "fp8", "auto, fp32, bf16, fp16"),
    (EvalConfig, "precision", "half", "auto, fp32, bf16, fp16"),
    (PrepareConfig, "preset", "huge", "tiny, small, medium"),
    (PrepareConfig, "init", "random", "pretrained, scratch"),
    (TrainConfig, "head_loss", "sparse", "chunked, full"),
    (TrainConfig, "malloc", "jemalloc", "keep, system"),
    (TrainConfig, "attention", "flash", "auto, sdpa"),
    (GenerateConfig, "quantize", "int4", "int8, none"),
    (GenerateConfig, "engine", "vllm", "auto, penwright, hf"),
    (PrepareConfig, "train_on", "user", "assistant, all"),
    (PrepareConfig, "format", "csv", "auto, text, messages, sharegpt, alpaca"),
])
def test_a_choice_outside_its_literal_is_refused_by_the_config_and_the_cli(config, field, value, choices):
    extra = {"model": ["runs/x"]} if config is EvalConfig else {}
    with pytest.raises(PenwrightError, match=f"--{field.replace('_', '-')} must be one of {choices}, got '{value}'"):
        config(**{field: value, **extra})
    command = {TrainConfig: "train", GenerateConfig: "generate", ServeConfig: "serve", EvalConfig: "eval",
               PrepareConfig: "prepare"}[config]
    with pytest.raises(SystemExit):  # argparse offers the same choices
        build_parser().parse_args([command, f"--{field.replace('_', '-')}", value])


def test_device_precision_and_allow_pickle_are_one_shared_piece():
    for config in (TrainConfig, GenerateConfig, EvalConfig, ServeConfig):
        fields = config.__dataclass_fields__
        assert {"device", "precision", "allow_pickle"} <= set(fields), config
    assert EvalConfig.__dataclass_fields__["precision"].default == "fp32"  # exact metrics by default


# --- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(dropout=1.5), r"--dropout must be in \[0, 1\)"),
    (dict(attention_dropout=-0.1), r"--attention-dropout must be in \[0, 1\)"),
    (dict(batch_size=0), "--batch-size must be at least 1 or auto"),
    (dict(batch_size="auto", grad_accum=4), "--batch-size auto sets --grad-accum itself"),
    (dict(tokens_per_step=4096, grad_accum=4), "--tokens-per-step sets --grad-accum; give one of them"),
    (dict(tokens_per_step=100, block_size=128), "--tokens-per-step 100 is smaller than one block of 128 tokens"),
    (dict(memory_limit="lots"), "--memory-limit 'lots': expected a size such as 6G"),
    (dict(early_stop=0), "--early-stop must be at least 1"),
    (dict(log="wandb"), "--log 'wandb': unknown backend; penwright writes tensorboard"),
    (dict(eval_every=-1), "--eval-every must be not negative"),
    (dict(block_size=4), "--block-size must be at least 8"),
    (dict(lr=0.0), "--lr must be positive"),
    (dict(min_lr_ratio=2.0), r"--min-lr-ratio must be in \[0, 1\]"),
    (dict(val_fraction=1.0), r"--val-fraction must be in \[0, 1\)"),
    (dict(prompt_column="p"), "--prompt-column and --completion-column go together"),
    (dict(vocab_size=100), "--vocab-size must be at least 300"),
    (dict(max_bad_rows=-1), "--max-bad-rows must be not negative"),
    (dict(lora="r=0"), "need r >= 1"),
    (dict(lora="rank=4"), "expected r=N"),
    (dict(lora="r=four"), "r must be a number"),
    (dict(lora="r=4", init="scratch"), "drop --init scratch"),
    (dict(lora="r=4", fsdp=True), "--fsdp"),
])
def test_bad_training_settings(settings, message):
    with pytest.raises(PenwrightError, match=message):
        TrainConfig(data="x.txt", out="runs/x", **settings)


def test_trust_remote_code_is_off_unless_asked():
    assert TrainConfig().trust_remote_code is False and PrepareConfig().trust_remote_code is False


# --- sampling, eval and serving -----------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(temperature=0), "--temperature must be > 0 when sampling"),
    (dict(temperature=-1.0), "--temperature must be > 0"),
    (dict(top_p=0), r"--top-p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"--top-p must be in \(0, 1\]"),
    (dict(top_k=-1), "--top-k must be 0"),
    (dict(max_new_tokens=0), "--max-new-tokens must be at least 1"),
    (dict(repetition_penalty=0.0), "--repetition-penalty must be positive"),
    (dict(seed=-1), r"--seed must be in \[0, 2\*\*63\)"),
    (dict(stop=[""]), "--stop strings must not be empty"),
])
def test_bad_sampling_settings(settings, message):
    with pytest.raises(PenwrightError, match=message):
        SampleConfig(**settings)
    assert SampleConfig(temperature=0, greedy=True).greedy


def test_generate_takes_one_kind_of_prompt():
    with pytest.raises(PenwrightError, match="give --prompt or --prompt-file, not both"):
        GenerateConfig(model="runs/x", prompt="a", prompt_file="p.txt")


@pytest.mark.parametrize("settings, message", [
    (dict(data="held.txt"), "no model given"),
    (dict(model=["gpt2"], holdout_words=0), "--holdout-words must be at least 1"),
    (dict(model=["a", "a"]), "the same --model is given twice"),
    (dict(model=["a"], label="horror"), "drop --label"),
    (dict(model=["a"], top_p=2.0), r"--top-p must be in \(0, 1\]"),  # the sampling checks apply to eval too
    (dict(model=["a"], val_fraction=-0.5), r"--val-fraction must be in \[0, 1\)"),  # and the data checks
])
def test_bad_eval_settings(settings, message):
    with pytest.raises(PenwrightError, match=message):
        EvalConfig(**settings)


def test_serve_api_key_comes_from_the_environment_and_names_must_differ(monkeypatch):
    monkeypatch.setenv("PENWRIGHT_API_KEY", "from-env")
    assert ServeConfig().api_key == "from-env" and ServeConfig(api_key="flag").api_key == "flag"
    with pytest.raises(PenwrightError, match="both named 'a'"):
        ServeConfig(model=["runs/a", "other/a"])
    with pytest.raises(PenwrightError, match=r"--port must be in 0..65535"):
        ServeConfig(port=70000)
