"""The generate and chat jobs end to end, through the `litquant` CLI and the script."""

import re
import shutil

import pytest
import yaml
from conftest import run_cli, run_script

from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR


def _timing_lines(stderr: str):
    return re.findall(r"Time for inference (\d+): ([\d.]+) sec total, ([\d.]+) tokens/sec", stderr)


def test_generate_cli_and_script_run_the_same_function(tiny_checkpoint):
    args = [
        "--checkpoint_dir",
        str(tiny_checkpoint),
        "--prompt",
        "The function",
        "--max_new_tokens",
        "12",
        "--temperature",
        "0",
        "--num_samples",
        "2",
    ]
    cli = run_cli("generate", *args)
    assert cli.returncode == 0, cli.stderr
    script = run_script("generate/base.py", *args)
    assert script.returncode == 0, script.stderr
    assert cli.stdout == script.stdout  # greedy: same text from both entry points
    assert cli.stdout.startswith("The function") and cli.stdout.count("The function") >= 2
    assert len(cli.stdout) > 2 * len("The function\n")  # and text was generated after the prompt
    timings = _timing_lines(cli.stderr)
    assert [t[0] for t in timings] == ["1", "2"] and all(float(t[2]) > 0 for t in timings)
    assert re.search(r"Memory used: \d+\.\d\d GB", cli.stderr)
    assert "Weights: " in cli.stderr


def test_chat_reads_stdin_and_streams_replies(tiny_checkpoint):
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "litquant.cli",
            "chat",
            "--checkpoint_dir",
            str(tiny_checkpoint),
            "--max_new_tokens",
            "8",
            "--temperature",
            "0",
        ],
        input="What is a list?\nAnd a tuple?\n\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(">> Reply: ") == 2
    assert len(re.findall(r"Time for inference: [\d.]+ sec total", proc.stderr)) == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint_dir", "/no/such/dir"], "checkpoint directory '/no/such/dir' does not exist"),
        (["--precision", "fp8"], "unknown --precision 'fp8'"),
        (["--quantize", "int3"], "unknown --quantize 'int3'; choose one of:"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
        (["--max_new_tokens", "100000"], "exceeds the model's context"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--lora_path", "/no/such/adapter"], "LoRA adapter '/no/such/adapter' does not exist"),
    ],
)
def test_bad_input_is_one_line_and_nonzero_exit(tiny_checkpoint, args, message):
    if "--checkpoint_dir" not in args:
        args = ["--checkpoint_dir", str(tiny_checkpoint), *args]
    out = run_cli("generate", *args)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
        (["--top_p", "2"], "--top_p must be in (0, 1]"),
        (["--prompt_style", "nope"], "nope"),
    ],
)
def test_chat_bad_input_is_one_line_and_nonzero_exit(tiny_checkpoint, args, message):
    out = run_cli("chat", "--checkpoint_dir", str(tiny_checkpoint), *args)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr


def test_bad_checkpoint_contents_are_one_line_errors(tmp_path, tiny_checkpoint):
    d = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, d)
    cfg = yaml.safe_load((d / "model_config.yaml").read_text())
    cfg["n_embd"] = 256
    (d / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    out = run_cli("generate", "--checkpoint_dir", str(d))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "does not match the weights" in out.stderr
    (d / "lit_model.safetensors").unlink()
    out = run_cli("generate", "--checkpoint_dir", str(d))
    assert (
        out.returncode == 1 and "has no lit_model.safetensors" in out.stderr and "Traceback" not in out.stderr
    )


def test_unknown_model_name_is_one_line_error(tmp_path):
    out = run_cli("pretrain", "--model_name", "Llama-9", "--out_dir", str(tmp_path / "x"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "unknown model name 'Llama-9'" in out.stderr


BUNDLED = pytest.mark.skipif(
    not (DEFAULT_CHECKPOINT_DIR / "lit_model.safetensors").is_file(), reason="bundled model missing"
)


@BUNDLED
def test_bundled_model_is_the_default():
    out = run_cli("generate", "--prompt", "def fib(", "--max_new_tokens", "40")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def fib(") and len(out.stdout) > len("def fib(") + 20
    assert _timing_lines(out.stderr)


@BUNDLED
def test_bundled_model_learned_its_corpus():
    """Held-out perplexity far below a uniform guess (vocab size) and below an untrained model's."""
    import torch

    from litquant.checkpoint import build_model, load_model
    from litquant.data.corpus import heldout_text
    from litquant.evaluation import perplexity
    from litquant.precision import resolve
    from litquant.tokenizer import Tokenizer

    model = load_model(DEFAULT_CHECKPOINT_DIR, resolve("32-true"), progress=False)
    tokens = Tokenizer(DEFAULT_CHECKPOINT_DIR).encode(heldout_text(), bos=False)
    trained = perplexity(model, tokens, window=256, max_windows=40)["perplexity"]
    torch.manual_seed(0)
    untrained = build_model(model.config, "cpu")
    untrained.init_weights()
    baseline = perplexity(untrained.eval(), tokens, window=256, max_windows=40)["perplexity"]
    assert trained < 80 < 0.25 * model.config.vocab_size < baseline
