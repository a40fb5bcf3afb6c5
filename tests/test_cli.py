"""The `fastdebias` command line: subcommands, inputs from args/file/stdin, --json, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import fastdebias
from fastdebias.cli import main


def test_generate_json_matches_api(llama_dir, capsys):
    assert main(["generate", "--model", str(llama_dir), "--max-new-tokens", "5", "--json", "-q", "Old people"]) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    ref = fastdebias.generate(fastdebias.load(llama_dir, progress=False), ["Old people"], max_new_tokens=5)[0]
    assert rec["input"] == "Old people" and rec["output"] == ref.text and rec["token_ids"] == ref.token_ids


def test_debias_from_file_with_adapter(llama_dir, adapter_qv, tmp_path, capsys):
    f = tmp_path / "in.txt"
    f.write_text("Old people\n\nWomen and men\n")
    argv = ["debias", "--model", str(llama_dir), "--adapter", f"sr={adapter_qv}", "--file", str(f),
            "--max-new-tokens", "4", "--json", "-q"]
    assert main(argv) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["input"] for r in recs] == ["Old people", "Women and men"]


def test_errors_exit_2_with_message(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "-q", "hi"]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_module_entry_point_and_stdin(llama_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "fastdebias", "generate", "--model", str(llama_dir), "--max-new-tokens", "3", "-q",
         "--json"], input="Old people\n", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["input"] == "Old people"
    helped = subprocess.run([sys.executable, "-m", "fastdebias", "debias", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--prompt-format" in helped.stdout


def test_runtime_flag(llama_dir, capsys, monkeypatch):
    import torch

    if not torch.cuda.is_available():
        assert main(["generate", "--model", str(llama_dir), "--runtime", "cuda_graph", "-q", "hi"]) == 2
        assert "runtime='cuda_graph' needs a CUDA device" in capsys.readouterr().err
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the static step, run eagerly (tests/test_runtime.py)
    argv = ["generate", "--model", str(llama_dir), "--max-new-tokens", "5", "--json", "-q", "Old people"]
    assert main(argv + ["--runtime", "compile"]) == 0
    static = json.loads(capsys.readouterr().out.strip())
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip())["token_ids"] == static["token_ids"]


def test_sampling_flags_reach_generate(llama_dir, capsys):
    """--temperature/--seed/--min-p/--presence-penalty/--frequency-penalty are generate's arguments: min-p 1.0 keeps
    the top token alone (the greedy output, however hot); a bad value exits 2 naming it."""
    base = ["generate", "--model", str(llama_dir), "--max-new-tokens", "6", "--json", "-q", "Old people"]
    assert main(base) == 0
    greedy = json.loads(capsys.readouterr().out.strip())["token_ids"]
    assert main([*base, "--temperature", "5", "--seed", "1", "--min-p", "1.0"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["token_ids"] == greedy
    assert main([*base, "--temperature", "5", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["token_ids"] != greedy
    assert main([*base, "--min-p", "1.5"]) == 2
    assert "min_p must be in [0, 1]" in capsys.readouterr().err
    # vLLM's penalties: negative ones reward repeats and change the greedy output; out of [-2, 2] is named
    assert main([*base, "--frequency-penalty", "-2", "--presence-penalty", "-2"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["token_ids"] != greedy
    assert main([*base, "--presence-penalty", "3"]) == 2
    assert "presence_penalty must be a number in [-2, 2]" in capsys.readouterr().err


def test_min_new_tokens_flag(llama_dir, capsys, monkeypatch):
    """--min-new-tokens reaches generate (whose behaviour tests/test_generate.py checks); out of range exits 2
    naming it."""
    import fastdebias

    seen, real = [], fastdebias.generate
    monkeypatch.setattr(fastdebias, "generate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    base = ["generate", "--model", str(llama_dir), "--max-new-tokens", "8", "--json", "-q", "Old people"]
    assert main([*base, "--min-new-tokens", "5"]) == 0
    assert seen[-1]["min_new_tokens"] == 5 and len(json.loads(capsys.readouterr().out)["token_ids"]) >= 5
    assert main([*base, "--min-new-tokens", "9"]) == 2
    assert "min_new_tokens must be an integer from 0 to max_new_tokens=8" in capsys.readouterr().err


def test_stop_escapes_and_file_with_arguments(llama_dir, tmp_path, capsys, monkeypatch):
    r"""--stop '\n' is a newline, as the README's example writes it (the shell passes a backslash and an n); texts
    given both as arguments and with --file are refused rather than --file left unread."""
    from fastdebias.cli import _unescape

    assert _unescape(r"\n\n") == "\n\n" and _unescape(r"a\tb\r") == "a\tb\r" and _unescape(r"x\\n") == r"x\n"
    assert _unescape(r"\q C:\dir") == r"\q C:\dir"  # other backslashes stay
    seen = {}
    real = fastdebias.generate

    def spy(model, prompts, **kw):
        seen.update(kw)
        return real(model, prompts, **kw)

    monkeypatch.setattr(fastdebias, "generate", spy)
    argv = ["generate", "--model", str(llama_dir), "--max-new-tokens", "3", "-q", "--stop", r"\n", "--stop", "x"]
    assert main([*argv, "Old people"]) == 0
    assert seen["stop"] == ["\n", "x"]
    capsys.readouterr()
    f = tmp_path / "in.txt"
    f.write_text("Old people\n")
    assert main(["debias", "--model", str(llama_dir), "--file", str(f), "-q", "extra"]) == 2
    assert "not both" in capsys.readouterr().err
