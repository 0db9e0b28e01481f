"""Attachments (spec §14): the checkpoint's config.json and generation_config.json travel
in the store's root, verbatim and hashed, and `from_pretrained(store)` builds the
transformers model from them with no other file."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import qmoefmt
from qmoefmt import format as fmt
from qmoefmt.errors import FormatError, LimitError, QmoeError
from qmoefmt.pack import PackOptions, pack
from qmoefmt.store.writer import StoreExistsError
from qmoefmt.store.verify import verify
from qmoefmt_cli.main import main as cli
from qmoefmt.testing.fuzz import resign
from qmoefmt.testing.versions import declare
from qmoefmt.testing.trees import files_of

EXPERTS = PackOptions(experts=("*.experts.*",))
# verbatim means verbatim: odd spacing, member order, non-ASCII (one beyond the BMP)
CONFIG = ('{"model_type": "switch_transformers",\n  "d_model": 48,   "name": "Zwölf 😀",'
          '\n  "architectures": ["SwitchTransformersForConditionalGeneration"]}\n').encode()
GENERATION = b'{\n  "eos_token_id": 1\n}'


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, contains: str) -> str:
    assert r.exit_code == 1, r.output
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and contains in err[0], err
    return err[0]


def checkpoint(directory: Path, config: bytes | None = CONFIG,
               generation: bytes | None = GENERATION) -> Path:
    """A checkpoint directory: model.safetensors and whichever description files."""
    rng = np.random.default_rng(5)
    directory.mkdir(parents=True)
    save_file({"layer.experts.0.w": (rng.standard_normal((16, 48)) * 0.05).astype(np.float32),
               "layer.norm": np.ones(48, np.float32)}, str(directory / "model.safetensors"))
    for name, data in (("config.json", config), ("generation_config.json", generation)):
        if data is not None:
            (directory / name).write_bytes(data)
    return directory


def root_meta(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_bytes())["attributes"]["qmoefmt"]


@pytest.fixture
def packed(tmp_path) -> Path:
    pack(checkpoint(tmp_path / "ckpt"), tmp_path / "s.qmoe", EXPERTS)
    return tmp_path / "s.qmoe"


# ------------------------------------------------------------------ round trip

def test_round_trip(packed, tmp_path):
    st = qmoefmt.open(packed)
    assert st.format_version == "1.5"          # its scales' logical dtypes (spec §4.5)
    assert st.attachments == ["config.json", "generation_config.json"]
    assert st.attachment("config.json") == CONFIG
    assert st.attachment("generation_config.json") == GENERATION
    assert st.config == json.loads(CONFIG) and st.config["name"] == "Zwölf 😀"
    entry = st.attachment_entries["config.json"]
    assert entry["size"] == len(CONFIG) and entry["sha256"] == hashlib.sha256(CONFIG).hexdigest()
    assert (packed / "zarr.json").read_bytes().isascii()       # canonical JSON escapes
    assert verify(packed, deep=True) == []
    with pytest.raises(KeyError, match="no attachment 'tokenizer.json'"):
        st.attachment("tokenizer.json")
    # a file inside the directory takes the directory's description files too
    pack(tmp_path / "ckpt" / "model.safetensors", tmp_path / "f.qmoe", EXPERTS)
    assert root_meta(tmp_path / "f.qmoe")["attachments"] == root_meta(packed)["attachments"]


def test_plain_zarr_sees_them(packed):
    """A Zarr v3 reader gets the attachment from the root group's attributes."""
    zarr = pytest.importorskip("zarr")
    entries = zarr.open_group(str(packed), mode="r").attrs["qmoefmt"]["attachments"]
    assert entries[0]["name"] == "config.json" and entries[0]["text"].encode() == CONFIG


def test_only_config(tmp_path):
    pack(checkpoint(tmp_path / "ckpt", generation=None), tmp_path / "s.qmoe", EXPERTS)
    st = qmoefmt.open(tmp_path / "s.qmoe")
    assert st.attachments == ["config.json"] and st.config is not None


