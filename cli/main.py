"""The `qmoefmt` command.

Exit codes: 0 success (verify: the store is sound and complete); 1 the input or the
store is bad, or verify found problems (one line each, never a traceback); 2 usage errors
(click's own). Set QMOEFMT_DEBUG=1 to see tracebacks of unexpected errors.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click
from tqdm import tqdm

from qmoefmt import __version__
from qmoefmt.demo import CHECKOUT_MODEL
from qmoefmt.errors import QmoeError
from qmoefmt.format.constants import GRIDS
from qmoefmt.selection import PRESETS


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


def clean_errors(fn):
    """Bad input is a one-line error and exit 1; so is a bug, flagged as one. A closed
    stdout (`qmoefmt inspect S | head -1`) ends silently with 141, as SIGPIPE would."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QmoeError as e:
            _fail(str(e))
        except BrokenPipeError:
            # Not an error of ours: the reader has what it wanted. stdout goes to devnull so
            # the interpreter's final flush of what is still buffered cannot raise again
            # (Python's signal docs); 141 = 128 + SIGPIPE, what a shell reports for a tool
            # the signal ended, and never 0, which from verify would mean "sound".
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except OSError as e:
            _fail(f"{e.filename or ''}: {e.strerror or e}")
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the CLI promises no tracebacks
            if os.environ.get("QMOEFMT_DEBUG"):
                raise
            _fail(f"unexpected {type(e).__name__}: {e} (a bug in qmoefmt {__version__}; "
                  "QMOEFMT_DEBUG=1 shows the traceback)")
    return wrapper


def _bar(total: int, unit: str, desc: str, disable=None, **kw):
    """A progress bar on stderr, shown only on a terminal (disable=None) unless disabled."""
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=disable,
                dynamic_ncols=True, **kw)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qmoefmt")
def main():
    """Pack, inspect, verify and unpack compressed Mixture-of-Experts stores."""


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True))
@click.argument("output", type=click.Path())
@click.option("--experts", "experts", multiple=True, metavar="GLOB",
              help="Tensor names to quantize as experts (fnmatch glob, repeatable).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)),
              help="Select the expert weights of a known architecture.")
@click.option("--dictionary", type=click.Choice(["auto", "qmoe-2023"]), default="auto",
              show_default=True, help="auto: per tensor the cheapest of the dictionaries held, a golomb-v2f "
                   "fitted to it and qmoe-2023, new ones counted by their bytes; "
                   "qmoe-2023: QMoE's.")
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True,
              help="rtn: round to nearest; gptq: data-dependent, needs --calibration.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help="GPTQ: Hessians of the expert inputs (spec/calibration-v1.md).")
@click.option("--act-order/--no-act-order", default=None,
              help="GPTQ column order: by decreasing Hessian diagonal (default; better at every "
                   "grid in bench/quality.py), or QMoE's plain order.")
@click.option("--device", default="cpu", show_default=True,
              help="GPTQ: the torch device it runs on, e.g. cuda (the store then depends on it: "
                   "GPU arithmetic differs from the CPU's).")
@click.option("--bits", type=click.Choice(GRIDS), default="ternary",
              show_default=True, help="ternary: dictionary-coded; 2/3/4: see --kbit-codec.")
@click.option("--kbit-codec", type=click.Choice(["auto", "packed", "dict16"]), default="auto",
              show_default=True,
              help="2/3/4 bits: packed: plain bit-packing (format 1.1); dict16: signs "
                   "dictionary-coded plus escapes (format 1.2); auto: dict16 where it is "
                   "smaller, dictionaries included.")
@click.option("--group-size", type=click.IntRange(min=1), default=None,
              help="2/3/4-bit: one scale and zero point per this many columns (default: per row).")
