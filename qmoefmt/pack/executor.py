"""The local executor: runs a plan's stages on threads, and the coordinator's part (adding
dictionaries, committing) in the calling thread.

Memory is bounded by the largest tensor (plus its symbols and codes), never the model.
Three stages overlap: the next tensor is read and hashed ahead (prefetch), the current
one is quantized and coded here, and the previous one's files are written behind (file
creation costs ~0.5 ms a call here, 15 a tensor).
"""
from __future__ import annotations

import math
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import QmoeError
from ..format import constants as C
from ..io.checkpoint import open_checkpoint
from ..store.archive import store_root
from ..store.bundles import archive_staging
from ..store.files import read_root, tree_size
from ..store.writer import StoreExistsError, StoreWriter
from . import stages
from .options import PackError, PackOptions
from .plan import QUANTIZABLE, Plan, gptq_batches, known_fallbacks


def fallback_words(fallbacks: dict) -> str:
    """{"rtn-no-tokens": 3} -> "3 rtn-no-tokens", as messages and the summary show it."""
    return ", ".join(f"{n} {reason}" for reason, n in fallbacks.items())


def _flag_value(key: str, value) -> str:
    if key == "calibration" and isinstance(value, dict):
        return f"{value.get('name')} (sha256 {str(value.get('sha256'))[:12]})"
    return "not given" if value is None else repr(value)


def _check_resume(output_path, meta: dict) -> None:
    """Refuses a resume under other options naming the options, before the writer's own
    check (which names only the root member): `--experts ['a'] (interrupted: ['b'])`."""
    root = Path(output_path)
    if not (root / C.ROOT_META).is_file():
        return
    old = read_root(root)
    if old.get("complete") or not isinstance(old.get("pack"), dict):
        return      # the writer says why
    now = meta["pack"]
    if old.get("plan") != meta["plan"]:
        raise StoreExistsError(f"{root / C.ROOT_META}: cannot resume: the interrupted pack "
                               "read another checkpoint (other tensor names, shapes or "
                               "dtypes); start over in a new directory")
    differ = [k for k in dict.fromkeys([*now, *old["pack"]]) if now.get(k) != old["pack"].get(k)]
    if differ:
        raise StoreExistsError(
            f"{root / C.ROOT_META}: cannot resume: the interrupted pack had other settings: "
            + "; ".join(f"--{k.replace('_', '-')} {_flag_value(k, now.get(k))} (interrupted: "
                        f"{_flag_value(k, old['pack'].get(k))})" for k in differ)
            + "; resume with its settings or start over in a new directory")


def staging(output_path) -> tuple[Path, Path | None]:
    """(the directory the writer writes, the archive made from it once complete, or None).
    An OUTPUT ending in .zip is the single-file form (spec §15): the store is written, and
    resumed, in OUTPUT.partial/ (each tensor's files in one bundle there), archived at the
    end, and the directory removed."""
    out = Path(output_path)
    if out.suffix == ".zip":
        return out.with_name(out.name + ".partial"), out
    return out, None


def _complete(root: Path) -> bool:
    try:
        return read_root(root).get("complete") is True
    except QmoeError:
        return False


def _refuse_fallbacks(found: list, where, written: bool) -> None:
    """--strict: any expert rounded to nearest instead of GPTQ is an error. `where`: the
    calibration file when it shows the fallbacks, else the store."""
    counts: dict[str, int] = {}
    for _, reason in found:
        counts[reason] = counts.get(reason, 0) + 1
    names = ", ".join(n for n, _ in found[:5]) + (", ..." if len(found) > 5 else "")
    state = "the store is left incomplete (not committed)" if written else "nothing was written"
    verb = "fell back" if written else "would fall back"
    experts = "expert" if len(found) == 1 else "experts"
    raise PackError(f"{where}: --strict: {len(found)} {experts} {verb} from GPTQ to round to nearest "
                    f"({fallback_words(dict(sorted(counts.items())))}: {names}); {state}")