@pytest.mark.parametrize("options, bare_version", [
    # 1.5 already, past 1.3: the scales' logical dtypes in the index (spec §4.5)
    (EXPERTS, "1.5"),
    (PackOptions(experts=("*.experts.*",), bits="2", kbit_codec="packed"), "1.5")])
def test_attachments_only_add_to_the_root(tmp_path, options, bare_version):
    """Without attachments nothing changes (no member, the version as without them); with
    them every file but the root is the same, and the root differs by the member and the
    version alone (none, past 1.3 already): a reader that ignores the member (spec §3)
    reads the same store."""
    pack(checkpoint(tmp_path / "a" / "ckpt"), tmp_path / "with", options)
    pack(checkpoint(tmp_path / "b" / "ckpt", None, None), tmp_path / "bare", options)
    with_, bare = files_of(tmp_path / "with"), files_of(tmp_path / "bare")
    assert sorted(with_) == sorted(bare)
    assert [f for f in bare if f != "zarr.json" and with_[f] != bare[f]] == []
    meta, bare_meta = root_meta(tmp_path / "with"), root_meta(tmp_path / "bare")
    assert "attachments" not in bare_meta and bare_meta["format_version"] == bare_version
    assert meta["format_version"] == max(bare_version, "1.3")
    as_before = {k: v for k, v in meta.items() if k != "attachments"}
    assert fmt.root_doc(dict(as_before, format_version=bare_version)) == bare["zarr.json"]
    assert qmoefmt.open(tmp_path / "bare").attachments == []
    assert qmoefmt.open(tmp_path / "bare").config is None


# ------------------------------------------------------------------ tampering

def test_a_changed_attachment_breaks_the_root_checksum(packed):
    raw = (packed / "zarr.json").read_bytes()
    (packed / "zarr.json").write_bytes(raw.replace(b'\\"d_model\\": 48', b'\\"d_model\\": 49'))
    with pytest.raises(FormatError, match="checksum mismatch"):
        qmoefmt.open(packed)
    assert [p.what for p in verify(packed)] == [
        "checksum mismatch: the root metadata was modified or damaged"]


@pytest.mark.parametrize("change, what", [
    (lambda e: e.update(text=e["text"].replace("48", "49")), "sha256 mismatch"),
    (lambda e: e.update(size=e["size"] + 1), "bytes, its size says"),
    (lambda e: e.update(size=3), "more than its size of 3 bytes"),
    (lambda e: e.update(text="\ud800" + e["text"][1:]), "lone surrogate")])
def test_a_resigned_tampered_attachment_is_refused(packed, change, what):
    """A root re-signed after its text changed (a hostile or buggy writer): the reader and
    verify refuse the attachment, one line naming the store and the attachment."""
    meta = root_meta(packed)
    change(meta["attachments"][0])
    (packed / "zarr.json").write_bytes(fmt.root_doc(meta))
    st = qmoefmt.open(packed)              # the tensors stay readable
    assert st.attachment("generation_config.json") == GENERATION
    with pytest.raises(FormatError) as e:
        st.attachment("config.json")
    msg = str(e.value)
    assert "\n" not in msg and what in msg
    assert msg.startswith(f"{packed / 'zarr.json'}: attachment 'config.json': ")
    with pytest.raises(FormatError, match=what):
        st.config
    assert [str(p) for p in verify(packed)] == [msg]
    r = run("verify", packed)
    assert r.exit_code == 1 and r.stdout.splitlines() == [msg]


def test_verify_wants_json_objects_sorted_by_name(packed):
    meta = root_meta(packed)
    meta["attachments"].reverse()
    bad = b"[1, 2]"
    meta["attachments"][0].update(text=bad.decode(), size=len(bad),
                                  sha256=hashlib.sha256(bad).hexdigest())
    (packed / "zarr.json").write_bytes(fmt.root_doc(meta))
    assert sorted(p.what for p in verify(packed)) == [
        "attachments are not sorted by name (spec §14)",
        "not a JSON object (its top level is an array)"]


def _entries(packed):
    return root_meta(packed)["attachments"]


