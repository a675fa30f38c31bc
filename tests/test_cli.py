"""The command line: bad input gets one clear line and exit 2; commands do what --help says."""

import json
import os
import subprocess
import sys

import pytest

from conftest import one_error_line
from penwright.cli import main


def run_cli(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "penwright", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env=env, timeout=300)


@pytest.mark.parametrize("argv, expected", [
    (["train", "--data", "missing.txt", "--out", "x"], "missing.txt: no such file or folder"),
    (["train", "--data", "{empty}", "--init", "scratch", "--out", "x"], "the corpus is empty"),
    (["train", "--data", "{latin}", "--init", "scratch", "--out", "x"],
     "not valid utf-8 at byte 3; pass the file's encoding"),
    (["train", "--data", "{csv}", "--init", "scratch", "--label-column", "genre", "--out", "x"],
     "no column 'text'; it has: plot, tag"),
    (["train", "--data", "{csv}", "--text-column", "plot", "--model", "gpt2", "--out", "x"],
     "'gpt2' is not in the local cache"),
    (["prepare", "--data", "{empty}", "--model", "gpt2"], "the corpus is empty"),  # the corpus before the hub
    (["train", "--data", "{csv}", "--out", "x", "--early-stop", "3", "--eval-every", "0"],
     "--early-stop compares periodic evaluations, and --eval-every is 0: give --eval-every N"),
    (["train", "--data", "{csv}", "--out", "x", "--log", "wandb"], "--log 'wandb': unknown backend"),
    (["train", "--data", "{csv}", "--out", "x", "--tokens-per-step", "100", "--block-size", "128"],
     "--tokens-per-step 100 is smaller than one block of 128 tokens"),
    (["train", "--data", "{csv}", "--out", "x", "--batch-size", "lots"], "--batch-size must be a whole number or auto"),
    (["train", "--data", "{csv}", "--model", "gpt2", "--out", "x"], "no column 'text'"),
    (["generate", "--model", "x", "--temperature", "0"], "--temperature must be > 0 when sampling"),
    (["generate", "--model", "x", "--top-p", "1.5"], r"--top-p must be in (0, 1]"),
    (["generate", "--prompt", "hi"], "no model given: pass --model"),
    (["generate", "--model", "no/such/dir"], "no/such/dir: no such folder"),
    (["generate", "--model", "runs/does-not-exist"], "runs/does-not-exist: no such folder"),  # runs/ exists
    (["generate", "--model", "runs/bok"], "runs/bok: no such folder; did you mean runs/book?"),
    (["generate", "--model", "./missing"], "./missing: no such folder"),
    (["generate", "--model", "~/no-such-penwright-model"], "~/no-such-penwright-model: no such folder"),
    (["generate", "--model", "empty.txt"], "empty.txt: not a model directory or .gguf file"),
    (["generate", "--model", "someone/model-x"], "'someone/model-x' is not in the local cache"),  # a hub id
    (["generate", "--model", "nonexistent-model-xyz"],
     "not in the local cache and the Hugging Face hub is unreachable"),
])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (tmp_path / "plots.csv").write_text("plot,tag\nSomething happens,x\n")
    (tmp_path / "runs" / "book").mkdir(parents=True)
    names = {"{empty}": "empty.txt", "{latin}": "latin.txt", "{csv}": "plots.csv"}
    line = one_error_line(capsys, *[names.get(a, a) for a in argv])
    assert expected in line
    assert not (tmp_path / "x").exists(), "nothing half-written"


def test_out_dir_holding_another_run_is_refused_without_traceback(tiny_run):
    result = run_cli("train", "--data", "whatever.txt", "--out", tiny_run)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "already holds a run: add --resume" in result.stderr


def test_generate_writes_jsonl_and_same_seed_gives_same_text(tiny_run, tmp_path):
    out = tmp_path / "samples.jsonl"
    args = ["generate", "--model", tiny_run, "--label", "horror", "--num-samples", "3", "--seed", "4",
            "--max-new-tokens", "16", "--precision", "fp32"]
    first = run_cli(*args, "--output", out)
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["label"] == "horror" and r["seed"] == 4 for r in rows)
    assert first.stdout.count("===== sample") == 3
    assert run_cli(*args).stdout == first.stdout


def test_interactive_streams_a_continuation_per_prompt(tiny_run):
    result = run_cli("interactive", "--model", tiny_run, "--max-new-tokens", "12", "--seed", "1",
                     stdin="The ship\n\nA door\n")
    assert result.returncode == 0, result.stderr
    answers = result.stdout.split("prompt> ")
    assert answers[2] == "", "an empty line asks again"
    assert answers[1].startswith("The ship") and answers[3].startswith("A door")
    assert len(answers[1].strip()) > len("The ship") and len(answers) == 5


