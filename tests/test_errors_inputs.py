"""Bad inputs at the edges, from an input audit: undecodable CLI input, lexicon construction, lexicon files and
``Lexicon.compile`` arguments, ``--adapter`` names, ``fastdebias bench`` arguments and output paths. Each must be a
``FastDebiasError`` (CLI: exit 2 and one line) naming the argument or file, never a raw traceback."""

from __future__ import annotations

import argparse
import io
import sys

import pytest
import torch

from fastdebias import bench
from fastdebias.cli import _read_inputs, main
from fastdebias.errors import BackendError, LexiconError
from fastdebias.lexicon import Lexicon

from .conftest import make_adapter, make_llama

# -- CLI inputs -----------------------------------------------------------------------------------------------


def test_file_not_utf8_exits_2_naming_it(tmp_path, capsys):
    f = tmp_path / "in.txt"
    f.write_bytes(b"fine\n\xff\n")
    assert main(["generate", "--model", str(tmp_path / "missing"), "-q", "--file", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"--file {f}: not UTF-8 text" in err and "save it as UTF-8" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_file_byte_order_mark_is_not_part_of_the_first_text(tmp_path):
    f = tmp_path / "in.txt"
    f.write_bytes("\ufeffOld people\nWomen\n".encode())
    assert _read_inputs(argparse.Namespace(texts=[], file=str(f))) == ["Old people", "Women"]


def test_stdin_lone_surrogates_exit_2_naming_the_line(tmp_path, capsys, monkeypatch):
    # what bytes that are not UTF-8 become on stdin under a surrogateescape locale
    monkeypatch.setattr(sys, "stdin", io.StringIO("fine\n\nbad \udcff here\n"))
    assert main(["generate", "--model", str(tmp_path / "missing"), "-q", "--file", "-"]) == 2
    err = capsys.readouterr().err
    assert "stdin, line 3 holds a character that is not valid Unicode text" in err and "Traceback" not in err


def test_argument_lone_surrogates_exit_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "-q", "ok", "bad \udcff"]) == 2
    assert "input texts, argument 2 holds a character that is not valid Unicode text" in capsys.readouterr().err


@pytest.mark.parametrize(
    "adapters, message",
    [
        (["a=/x/one", "a=/x/two"], "the name 'a' is given twice (/x/one and /x/two)"),
        (["=/x/one"], "--adapter =/x/one: empty adapter name"),
        (["a="], "--adapter a=: no directory after '='"),
    ],
)
def test_adapter_names_checked(tmp_path, capsys, adapters, message):
    argv = ["generate", "--model", str(tmp_path / "missing"), "-q", "hi"]
    for a in adapters:
        argv += ["--adapter", a]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# -- Lexicon.from_phrases / load --------------------------------------------------------------------------------


def test_from_phrases_refuses_a_bare_string():
    with pytest.raises(LexiconError, match=r"items='oldpeople' is a single str; pass a list of phrases"):
        Lexicon.from_phrases("oldpeople")


@pytest.mark.parametrize("items", [None, 5])
def test_from_phrases_refuses_non_iterables(items):
    with pytest.raises(LexiconError, match=rf"from_phrases: items={items!r} .*pass a list of phrases"):
        Lexicon.from_phrases(items)


def test_from_phrases_mapping_keeps_the_actions():
    lex = Lexicon.from_phrases({"bossy": -5.0, "old people": "ban"}, category="c")
    assert [(e.phrase, e.action, e.category) for e in lex] == [("bossy", -5.0, "c"), ("old people", "ban", "c")]
    # the values follow the tuple form's action rules
    assert lex.entries == Lexicon.from_phrases([("bossy", -5.0, "c"), ("old people", "ban", "c")]).entries
    with pytest.raises(LexiconError, match=r"from_phrases item 0: phrase 'x': action 'lots' is not 'ban'"):
        Lexicon.from_phrases({"x": "lots"})


@pytest.mark.parametrize("path", [5, None])
def test_load_needs_a_path(path):
    with pytest.raises(LexiconError, match=rf"Lexicon.load: path={path!r} .*give the path of a .jsonl, .csv"):
        Lexicon.load(path)


def test_lone_surrogates_in_entries_name_the_entry(tmp_path):
    with pytest.raises(LexiconError, match=r"from_phrases item 1: phrase 'old \\udcff' holds a character that is"):
        Lexicon.from_phrases(["fine", "old \udcff"])
    with pytest.raises(LexiconError, match=r"phrase 'x': category 'a\\udcff' holds a character"):
        Lexicon.from_phrases([("x", "ban", "a\udcff")])