@pytest.mark.parametrize("edit, error, what", [
    (lambda a: a[0].update(name="../config.json"), FormatError, "attachment name '../config.json'"),
    (lambda a: a[0].update(name="config.txt"), FormatError, "ending in .json"),
    (lambda a: a[0].update(name="c" * 124 + ".json"), FormatError, "up to 128 characters"),
    (lambda a: a.append(dict(a[0])), FormatError, "attachment 'config.json' listed twice"),
    (lambda a: a.extend(dict(a[0], name=f"x{i}.json") for i in range(15)), LimitError,
     "17 attachments, limit is 16"),
    (lambda a: a[0].update(size=(1 << 20) + 1), LimitError, "the attachment limit is 1,048,576"),
    (lambda a: a[0].update(size=True), FormatError, "size is not a non-negative integer"),
    (lambda a: a[0].update(sha256=a[0]["sha256"].upper()), FormatError, "64 lowercase hex"),
    (lambda a: a[0].update(text=None), FormatError, "text is not a string"),
    (lambda a: a.__setitem__(0, "config.json"), FormatError, "not an attachment entry"),
])
def test_malformed_entries_are_refused_on_open(packed, edit, error, what):
    meta = root_meta(packed)
    edit(meta["attachments"])
    (packed / "zarr.json").write_bytes(fmt.root_doc(meta))
    with pytest.raises(error, match=what.replace(".", r"\.").replace("(", r"\(")):
        qmoefmt.open(packed)
    assert len(verify(packed)) == 1


def test_attachments_not_a_list(packed):
    meta = dict(root_meta(packed), attachments={"config.json": CONFIG.decode()})
    (packed / "zarr.json").write_bytes(fmt.root_doc(meta))
    with pytest.raises(FormatError, match="attachments is not a list"):
        qmoefmt.open(packed)


# ------------------------------------------------------------------ pack refuses

