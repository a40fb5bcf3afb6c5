"""Command line: ``fastdebias generate|debias|score|bench`` (also ``python -m fastdebias``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

from fastdebias.errors import FastDebiasError
from fastdebias.generate import check_text


def _adapter_arg(values: list[str] | None):
    """--adapter DIR or --adapter NAME=DIR, repeatable → what fastdebias.load takes."""
    if not values:
        return None
    if all("=" in v for v in values):
        named: dict[str, str] = {}
        for v in values:
            name, path = v.split("=", 1)
            if not name.strip():
                raise FastDebiasError(f"--adapter {v}: empty adapter name; write NAME=DIR, or DIR alone")
            if not path.strip():
                raise FastDebiasError(f"--adapter {v}: no directory after '='; write NAME=DIR")
            if name in named:  # a dict would keep the last one and silently drop the other
                raise FastDebiasError(
                    f"--adapter: the name {name!r} is given twice ({named[name]} and {path}); give each adapter "
                    "its own name"
                )
            named[name] = path
        return named
    if any("=" in v for v in values):
        raise FastDebiasError("--adapter: use either DIR or NAME=DIR for every adapter, not a mix")
    return values if len(values) > 1 else values[0]


def _add_model(p: argparse.ArgumentParser) -> None:
    """The inputs and the model: what every command but ``bench`` takes."""
    p.add_argument("texts", nargs="*", help="input texts (default: --file, else stdin, one per line)")
    p.add_argument("--file", "-f", help="read inputs from this file, one per line ('-' = stdin)")
    p.add_argument("--model", "-m", default=None, help="HF Llama-family model dir (default: embedded SmolLM2-135M)")
    p.add_argument("--adapter", "-a", action="append", metavar="[NAME=]DIR",
                   help="PEFT LoRA adapter dir; repeat for several")
    p.add_argument("--use-adapter", default=None, help="name of the loaded adapter to apply ('none' for none)")
    p.add_argument("--merge", action="store_true", help="merge the single adapter into the base weights")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _add_common(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    p.add_argument("--runtime", default="auto", choices=["auto", "eager", "cuda_graph", "compile"],
                   help="decode step: auto = CUDA graphs on GPU, eager on CPU; compile pays ~25-45 s once on CPU "
                        "(~5-10 s with a warm inductor cache) to decode ~2x faster at batch 1 "
                        "(for large --file jobs); on GPU, compile = CUDA graphs of the compiled forward")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--min-new-tokens", type=int, default=0, help="no EOS before this many tokens (0 = off)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="keep tokens at least this fraction as likely as the most likely one; 0.0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0, help="vLLM's, over generated tokens; 0.0 = off")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="vLLM's, over generated tokens; 0.0 = off")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                   help="transformers': no n-gram of this size twice in prompt + output; 0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", type=_unescape,
                   help=r"stop string; repeat for several (\n, \t, \r and \\ are read as escapes: --stop '\n\n')")
    p.add_argument("--lexicon", default=None, metavar="PATH|default|none",
                   help="bias lexicon (.jsonl/.csv/.txt); debias defaults to 'default', generate to 'none'")
    p.add_argument("--lexicon-mode", default="backtrack", choices=["backtrack", "hf"])
    p.add_argument("--json", action="store_true", help="print one JSON object per output (--n of them per input)")
    p.add_argument("--logprobs", action="store_true",
                   help="the model's log-probability of each output token (raw logits): a 'logprobs' list in --json, "
                        "else their sum and mean after each output")
    p.add_argument("--top-logprobs", type=int, default=0, metavar="N",
                   help="also the N (up to 20) most likely tokens at each position: a 'top_logprobs' list of "
                        "[[token, token_id, logprob], ...] per output token in --json (implies --logprobs)")
    p.add_argument("--prompt-logprobs", action="store_true",
                   help="each input token's log-probability given those before it: a 'prompt_logprobs' list of "
                        "[token, token_id, logprob] in --json (the first logprob null), else their sum")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                   help="prompt-lookup speculative decoding: guess K tokens per step by copying what followed the "
                        "last tokens earlier in the input or output, keep those decoding would choose anyway (the "
                        "same output, fewer forwards when the output copies its input: debias); 0 = off")
    p.add_argument("--n", type=int, default=1, metavar="N",
                   help="outputs per input (sampling: needs --temperature > 0); --json rows carry a 'sample' index")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdebias", description="Fast bias-mitigating LLM decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue each prompt", description="Generate a continuation per prompt.")
    _add_common(g)
    d = sub.add_parser("debias", help="rewrite each text without bias",
                       description="Rewrite each text without bias (SR-LLM prompt format, or the chat template).")
    _add_common(d)
    d.add_argument("--prompt-format", default="auto", choices=["auto", "srllm", "chat"])
    d.add_argument("--template", default=None, help="custom prompt template containing {text}")
    sc = sub.add_parser("score", help="log-likelihood of each text",
                        description="Each text's log-likelihood under the model (and adapter): the log-probability "
                                    "of each token given those before it, their sum and the perplexity; nothing "
                                    "is generated.")
    _add_model(sc)
    sc.add_argument("--json", action="store_true",
                    help="one JSON object per text: 'tokens' ([token, token_id, logprob]; without --context the "
                         "first logprob is null), 'logprob', 'perplexity' (null if nothing was scored or it "
                         "overflows), 'context_tokens'")
    sc.add_argument("--top-logprobs", type=int, default=0, metavar="N",
                    help="also the N (up to 20) most likely tokens at each position ('top_logprobs' in --json)")
    sc.add_argument("--context", type=_unescape, default=None, metavar="TEXT",
                    help=r"score each text as the continuation of this prompt (its tokens, with special tokens, "
                         r"then the text's, without); \n, \t, \r and \\ are read as escapes")
    from fastdebias.bench import add_arguments as add_bench_arguments

    b = sub.add_parser("bench", help="decode benchmark against transformers",
                       description="Head-to-head decode benchmark in one run: fastdebias vs transformers generate "
                                   "(eager, PEFT unmerged) and static cache + torch.compile (merged), same prompts, "
                                   "adapter and lexicon. Prints a markdown table; exits 1 if greedy outputs of "
                                   "fastdebias and transformers differ.")
    add_bench_arguments(b)
    return parser


def _check_utf8(texts: list[str], where: str, unit: str) -> None:
    """Refuse lone surrogates: bytes that are not UTF-8 on stdin or in argv, decoded with ``surrogateescape`` (as
    Python does under some locales), which the tokenizer cannot encode and would fail on with a traceback."""
    for n, text in enumerate(texts, start=1):
        check_text(text, f"{where}, {unit} {n}")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(value: str) -> str:
    """``--stop '\\n\\n'`` means two newlines, as a shell passes it (a backslash and an n, twice): ``\\n``, ``\\t``,
    ``\\r`` and ``\\\\`` are read as escapes; any other backslash stays as it is."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value) and value[i + 1] in _ESCAPES:
            out.append(_ESCAPES[value[i + 1]])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _token_text(tok, token_id: int) -> str | None:
    """The text of one token (special tokens included), or None without a tokenizer."""
    return tok.decode([token_id]) if tok is not None else None