@dataclass
class PackSummary:
    tensors: int = 0
    expert_tensors: int = 0
    resumed_tensors: int = 0
    params: int = 0
    expert_params: int = 0
    source_bytes: int = 0
    store_bytes: int = 0
    seconds: float = 0.0
    dictionaries: list = field(default_factory=list)
    attachments: list = field(default_factory=list)     # their names (spec §14)
    skipped: list = field(default_factory=list)         # [name, reason]: selected, kept dense
    gptq_experts: int = 0                               # experts through --method gptq
    fallbacks: dict = field(default_factory=dict)       # GPTQ status -> experts rounded to nearest
    fallback_tensors: list = field(default_factory=list)  # [name, status] of each of them

    @property
    def bits_per_param(self) -> float:
        return 8 * self.store_bytes / self.params if self.params else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(bits_per_param=self.bits_per_param,
                 ratio_vs_bf16=(16 / self.bits_per_param) if self.store_bytes else None,
                 ratio_vs_source=(self.source_bytes / self.store_bytes if self.store_bytes
                                  else None),
                 params_per_second=self.params / self.seconds if self.seconds else None)
        return d

    def warnings(self) -> list[str]:
        """One line each: what the pack did that its options may not have meant."""
        out = []
        if self.skipped:
            shown = ", ".join(f"{n} ({why})" for n, why in self.skipped[:5])
            more = f", ... ({len(self.skipped)} in all)" if len(self.skipped) > 5 else ""
            out.append(f"{len(self.skipped)} tensors selected as experts stay dense: "
                       f"{shown}{more}; only {QUANTIZABLE}")
        if self.fallbacks:
            n = len(self.fallback_tensors)
            names = ", ".join(t for t, _ in self.fallback_tensors[:3]) + (", ..." if n > 3 else "")
            out.append(f"GPTQ fell back to round to nearest for {n} of {self.gptq_experts} "
                       f"experts ({fallback_words(self.fallbacks)}: {names}); --strict "
                       "makes this an error")
        return out

    def count_fallbacks(self, records: list[dict]) -> None:
        """GPTQ's per-expert statuses from the records (resumed ones included): every
        status but "gptq" is an expert rounded to nearest instead. A fused tensor records
        a list, one status per expert."""
        for r in records:
            status = r.get("quantizer", {}).get("status")
            if status is None:
                continue
            for e, st in enumerate(status if isinstance(status, list) else [status]):
                self.gptq_experts += 1
                if st != "gptq":
                    self.fallbacks[st] = self.fallbacks.get(st, 0) + 1
                    name = f"{r['name']}[{e}]" if isinstance(status, list) else r["name"]
                    self.fallback_tensors.append([name, st])
        self.fallbacks = dict(sorted(self.fallbacks.items()))

    def add(self, src, expert: bool) -> None:
        n = math.prod(src.shape)
        self.tensors += 1
        self.params += n
        self.source_bytes += src.nbytes
        if expert:
            self.expert_tensors += 1
            self.expert_params += n


def write_tensor(writer: StoreWriter, prepared: stages.Prepared) -> None:
    """The writer thread's work: a tensor's files, its group (or bundle) last, marking it done."""
    writer.write_tensor(prepared.record, prepared.arrays)


def _write_behind(failed: threading.Event, writer: StoreWriter, prepared: stages.Prepared) -> None:
    """After one write fails, later ones do nothing: the store then holds exactly the
    tensors before the failure, as after a crash, and resume takes it from there."""
    if failed.is_set():
        return
    try:
        write_tensor(writer, prepared)
    except BaseException:
        failed.set()
        raise


def _open_calibration(options: PackOptions):
    """The calibration file, checked before the store exists: a refused pack leaves
    nothing behind. A sequential file's later layers were calibrated on the earlier
    layers' GPTQ weights under its settings; other settings give other weights."""
    if options.method != "gptq":
        return None
    from ..quantize.calibration import CalibrationFile
    calibration = CalibrationFile(options.calibration)
    recorded, used = calibration.sequential, options.gptq_settings.recorded
    if recorded is not None and recorded != used:
        def fmt(d):
            return ", ".join(f"{k} {v}" for k, v in d.items())
        raise PackError(f"{options.calibration}: sequential calibration collected under "
                        f"GPTQ {fmt(recorded)}, but this pack quantizes with "
                        f"{fmt(used)}; pack with the file's settings or calibrate "
                        "again with these")
    return calibration