@click.option("--resume", is_flag=True, help="Finish an interrupted pack into OUTPUT.")
@click.option("--strict", is_flag=True,
              help="GPTQ: fail, leaving no complete store, if any expert falls back to round "
                   "to nearest (no calibration tokens, a failed Cholesky factorization).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@clean_errors
def pack(input_path, output, experts, preset, dictionary, method, calibration, act_order, device,
         bits, kbit_codec, group_size, resume, strict, as_json):
    """Pack the checkpoint INPUT (safetensors, .pt/.bin, HDF5) into the store OUTPUT: a
    directory, or with a name ending in .zip the single-file form (spec §15), written in
    OUTPUT.partial/ and archived once complete."""
    from qmoefmt.io.checkpoint import open_checkpoint
    from qmoefmt.pack import PackOptions, pack as run_pack
    from qmoefmt.pack.executor import fallback_words

    options = PackOptions(experts=tuple(experts), preset=preset, dictionary=dictionary,
                          method=method, bits=bits, group_size=group_size,
                          calibration=calibration, act_order=act_order, kbit_codec=kbit_codec,
                          device=device)
    options.validate()
    with open_checkpoint(input_path) as ckpt:
        total = sum(s.nbytes for s in ckpt.tensors())
    with _bar(total, "B", "pack", unit_scale=True) as bar:
        s = run_pack(input_path, output, options, resume=resume, progress=bar.update,
                     strict=strict)
    for warning in s.warnings():
        click.echo(f"warning: {warning}", err=True)
    d = s.as_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(
        f"packed {s.tensors} tensors ({s.expert_tensors} experts"
        + (f", {s.resumed_tensors} already done" if s.resumed_tensors else "") + ")\n"
        f"  params        {s.params:,} ({s.expert_params:,} in experts)\n"
        f"  source        {s.source_bytes:,} bytes\n"
        f"  store         {s.store_bytes:,} bytes, {s.bits_per_param:.3f} bits/param\n"
        f"  vs source     {_ratio_words(d['ratio_vs_source'])}\n"
        f"  vs bf16       {_ratio_words(d['ratio_vs_bf16'])}\n"
        f"  time          {s.seconds:.2f} s ({s.params / s.seconds / 1e6:.1f} M params/s)\n"
        f"  dictionaries  {len(s.dictionaries)}"
        + (f"\n  attachments   {', '.join(s.attachments)}" if s.attachments else "")
        + (f"\n  gptq          {s.gptq_experts - len(s.fallback_tensors)} of {s.gptq_experts} "
           "experts" + (f", round to nearest: {fallback_words(s.fallbacks)}" if s.fallbacks
                        else "") if s.gptq_experts else ""))


def _ratio_words(ratio) -> str:
    """A size over the store's, in words (tiny stores are dominated by dictionaries)."""
    if not ratio:
        return "n/a (empty)"
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"


@main.command()
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False),
              help="A checkpoint of the bundled SwitchMoELM (qmoefmt.demo.model)  [default: "
                   f"$QMOEFMT_DEMO_MODEL, else the checkout's {CHECKOUT_MODEL}]")