def _read_inputs(args) -> list[str]:
    if args.texts and args.file:
        raise FastDebiasError("give the texts as arguments or with --file, not both (--file would be left unread)")
    if args.texts:
        _check_utf8(args.texts, "input texts", "argument")
        return list(args.texts)
    if args.file and args.file != "-":
        try:
            # utf-8-sig: a byte-order mark (Notepad writes one) is not part of the first text
            with open(args.file, encoding="utf-8-sig") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise FastDebiasError(
                f"--file {args.file}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
            ) from None
        except OSError as e:
            raise FastDebiasError(f"--file {args.file}: cannot read it ({e.strerror})") from e
    elif args.file == "-" or not sys.stdin.isatty():
        try:
            lines = sys.stdin.read().splitlines()
        except UnicodeDecodeError as e:  # a strict stdin encoding; other locales give lone surrogates (below)
            raise FastDebiasError(
                f"stdin: not {e.encoding} text ({e.reason} at byte {e.start}); pipe in UTF-8 text"
            ) from None
        _check_utf8(lines, "stdin", "line")
    else:
        raise FastDebiasError("no input: give texts as arguments, --file PATH, or pipe them on stdin")
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise FastDebiasError("no input: the file/stdin held no non-empty lines")
    return lines


def _bench(args) -> int:
    from fastdebias import bench

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"fastdebias bench: {msg}", file=sys.stderr)

    def checkpoint(partial: dict) -> None:  # a run cut short (a time limit) still leaves its points on disk
        bench.write_outputs(partial, json_path=args.json_path, md_path=args.md_path, out_dir=args.out_dir,
                            with_plot=False)

    try:
        cfg = bench.config_from_args(args).resolve()  # bad arguments are reported before any directory is made
        bench.check_output_paths(json_path=args.json_path, md_path=args.md_path, plot_path=args.plot_path,
                                 out_dir=args.out_dir)
        result = bench.run(cfg, log=log, checkpoint=checkpoint)
    except FastDebiasError as e:
        print(f"fastdebias: error: {e}", file=sys.stderr)
        return 2
    print(bench.format_markdown(result))
    if not any(p["status"] == "ok" for p in result["points"]):
        # nothing measured: no files either (an empty table would overwrite earlier results under --out)
        info = result["systems"]
        culprit = next((n for n, i in info.items() if i["status"] == "failed"), None) or next(
            (n for n, i in info.items() if i["reason"]), None)
        why = f"{culprit}: {' '.join(str(info[culprit]['reason']).split())}" if culprit else "nothing was planned"
        print(f"fastdebias: error: no system could be measured ({why}); nothing written", file=sys.stderr)
        return 1
    for line in bench.mismatch_lines(result):
        print(line)
        print(line, file=sys.stderr)
    for path in bench.write_outputs(result, json_path=args.json_path, md_path=args.md_path,
                                    plot_path=args.plot_path, out_dir=args.out_dir):
        log(f"wrote {path}")
    return 1 if result["mismatches"] else 0