def pack(input_path, output_path, options: PackOptions, resume: bool = False,
         progress=None, strict: bool = False) -> PackSummary:
    """Pack a checkpoint into a store. `progress(nbytes)` is called after each tensor.
    The output is a function of the input and the options alone: no timestamps, no
    machine-dependent choices, so a resumed pack equals an uninterrupted one byte for byte.
    `strict`: an expert GPTQ rounds to nearest instead is an error, raised before the
    store exists where the calibration file shows it, else before the commit. It is not
    an option of the store: it changes whether one is made, never its bytes."""
    options.validate()
    t0 = time.perf_counter()
    summary = PackSummary()
    with open_checkpoint(input_path) as ckpt:
        plan = Plan.make(ckpt, input_path, options)
        calibration = _open_calibration(options)
        known = known_fallbacks(plan, calibration) if strict and calibration is not None else []
        if known:
            _refuse_fallbacks(known, options.calibration, written=False)
        work, archive = staging(output_path)
        if archive is not None and archive.exists():
            raise StoreExistsError(f"{archive}: already exists" + (
                " and is complete (an archive is made only once its store is)" if resume
                else "; remove it or pack into another file"))
        if resume:
            _check_resume(work, plan.meta)
        if resume and archive is not None and _complete(work):
            # killed while the archive was being made: the store is done, make it again
            done = read_root(work)
            summary.resumed_tensors = len(done["tensors"])
            summary.dictionaries = sorted(e["id"] for e in done["dictionaries"])
            summary.count_fallbacks(done["tensors"])
        else:
            writer = StoreWriter(work, plan.meta, resume=resume, bundled=archive is not None)
            try:
                records = _run(plan, options, writer, calibration, resume, summary, progress)
                summary.count_fallbacks(records)
                if strict and summary.fallback_tensors:
                    _refuse_fallbacks(summary.fallback_tensors, output_path, written=True)
                writer.commit(records)
            finally:
                writer.close()
            summary.dictionaries = sorted(writer.dictionaries)
        if archive is not None:
            archive_staging(work, archive)
            shutil.rmtree(work)
    summary.skipped = [list(t) for t in plan.skipped]
    summary.attachments = [e["name"] for e in plan.meta.get("attachments", [])]
    summary.store_bytes = tree_size(store_root(output_path))
    summary.seconds = time.perf_counter() - t0
    return summary


def _run(plan: Plan, options: PackOptions, writer: StoreWriter, calibration, resume: bool,
         summary: PackSummary, progress) -> list[dict]:
    """Every tensor of the plan through the stages, in order; the records for the root."""
    sources = plan.sources
    done = [writer.finished_record(p) if resume else None for p in plan.paths]
    done = [r if r is not None and r.get("name") == src.name else None
            for r, src in zip(done, sources)]
    todo = [i for i, r in enumerate(done) if r is None]
    batches = gptq_batches(sources, plan.experts, todo, calibration) if calibration else {}
    quantized, records = {}, []
    with ThreadPoolExecutor(max_workers=1) as prefetch, \
            ThreadPoolExecutor(max_workers=1) as write_behind:
        pending, writes, failed = {}, deque(), threading.Event()
        cursor = 0

        def fetch(j: int) -> None:
            if j not in pending:
                pending[j] = prefetch.submit(stages.load, sources[j], plan.experts[j], options)

        if todo:
            fetch(todo[0])
        for i, src in enumerate(sources):
            record = done[i]
            if record is not None:
                if "dictionary" in record:
                    writer.adopt_dictionary(record["dictionary"])
                summary.resumed_tensors += 1
            else:
                if i in batches:
                    from ..quantize.expert_gptq import quantize_batch
                    for j in batches[i]:
                        fetch(j)
                    quantized.update(zip(batches[i], quantize_batch(
                        [sources[j].name for j in batches[i]],
                        [pending[j].result().rows for j in batches[i]],
                        options.gptq_settings, calibration)))
                loaded = pending.pop(i).result()
                cursor += 1
                if cursor < len(todo):
                    fetch(todo[cursor])
                prepared = stages.prepare(plan.paths[i], src.name, loaded, src.dtype,
                                          plan.experts[i], options, writer.dictionaries,
                                          calibration, plan.params_left[i], quantized.pop(i, None))
                del loaded
                if prepared.dictionary is not None:
                    writer.add_dictionary(prepared.dictionary)
                record = prepared.record
                writes.append(write_behind.submit(_write_behind, failed, writer, prepared))
                while len(writes) > 2:
                    writes.popleft().result()
            records.append(record)
            summary.add(src, plan.experts[i])
            if progress:
                progress(src.nbytes)
        for w in writes:
            w.result()
    return records