def test_help_lists_commands_and_examples():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    assert "--block-size" in result.stdout and "examples:" in result.stdout and "--resume" in result.stdout


def test_prepare_prints_corpus_statistics_and_reuses_the_cache(stories_csv, tmp_path, capsys):
    argv = ["prepare", "--data", str(stories_csv), "--text-column", "synopsis", "--label-column", "genre",
            "--init", "scratch", "--vocab-size", "400", "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    first = capsys.readouterr()
    stats = dict(line.strip().split(": ", 1) for line in first.out.splitlines())
    assert stats["documents"] == "192" and stats["files"] == "1"
    assert int(stats["train tokens"].replace(",", "")) + int(stats["val tokens"].replace(",", "")) == \
        int(stats["tokens"].replace(",", ""))
    assert "horror 32" in stats["labels"] and "tokenized into" in first.err
    assert main(argv) == 0
    second = capsys.readouterr()
    assert "found in cache" in second.err and second.out == first.out


def test_a_value_outside_a_flags_choices_names_them(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--data", "x.txt", "--init", "scratch", "--preset", "huge", "--out", "x"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--preset: invalid choice: 'huge'" in err and "medium" in err


def test_a_closed_pipe_ends_generate_quietly(tiny_run):
    """`penwright generate ... | head -c 10`: the reader leaves before the text comes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "penwright", "generate", "--model", str(tiny_run), "--prompt",
                             "The ship", "--max-new-tokens", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err  # as a shell reports a tool that SIGPIPE ended
    assert "Error" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("output, expected", [
    ("/nonexistent/dir/x.jsonl", "--output /nonexistent/dir/x.jsonl: there is no folder /nonexistent/dir"),
    ("out.txt", "--output out.txt: samples are written as JSON lines"),
])
def test_output_is_checked_before_writing(tiny_run, tmp_path, monkeypatch, capsys, output, expected):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(capsys, "generate", "--model", tiny_run, "--output", output)
    assert expected in line and not list(tmp_path.iterdir())


def test_a_streamed_sample_records_why_and_after_how_many_tokens_it_stopped(tiny_run, tmp_path, capsys):
    out = tmp_path / "one.jsonl"
    assert main(["generate", "--model", str(tiny_run), "--prompt", "The ship", "--stop", "e", "--seed", "1",
                 "--max-new-tokens", "60", "--output", str(out)]) == 0
    printed, err = capsys.readouterr()
    row = json.loads(out.read_text())
    assert row["finish_reason"] == "stop" and row["new_tokens"] >= 1 and "e" not in row["text"], row
    assert printed == "The ship" + row["text"] + "\n"
    assert f"wrote 1 sample to {out}" in err


def test_a_misspelled_flag_gets_a_suggestion_and_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--model", "x", "--temprature", "0.5"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: penwright generate") and "--max-new-tokens" in err
    assert err.strip().endswith("unrecognized arguments: --temprature 0.5; did you mean --temperature?"), err


def test_ctrl_c_in_interactive_stops_the_writing_and_at_the_prompt_quits(tiny_run):
    import signal
    import threading
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # A job a non-interactive shell started with `&` (CI scripts do) inherits SIGINT ignored, and so would
    # this child: give it the default disposition a terminal's foreground process has.
    proc = subprocess.Popen([sys.executable, "-m", "penwright", "interactive", "--model", str(tiny_run),
                             "--num-samples", "100000", "--max-new-tokens", "8"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, said = [], []  # both pipes are drained as they fill, so the child never blocks on a write
    readers = [threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True),
               threading.Thread(target=lambda: said.extend(iter(proc.stderr.readline, "")), daemon=True)]
    for reader in readers:
        reader.start()

    def wait_for(text: str, count: int = 1) -> None:
        deadline = time.monotonic() + 300
        while "".join(seen).count(text) < count:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-500:] + "".join(said)
            time.sleep(0.05)

    try:
        for n, prompt in enumerate(["The ship", "A door"], 1):
            proc.stdin.write(prompt + "\n")
            proc.stdin.flush()
            wait_for("===== sample 3 =====", n)  # writing the first prompt's samples
            proc.send_signal(signal.SIGINT)
            wait_for("prompt> ", n + 1)  # back at the prompt, and it takes the next one
        proc.send_signal(signal.SIGINT)  # at the prompt: quit
        assert proc.wait(timeout=180) == 130, "".join(said)
    finally:
        proc.kill()
    for reader in readers:  # the pipes' last bytes
        reader.join(timeout=30)
    text = "".join(seen)
    assert text.count("===== sample 1 =====") == 2 and "===== sample 100000" not in text
    assert "".join(said).count("[stopped]") == 2