@pytest.mark.parametrize("config, what", [
    (b'{"a": "' + b"x" * (1 << 20) + b'"}', "bytes, the attachment limit is 1,048,576 (spec §9)"),
    (b'{"a": 1,}', "not valid JSON (Expecting property name"),
    (b'[{"a": 1}]', "not a JSON object (its top level is an array)"),
    (b'"config"', "not a JSON object (its top level is a string)"),
    (b'{"a": NaN}', "not valid JSON (NaN is not JSON (RFC 8259))"),
    (b'{"a": "\xff"}', "not UTF-8 (invalid start byte at byte 7)"),
    (b'\xef\xbb\xbf{"a": 1}', "not valid JSON (Unexpected UTF-8 BOM"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_pack_refuses_a_bad_config(tmp_path, config, what):
    ckpt = checkpoint(tmp_path / "ckpt", config=config)
    r = run("pack", ckpt, tmp_path / "s.qmoe", "--experts", "*.experts.*")
    line = one_line_error(r, what)
    assert line.startswith(f"error: {ckpt / 'config.json'}: ")
    assert not (tmp_path / "s.qmoe").exists()       # refused before the store exists


def test_pack_refuses_a_bad_generation_config(tmp_path):
    ckpt = checkpoint(tmp_path / "ckpt", generation=b"")
    r = run("pack", ckpt, tmp_path / "s.qmoe", "--experts", "*.experts.*")
    one_line_error(r, f"{ckpt / 'generation_config.json'}: not valid JSON")


# ------------------------------------------------------------------ CLI output

def test_pack_and_inspect_list_attachments(tmp_path):
    ckpt = checkpoint(tmp_path / "ckpt")
    r = run("pack", ckpt, tmp_path / "s.qmoe", "--experts", "*.experts.*")
    assert r.exit_code == 0, r.output
    assert "  attachments   config.json, generation_config.json" in r.stdout.splitlines()
    r = run("inspect", "--json", tmp_path / "s.qmoe")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["format_version"] == "1.5"
    assert s["attachments"] == [
        {"name": "config.json", "bytes": len(CONFIG), "sha256": hashlib.sha256(CONFIG).hexdigest()},
        {"name": "generation_config.json", "bytes": len(GENERATION),
         "sha256": hashlib.sha256(GENERATION).hexdigest()}]
    r = run("inspect", tmp_path / "s.qmoe")
    assert f"  attachment config.json  {len(CONFIG):,} bytes  sha256:" in r.stdout
    assert "qmoefmt format 1.5, complete" in r.stdout
    bare = checkpoint(tmp_path / "bare", None, None)
    r = run("pack", bare, tmp_path / "b.qmoe", "--experts", "*.experts.*", "--json")
    assert json.loads(r.stdout)["attachments"] == []
    assert json.loads(run("inspect", "--json", tmp_path / "b.qmoe").stdout)["attachments"] == []


# ------------------------------------------------------------------ resume

def _interrupt(store: Path) -> None:
    """As a killed pack leaves it: the root incomplete, one tensor unfinished."""
    meta = {k: v for k, v in root_meta(store).items() if k not in ("tensors", "dictionaries")}
    (store / "zarr.json").write_bytes(fmt.root_doc(dict(meta, complete=False)))
    (store / "tensors" / "layer.norm" / "zarr.json").unlink()


def test_resume_reproduces_the_store(packed, tmp_path):
    want = files_of(packed)
    _interrupt(packed)
    pack(tmp_path / "ckpt", packed, EXPERTS, resume=True)
    assert files_of(packed) == want


def test_resume_refuses_other_attachments(packed, tmp_path):
    _interrupt(packed)
    (tmp_path / "ckpt" / "config.json").write_bytes(CONFIG.replace(b"48", b"64"))
    old = hashlib.sha256(CONFIG).hexdigest()[:12]
    with pytest.raises(StoreExistsError, match=f"different attachments \\(config.json sha256 "
                                               f"{old}, generation_config.json"):
        pack(tmp_path / "ckpt", packed, EXPERTS, resume=True)
    (tmp_path / "ckpt" / "config.json").unlink()
    (tmp_path / "ckpt" / "generation_config.json").unlink()
    with pytest.raises(StoreExistsError, match="different attachments"):
        pack(tmp_path / "ckpt", packed, EXPERTS, resume=True)


# ------------------------------------------------------------------ versions

def test_attachments_need_1_3(packed):
    meta = dict(root_meta(packed), format_version="1.2")
    (packed / "zarr.json").write_bytes(fmt.root_doc(meta))
    st = qmoefmt.open(packed)          # read all the same: the reader knows the member
    assert st.config == json.loads(CONFIG)
    assert [p.what for p in verify(packed)] == [
        "format_version 1.2 is not 1.5, the lowest defining the codecs used (qmoe.dense, "
        "qmoe.ternary-dict16) and compact dictionaries (§5.7) and attachments (§14) and "
        "logical dtypes in the index (§4.5), spec §3"]


def test_a_store_without_attachments_declaring_1_3_is_reported(tmp_path):
    pack(checkpoint(tmp_path / "ckpt", None, None), tmp_path / "s.qmoe", EXPERTS)
    meta = dict(root_meta(tmp_path / "s.qmoe"), format_version="1.3")
    (tmp_path / "s.qmoe" / "zarr.json").write_bytes(fmt.root_doc(meta))
    assert [p.what for p in verify(tmp_path / "s.qmoe")] == [
        "format_version 1.3 is not 1.5, the lowest defining the codecs used (qmoe.dense, "
        "qmoe.ternary-dict16) and compact dictionaries (§5.7) and logical dtypes in the "
        "index (§4.5), spec §3"]


def test_a_newer_minor_may_add_members_to_entries(packed):
    meta = declare(root_meta(packed), "1.9")
    meta["attachments"][0]["media_type"] = "application/json"
    (packed / "zarr.json").write_bytes(fmt.root_doc(meta))
    resign(packed)                     # the groups' copies of the records gained members
    assert qmoefmt.open(packed).attachment("config.json") == CONFIG
    assert verify(packed) == []


# ------------------------------------------------------------------ from_pretrained

def test_from_pretrained_needs_a_config(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from qmoefmt.errors import MissingExtraError
    from qmoefmt.torch.pretrained import from_pretrained

    pack(checkpoint(tmp_path / "ckpt", None, None), tmp_path / "s.qmoe", EXPERTS)
    with pytest.raises(QmoeError, match="the store carries no config.json") as e:
        from_pretrained(tmp_path / "s.qmoe")
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match="needs Hugging Face transformers, which is not "
                                                "installed; pip install 'qmoefmt\\[hf\\]'"):
        from_pretrained(tmp_path / "s.qmoe")


@pytest.mark.hf
@pytest.mark.parametrize("config, what", [
    (b'{"model_type": "no-such-model"}', "model_type 'no-such-model' is not one transformers"),
    (b'{"model_type": "switch_transformers", "architectures": ["os.system"]}',
     "architectures ['os.system'] names no model class of transformers"),
    (b'{"model_type": "switch_transformers"}', "architectures None names no model class")])
def test_from_pretrained_refuses_a_config_it_cannot_build(tmp_path, config, what):
    pytest.importorskip("transformers")
    from qmoefmt.torch.pretrained import from_pretrained

    pack(checkpoint(tmp_path / "ckpt", config, None), tmp_path / "s.qmoe", EXPERTS)
    with pytest.raises(QmoeError, match=what.replace("[", r"\[").replace("(", r"\(")):
        from_pretrained(tmp_path / "s.qmoe")


E, H, I = 4, 32, 48                  # experts, hidden, expert intermediate


def _switch(transformers):
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=H, d_kv=8, d_ff=I, num_layers=1, num_decoder_layers=1,
        num_heads=4, num_experts=E, encoder_sparse_step=1, decoder_sparse_step=1,
        expert_capacity=6)
    return transformers.SwitchTransformersForConditionalGeneration(cfg)


def _mixtral(transformers):
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
        num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.MixtralForCausalLM(cfg)


def _from_pretrained_matches_the_dense_model(tmp_path, monkeypatch, build, preset):
    """The model from the store alone gives the logits of a fresh model of its config with
    the store's decoded weights loaded dense (by transformers' own from_pretrained)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qmoefmt.io.unpack import unpack
    from qmoefmt.torch.pretrained import from_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    build(transformers).save_pretrained(tmp_path / "ckpt")
    pack(tmp_path / "ckpt", tmp_path / "s.qmoe", PackOptions(preset=preset))
    store = qmoefmt.open(tmp_path / "s.qmoe")
    assert store.attachments == ["config.json", "generation_config.json"]
    (tmp_path / "dense").mkdir()
    shutil.copy(tmp_path / "ckpt" / "config.json", tmp_path / "dense")
    unpack(store, tmp_path / "dense" / "model.safetensors")
    want_model = type(build(transformers)).from_pretrained(tmp_path / "dense").eval()

    model = from_pretrained(str(tmp_path / "s.qmoe"))         # the store, nothing else
    assert type(model) is type(want_model) and not model.training
    assert not any(p.is_meta for p in model.parameters())
    assert not any("experts" in n for n, _ in model.named_parameters())   # coded, not dense
    assert model.generation_config.eos_token_id == json.loads(
        store.attachment("generation_config.json")).get("eos_token_id")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if preset == "switch":
            got = model(input_ids=ids, decoder_input_ids=ids[:, :8]).logits
            want = want_model(input_ids=ids, decoder_input_ids=ids[:, :8]).logits
        else:
            got, want = model(ids).logits, want_model(ids).logits
    # fused kernels sum the same fp32 products in another order than torch's matmul
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.hf
def test_from_pretrained_switch(tmp_path, monkeypatch):
    _from_pretrained_matches_the_dense_model(tmp_path, monkeypatch, _switch, "switch")


@pytest.mark.hf
def test_from_pretrained_mixtral(tmp_path, monkeypatch):
    _from_pretrained_matches_the_dense_model(tmp_path, monkeypatch, _mixtral, "mixtral")
