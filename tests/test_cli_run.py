"""`qmoefmt run`: greedy generation with the bundled model from its store."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import qmoefmt
from qmoefmt.demo.generate import prompt_ids
from qmoefmt.demo.model import load_model as load_dense
from qmoefmt.pack import PackOptions, pack
from qmoefmt.testing import paths
from qmoefmt_cli.main import main as cli

PROMPT = "Return the "


def run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def run_json(store, tokens):
    r = run(store, "--prompt", PROMPT, "--tokens", tokens, "--threads", 1, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def assert_one_line_error(r, code, contains):
    assert r.exit_code == code, (r.exit_code, r.output)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and contains in err[0], err


@pytest.fixture(autouse=True)
def keep_threads():
    """--threads sets this process's torch and Numba pools; later tests get theirs back."""
    import numba

    before = torch.get_num_threads(), numba.get_num_threads()
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "moe-tiny.qmoe"
    pack(paths.checkpoint("moe-tiny"), out, PackOptions(preset="switch"))
    return out


def dense_greedy(store, tokens):
    """The reference: the bundled model with every weight dequantized, in plain modules,
    the whole sequence through its forward at each step (no cache)."""
    st = qmoefmt.open(store)
    model = load_dense(paths.checkpoint("moe-tiny")).eval()
    model.load_state_dict({k: st[k].torch(dtype=v.dtype) for k, v in model.state_dict().items()})
    ids = prompt_ids(PROMPT)
    with torch.no_grad():
        for _ in range(tokens):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[-tokens:]


def test_run_is_deterministic_and_the_dequantized_models_greedy_text(store):
    a, b = run_json(store, 24), run_json(store, 24)
    assert a["tokens"] == len(a["token_ids"]) == 24
    assert (a["text"], a["token_ids"]) == (b["text"], b["token_ids"])
    assert a["token_ids"] == dense_greedy(store, 24)
    assert a["text"] == bytes(a["token_ids"]).decode("utf-8", errors="replace")


def test_json_schema(store):
    d = run_json(store, 2)
    assert set(d) == {"text", "tokens", "token_ids", "prompt_tokens", "prefill_s", "decode_s",
                      "prefill_tokens_per_s", "decode_tokens_per_s", "threads"}
    assert d["prompt_tokens"] == len(PROMPT) + 1 and d["threads"] == 1
    assert d["prefill_tokens_per_s"] > 0 and d["decode_tokens_per_s"] > 0
    assert run_json(store, 1)["decode_tokens_per_s"] is None      # no decode step


def test_plain_output_is_the_text_then_the_rates(store):
    r = run(store, "--prompt", PROMPT, "--tokens", 8)
    assert r.exit_code == 0, r.output
    assert r.stdout == run_json(store, 8)["text"] + "\n"
    assert "prefill" in r.stderr and "tok/s" in r.stderr and "decode" in r.stderr


def test_not_a_store(tmp_path):
    assert_one_line_error(run(tmp_path, "--prompt", "x"), 1, str(tmp_path / "zarr.json"))


def test_a_store_of_another_model():
    other = paths.store("switch-tiny.qmoe")
    assert_one_line_error(run(other, "--prompt", "x"), 1,
                          f"{other}: not a store of the bundled model")


def test_usage_errors(store):
    r = run(store, "--prompt", "x" * 200, "--tokens", 100)
    assert r.exit_code == 2 and "context of 256" in r.stderr
    assert run(store).exit_code == 2                                # --prompt is required
    assert run(store, "--prompt", "x", "--tokens", 0).exit_code == 2


def test_help():
    r = run("--help")
    assert r.exit_code == 0 and "Usage:" in r.stdout and "--prompt" in r.stdout
    assert "run" in CliRunner().invoke(cli, ["--help"]).stdout