@pytest.mark.parametrize("name", ["lex.csv", "lex.jsonl", "lex.txt"])
def test_byte_order_mark_accepted(tmp_path, name):
    body = {"lex.csv": "phrase,action\nold people,-2\n", "lex.jsonl": '{"phrase": "old people", "action": -2}\n',
            "lex.txt": "old people\n"}[name]
    f = tmp_path / name
    f.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [e.phrase for e in Lexicon.load(f)] == ["old people"]


@pytest.mark.parametrize("name", ["lex.csv", "lex.jsonl", "lex.txt"])
def test_lexicon_file_not_utf8(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"phrase\n\xff\n" if name != "lex.jsonl" else b'{"phrase": "\xff"}\n')
    with pytest.raises(LexiconError, match=rf"{name}: not UTF-8 text .*save it as UTF-8"):
        Lexicon.load(f)


def test_csv_duplicate_column(tmp_path):
    f = tmp_path / "dup.csv"
    f.write_text("phrase,action,Phrase\nx,ban,y\n")
    with pytest.raises(LexiconError, match=r"dup.csv, line 1: .*names the column 'phrase' twice"):
        Lexicon.load(f)


def test_csv_unclosed_quote(tmp_path):
    """Read without strict, the rest of the file became one phrase, 'x,bany,ban'."""
    f = tmp_path / "q.csv"
    f.write_text('phrase,action\n"x,ban\ny,ban\n')
    with pytest.raises(LexiconError, match=r"q.csv, line 2: not valid CSV \(unexpected end of data\)"):
        Lexicon.load(f)


# -- Lexicon.compile ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eos", ["abc", True, 2.0, [2, "3"], torch.tensor([2.0]), [10], -1])
def test_compile_eos_token_id_checked(eos):
    with pytest.raises(LexiconError, match=r"eos_token_id"):
        Lexicon.from_token_sequences([[1]]).compile(vocab_size=10, eos_token_id=eos)


def test_compile_eos_token_id_forms_accepted():
    lex = Lexicon.from_token_sequences([[1]])
    for eos in (2, [2, 3], (), torch.tensor([2, 3])):
        lex.compile(vocab_size=10, eos_token_id=eos)


def test_compile_device_checked():
    lex = Lexicon.from_token_sequences([[1]])
    with pytest.raises(BackendError, match=r"device='bogus' is not a valid torch device"):
        lex.compile(vocab_size=10, device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match=r"device='cuda' requested but CUDA is not available"):
            lex.compile(vocab_size=10, device="cuda")


# -- fastdebias bench ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lexicon-size", ""], "argument --lexicon-size: no integer given"),
        (["--lexicon-size", ","], "argument --lexicon-size: no integer given"),
        (["--lexicon-size", "1,2"], "argument --lexicon-size: expected one integer"),
        (["--lexicon-sizes", ","], "argument --lexicon-sizes: no integer given"),
        (["--systems", ","], "argument --systems: no system named"),
    ],
)
def test_bench_bad_lists_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "-q", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--json", "--md", "--plot"])
def test_bench_output_paths_checked_before_the_run(tmp_path, capsys, monkeypatch, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / "sub" if flag == "--out" else blocker / "sub" / "r.out"  # under a file: never creatable
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the benchmark ran before the path check"))
    assert main(["bench", "--quick", "--device", "cpu", "-q", flag, str(target)]) == 2
    assert f"{flag} {target}: cannot write there" in capsys.readouterr().err
    assert main(["bench", "--quick", "--device", "cpu", "-q", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_bench_check_output_paths_creates_directories(tmp_path):
    bench.check_output_paths(out_dir=tmp_path / "o" / "p", json_path=tmp_path / "j" / "r.json")
    assert (tmp_path / "o" / "p").is_dir() and (tmp_path / "j").is_dir()
    assert not list((tmp_path / "o" / "p").iterdir()) and not (tmp_path / "j" / "r.json").exists()


def test_bench_exits_1_when_no_system_loads(llama_dir, tmp_path, capsys, monkeypatch):
    big = make_llama(tmp_path / "big", hidden_size=128)
    adapter = make_adapter(big, tmp_path / "big-lora")  # built for hidden size 128; llama_dir has 64
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda dev: 1.0)
    out = tmp_path / "results"
    argv = ["bench", "--model", str(llama_dir), "--adapter", str(adapter), "--device", "cpu", "-q",
            "--batch-sizes", "1", "--lexicon-sizes", "0", "--lexicon-size", "0", "--new-tokens", "2", "--reps", "1",
            "--systems", "fastdebias,hf-eager", "--out", str(out)]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastdebias: error:")]
    assert len(err) == 1
    assert "no system could be measured (fastdebias: load: AdapterError:" in err[0] and "nothing written" in err[0]
    assert not list(out.iterdir())