def _use_adapter(args) -> dict:
    """``--use-adapter NAME|none`` → the ``adapter=`` keyword (none given: the library's default)."""
    if args.use_adapter is None:
        return {}
    return {"adapter": None if args.use_adapter.lower() == "none" else args.use_adapter}


def _token_rows(tok, ids: list[int], lps: list) -> list[list]:
    """[token text, id, logprob] per token (text None without a tokenizer)."""
    return [[_token_text(tok, i), i, lp] for i, lp in zip(ids, lps)]


def _top_rows(tok, tops: list) -> list:
    """Top log-probabilities per position → [[token text, id, logprob], ...] per position (None stays None)."""
    return [None if pos is None else [[_token_text(tok, i), i, lp] for i, lp in pos] for pos in tops]


def _print_scores(tok, inputs: list[str], scores, as_json: bool) -> None:
    for text, s in zip(inputs, scores):
        n = sum(x is not None for x in s.logprobs)
        if as_json:
            row = {"input": text, "tokens": _token_rows(tok, s.token_ids, s.logprobs), "logprob": s.total,
                   "perplexity": None if not math.isfinite(s.perplexity) else s.perplexity,
                   "context_tokens": s.context_tokens}  # fmt: skip
            if s.top_logprobs is not None:
                row["top_logprobs"] = _top_rows(tok, s.top_logprobs)
            print(json.dumps(row, ensure_ascii=False))
        else:
            ppl = f", perplexity {s.perplexity:.3f}" if n else ""
            print(f"> {text}\n  [logprob {s.total:.3f} over {n} token{'s' if n != 1 else ''}{ppl}]")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    import fastdebias

    try:
        adapter = _adapter_arg(args.adapter)  # before reading stdin: a usage error should not wait for input
        inputs = _read_inputs(args)
        model = fastdebias.load(args.model, adapter, dtype=args.dtype, device=args.device,
                                merge=args.merge, backend=args.backend, runtime=getattr(args, "runtime", "auto"),
                                progress=not args.quiet)
        if args.command == "score":
            scores = fastdebias.score(model, inputs, context=args.context, top_logprobs=args.top_logprobs,
                                      batch_size=args.batch_size, progress=None if not args.quiet else False,
                                      **_use_adapter(args))  # fmt: skip
            _print_scores(model.tokenizer, inputs, scores, args.json)
            return 0
        kwargs = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                      repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                      frequency_penalty=args.frequency_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                      seed=args.seed,
                      stop=args.stop, batch_size=args.batch_size, progress=None if not args.quiet else False,
                      logprobs=args.logprobs, top_logprobs=args.top_logprobs, n=args.n,
                      prompt_logprobs=args.prompt_logprobs, prompt_lookup_tokens=args.prompt_lookup)
        lexicon = args.lexicon if args.lexicon is not None else ("default" if args.command == "debias" else None)
        kwargs.update(lexicon=None if str(lexicon).lower() == "none" else lexicon, lexicon_mode=args.lexicon_mode)
        kwargs.update(_use_adapter(args))
        if args.command == "debias":
            outs = fastdebias.debias(model, inputs, prompt_format=args.prompt_format, template=args.template, **kwargs)
        else:
            outs = fastdebias.generate(model, inputs, **kwargs)
    except FastDebiasError as e:
        print(f"fastdebias: error: {e}", file=sys.stderr)
        return 2
    tok = model.tokenizer
    for k, out in enumerate(outs):
        text = inputs[k // args.n]
        interventions = [dict(step=i.step, phrase=i.phrase, category=i.category, action=i.action,
                              token_id=i.token_id) for i in out.interventions]
        if args.json:
            row = {"input": text, "output": out.text, "finish_reason": out.finish_reason, "token_ids": out.token_ids,
                   "interventions": interventions}
            if args.n > 1:
                row["sample"] = k % args.n
            if out.logprobs is not None:
                row["logprobs"] = out.logprobs
            if out.top_logprobs is not None:
                row["top_logprobs"] = _top_rows(tok, out.top_logprobs)
            if out.prompt_logprobs is not None:
                row["prompt_logprobs"] = _token_rows(tok, out.prompt_token_ids, out.prompt_logprobs)
            if out.prompt_top_logprobs is not None:
                row["prompt_top_logprobs"] = _top_rows(tok, out.prompt_top_logprobs)
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"> {text}" + (f" [{k % args.n + 1}/{args.n}]" if args.n > 1 else "") + f"\n{out.text}")
            for i in interventions:
                print(f"  [{i['action']} at step {i['step']}: {i['phrase']!r} ({i['category']})]")
            if out.logprobs:
                total = sum(out.logprobs)
                print(f"  [logprob {total:.2f}, mean {total / len(out.logprobs):.3f} over {len(out.logprobs)} tokens]")
            if out.prompt_logprobs is not None:
                scored = out.prompt_logprobs[1:]
                print(f"  [input logprob {sum(scored):.2f} over {len(scored)} tokens]")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