@click.option("--tokens", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Calibration tokens, taken from the training split.")
@click.option("--sequential", is_flag=True,
              help="QMoE's sequential mode: quantize the experts layer by layer with GPTQ, "
                   "each layer calibrated on the model with the layers before it quantized. "
                   "Pack the file with the same --bits/--group-size/--act-order.")
@click.option("--bits", type=click.Choice(GRIDS), default=None,
              help="--sequential: the GPTQ grid  [default: ternary]")
@click.option("--group-size", type=click.IntRange(min=1), default=None,
              help="--sequential, 2/3/4 bits: one scale and zero point per this many columns.")
@click.option("--act-order/--no-act-order", default=None,
              help="--sequential: GPTQ column order (default: pack's, act-order).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@clean_errors
def calibrate(output, model_path, tokens, sequential, bits, group_size, act_order, as_json):
    """Collect the expert-input Hessians of the bundled MoE model on its training text
    into OUTPUT (a calibration file, spec/calibration-v1.md) for `pack --method gptq`.
    Other PyTorch models: qmoefmt.calibration.HessianCollector, and for sequential mode
    qmoefmt.quantize.sequential.sequential_calibrate."""
    from qmoefmt.demo.calibrate import calibrate_bundled

    if not sequential and (bits, group_size, act_order) != (None, None, None):
        raise click.UsageError("--bits, --group-size and --act-order/--no-act-order need "
                               "--sequential")
    bars = []

    def progress(total):
        bars.append(_bar(total, "batch", "calibrate"))
        return bars[-1].update
    try:
        summary = calibrate_bundled(output, model_path=model_path, tokens=tokens,
                                    sequential=sequential, bits=bits or "ternary",
                                    group_size=group_size, act_order=act_order,
                                    progress=progress)
    finally:
        for bar in bars:
            bar.close()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    idle = summary["experts_without_tokens"]
    click.echo(f"wrote Hessians of {summary['experts']} experts from {summary['tokens']:,} "
               f"tokens to {output}" + (f"; {len(idle)} experts got no tokens (they will be "
                                        "rounded to nearest)" if idle else ""))
    if sequential:
        s = summary["sequential"]
        flags = (f"--bits {s['bits']}" + (f" --group-size {s['group_size']}" if s["group_size"]
                                          else "")
                 + (" --act-order" if s["act_order"] else " --no-act-order"))
        click.echo(f"sequential: {len(summary['layers'])} layers quantized in turn "
                   f"({summary['calibration_seconds']:.1f} s calibrating, "
                   f"{summary['quantization_seconds']:.1f} s GPTQ); pack it with "
                   f"--method gptq {flags}")


def _bpp(x) -> str:
    return f"{x:.3f}" if x is not None else "-"


def _pack_words(pack: dict | None) -> str:
    """The root's pack options as `key=value` words, every member the root records (older
    stores record fewer), a calibration file by name and short hash."""
    words = []
    for k, v in sorted((pack or {}).items()):
        if isinstance(v, dict) and "sha256" in v:
            v = f"{v.get('name')} (sha256 {str(v['sha256'])[:12]}…)"
        words.append(f"{k}={v}")
    return " ".join(words) or "not recorded"


def _inspect_header(s: dict) -> None:
    click.echo(f"{s['path']}: qmoefmt format {s['format_version']}, "
               f"{'complete' if s['complete'] else 'INCOMPLETE'}")
    click.echo(f"  pack: {_pack_words(s['pack'])}")
    if s["gptq_status"]:
        click.echo("  GPTQ status (per expert): "
                   + ", ".join(f"{n} {st}" for st, n in s["gptq_status"].items()))
    for d in s["dictionaries"]:
        click.echo(f"  dictionary {d['id'][:19]}…  {d['kind']} {d['params']}")
    for a in s["attachments"]:
        click.echo(f"  attachment {a['name']}  {a['bytes']:,} bytes  sha256:{a['sha256'][:12]}…")


def _inspect_layers(s: dict, limit: int | None) -> None:
    """The tensor table, one block per layer headed by the layer's sums; `limit` caps
    the tensor rows shown (the layer lines always all show)."""
    by_name = {t["name"]: t for t in s["tensors"]}
    width = max([len(t["name"]) for t in s["tensors"]] + [4])
    click.echo(f"  {'name':<{width}}  {'shape':<14} {'codec':<20} {'k-bit':>8} {'zeros':>6} "
               f"{'bytes':>12} {'bits/param':>10}")
    shown = 0
    for g in s["layers"]:
        zf = f"{g['zero_fraction']:.3f}" if g["zero_fraction"] is not None else "-"
        dicts = ", ".join(d[7:19] + "…" for d in g["dictionaries"]) or "none"
        click.echo(f"layer {g['layer'] or '(no layer in name)'}: {g['tensors']} tensors "
                   f"({g['expert_tensors']} expert), {g['params']:,} params, "
                   f"{_bpp(g['bits_per_param'])} bits/param with metadata files "
                   f"({_bpp(g['array_bits_per_param'])} arrays only), zeros {zf}, "
                   f"dictionaries {dicts}")
        for name in g["names"]:
            if limit is not None and shown >= limit:
                break
            shown += 1
            t = by_name[name]
            kbit = f"{t['bits']}b/g{t['group_size']}" if "bits" in t else "-"
            zf = f"{t['zero_fraction']:.3f}" if t["zero_fraction"] is not None else "-"
            click.echo(f"  {t['name']:<{width}}  {'x'.join(map(str, t['shape'])) or '()':<14} "
                       f"{t['codec']:<20} {kbit:>8} {zf:>6} {t['bytes']:>12,} "
                       f"{_bpp(t['bits_per_param']):>10}")
    if shown < len(s["tensors"]):
        click.echo(f"  ... {len(s['tensors']) - shown} more tensors (--all)")


def _inspect_totals(s: dict) -> None:
    e, tot = s["experts"], s["total"]
    both = ("bits/param: {a} arrays only (chunk files), {f} with metadata files "
            "(chunks + zarr.json)")
    if e["params"]:
        click.echo(f"experts: {e['tensors']} tensors, {e['params']:,} params, "
                   + both.format(a=_bpp(e["array_bits_per_param"]), f=_bpp(e["bits_per_param"])))
    if tot["filter"] is not None:
        click.echo(f"total (filtered by {tot['filter']!r}: {tot['tensors']} of "
                   f"{s['store_tensors']} tensors; their own files only): {tot['params']:,} "
                   f"params, {tot['bytes']:,} bytes, "
                   + both.format(a=_bpp(tot["array_bits_per_param"]), f=_bpp(tot["bits_per_param"])))
        return
    click.echo(f"total:   {tot['params']:,} params, {tot['bytes']:,} bytes on disk "
               f"(dictionaries {s['dictionary_bytes']:,} bytes), "
               + both.format(a=_bpp(tot["array_bits_per_param"]), f=_bpp(tot["bits_per_param"]))
               + "; arrays include the dictionaries' stored arrays, files every file of the store")


@main.command()
@click.argument("store", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor (default: first 50).")
@click.option("--filter", "pattern", metavar="GLOB",
              help="Only tensors whose name matches GLOB (fnmatch); totals cover those only.")
@click.option("--plot", "plot_path", metavar="PATH", type=click.Path(dir_okay=False),
              help="Also write a PNG of bits/param and zeros per layer and per expert "
                   "(needs the [plot] extra: matplotlib).")
@click.option("--levels", is_flag=True,
              help="Read uint-packed tensors' codes for their share of levels on the zero "
                   "point (else inspect reads metadata only, and shows '-' for them).")
@clean_errors
def inspect(store, as_json, show_all, pattern, plot_path, levels):
    """Show a store's format version, pack settings, dictionaries, attachments, and its
    tensors by layer, with sizes and bits/param."""
    import qmoefmt
    from qmoefmt.store.summary import summarize

    st = qmoefmt.open(store, allow_incomplete=True)
    # A bar only when codes are read: a metadata-only inspect takes milliseconds.
    with _bar(len(st), "tensor", "levels", disable=None if levels else True) as bar:
        s = summarize(st, pattern, levels=levels, progress=bar.update)
    if plot_path is not None:
        from qmoefmt.store.plot import plot_summary

        plot_summary(s, plot_path)     # before any output: a missing extra prints nothing else
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    _inspect_header(s)
    _inspect_layers(s, None if show_all else 50)
    _inspect_totals(s)


@main.command()
@click.argument("store", type=click.Path(exists=True))
@click.option("--deep", is_flag=True, help="Also decode every tensor and check every invariant.")
@click.option("--json", "as_json", is_flag=True, help="Print {ok, problems} as JSON.")
@clean_errors
def verify(store, deep, as_json):
    """Check a store's checksums and structure; exit 0 only if sound and complete."""
    from qmoefmt.store.verify import verify as run_verify

    opened = {"n": 0}
    notes = []

    def on_open(n):
        opened["n"] = bar.total = n
        bar.refresh()

    with _bar(None, "tensor", "verify") as bar:
        problems = run_verify(store, deep=deep, progress=bar.update, on_open=on_open,
                              on_note=notes.append)
    n = opened["n"]
    if as_json:
        click.echo(json.dumps({"ok": not problems, "deep": deep,
                               "problems": [{"where": p.where, "what": p.what} for p in problems],
                               "notes": [{"where": p.where, "what": p.what} for p in notes]},
                              indent=2))
    else:
        for p in notes:
            click.echo(f"note: {p}")
        for p in problems:
            click.echo(str(p))
        if not problems:
            click.echo(f"{store}: ok ({n} tensors{', deep' if deep else ''})")
    sys.exit(1 if problems else 0)


@main.command()
@click.argument("store", type=click.Path(exists=True))
@click.argument("output", type=click.Path())
@click.option("--max-shard-size", metavar="SIZE",
              help="Write OUTPUT as a directory of shards of at most SIZE (5GB, 500MiB, "
                   "bytes) with their index and the store's config.json, as transformers "
                   "saves a model.")
@click.option("--force", is_flag=True,
              help="Overwrite OUTPUT if it is an existing file, or write into it if it is a "
                   "directory that is not empty.")
@click.option("--json", "as_json", is_flag=True,
              help="Print {output, tensors, bytes, files} as JSON.")
@clean_errors
def unpack(store, output, max_shard_size, force, as_json):
    """Write a store's weights to OUTPUT.safetensors, experts dequantized, with the source
    checkpoint's safetensors metadata; an existing OUTPUT is refused unless --force is
    given."""
    import qmoefmt
    from qmoefmt.io.unpack import parse_size, unpack as run_unpack

    try:
        limit = None if max_shard_size is None else parse_size(max_shard_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    st = qmoefmt.open(store)
    with _bar(len(st), "tensor", "unpack") as bar:
        out = run_unpack(st, output, progress=bar.update, force=force, max_shard_size=limit)
    if as_json:
        click.echo(json.dumps(out))
    else:
        files = f" in {len(out['files'])} files" if limit is not None else ""
        click.echo(f"wrote {out['tensors']} tensors to {output}{files}")


@main.command()
@click.argument("store", type=click.Path(exists=True))
@click.argument("output", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print {output, form, files, bytes} as JSON.")
@clean_errors
def convert(store, output, as_json):
    """Rewrite a complete STORE in the other form: a store directory as the single file
    OUTPUT (a .zip, spec §15), or such a file as the directory OUTPUT. Every file of the
    store is carried over byte for byte; STORE is left as it is."""
    import qmoefmt
    from qmoefmt.errors import QmoeError
    from qmoefmt.store.archive import ArchivePath, extract_archive, write_archive

    st = qmoefmt.open(store)       # complete and sound enough to open: no half stores moved
    out = Path(output)
    if out.exists():
        raise QmoeError(f"{out}: already exists; convert writes a new file or directory")
    if isinstance(st.path, ArchivePath):
        archive = st.path.archive
        with _bar(len(archive.members), "file", "convert") as bar:
            size = extract_archive(archive, out, progress=bar.update)
        form, files = "directory", len(archive.members)
    else:
        if out.suffix != ".zip":
            raise click.BadParameter(f"{output}: the single-file form is named *.zip",
                                     param_hint="OUTPUT")
        files = sum(1 for p in Path(store).rglob("*") if p.is_file())
        with _bar(files, "file", "convert") as bar:
            size = write_archive(Path(store), out, progress=bar.update)
        form = "archive"
    if as_json:
        click.echo(json.dumps({"output": str(out), "form": form, "files": files, "bytes": size}))
    else:
        click.echo(f"wrote {out} ({form}, {files} files, {size:,} bytes)")


from .run import run  # noqa: E402 - registered last: run.py imports the helpers above
main.add_command(run)


if __name__ == "__main__":
    main()
