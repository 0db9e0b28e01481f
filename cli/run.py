"""`qmoefmt run`: greedy generation with the bundled model straight from its store."""
from __future__ import annotations

import json

import click


@click.command()
@click.argument("store", type=click.Path(exists=True))
@click.option("--prompt", required=True, help="The text to continue (UTF-8 bytes are tokens).")
@click.option("--tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Bytes to generate; the prompt and these must fit the model's context.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for torch and the Numba expert kernels  [default: theirs]")
@click.option("--json", "as_json", is_flag=True,
              help="Print {text, tokens, prefill_tokens_per_s, decode_tokens_per_s, ...}.")
def run(store, prompt, tokens, threads, as_json):
    """Continue --prompt with the bundled MoE model (qmoefmt.demo) run from STORE, its
    experts multiplied straight from their codes; greedy, so the output is deterministic.
    Prints the text and the rates of the prefill (the prompt's one forward pass) and of
    the decode (one cached step a token), measured after a warm-up token."""
    # Imported here, not at the top: main.py imports this module at its end to register
    # it, and under `python -m qmoefmt_cli.main` it has not finished by then.
    from .main import clean_errors

    clean_errors(_run)(store, prompt, tokens, threads, as_json)


def _run(store, prompt, tokens, threads, as_json):
    import qmoefmt
    from qmoefmt._torch import require_torch
    from qmoefmt.errors import QmoeError

    from .main import _bar

    torch = require_torch("qmoefmt run")
    from qmoefmt.demo.generate import (ContextError, check_room, compressed_model, greedy,
                                       set_threads, warm_up)

    try:
        if threads:
            set_threads(threads)
    except QmoeError as e:
        raise click.BadParameter(str(e), param_hint="'--threads'") from None
    model = compressed_model(qmoefmt.open(store))
    try:
        check_room(model, prompt, tokens)
    except ContextError as e:
        raise click.UsageError(str(e)) from None
    warm_up(model)
    with _bar(tokens, "tok", "run") as bar:
        g = greedy(model, prompt, tokens, step=bar.update)
    summary = {"text": g.text, "tokens": len(g.tokens), "token_ids": g.tokens,
               "prompt_tokens": g.prompt_tokens, "prefill_s": g.prefill_s,
               "decode_s": g.decode_s, "prefill_tokens_per_s": g.prefill_tokens_per_s,
               "decode_tokens_per_s": g.decode_tokens_per_s, "threads": torch.get_num_threads()}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(g.text)
    decode = (f"decode {summary['decode_tokens_per_s']:.1f} tok/s ({len(g.tokens) - 1} tokens)"
              if len(g.tokens) > 1 else "no decode step")
    click.echo(f"prefill {g.prefill_tokens_per_s:.1f} tok/s ({g.prompt_tokens} tokens), "
               f"{decode}, {summary['threads']} threads", err=True)

