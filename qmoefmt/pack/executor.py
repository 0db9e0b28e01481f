"""The local executor: runs a plan's stages on threads, and the coordinator's part (adding
dictionaries, committing) in the calling thread.

Memory is bounded by the largest tensor (plus its symbols and codes), never the model.
Three stages overlap: the next tensor is read and hashed ahead (prefetch), the current
one is quantized and coded here, and the previous one's files are written behind (file
creation costs ~0.5 ms a call here, 15 a tensor).
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from ..io.checkpoint import open_checkpoint
from ..store.files import tree_size
from ..store.writer import StoreWriter, write_arrays
from . import stages
from .options import PackError, PackOptions
from .plan import Plan, gptq_batches


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

    @property
    def bits_per_param(self) -> float:
        return 8 * self.store_bytes / self.params if self.params else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(bits_per_param=self.bits_per_param,
                 ratio_vs_bf16=(16 / self.bits_per_param) if self.store_bytes else None,
                 params_per_second=self.params / self.seconds if self.seconds else None)
        return d

    def add(self, src, expert: bool) -> None:
        n = math.prod(src.shape)
        self.tensors += 1
        self.params += n
        self.source_bytes += src.nbytes
        if expert:
            self.expert_tensors += 1
            self.expert_params += n


def write_tensor(writer: StoreWriter, prepared: stages.Prepared) -> None:
    """The writer thread's work: a tensor's arrays, then its group (marking it done)."""
    prepared.record["arrays"] = write_arrays(writer.root, prepared.record["path"], prepared.arrays)
    writer.finish_tensor(prepared.record)


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
         progress=None) -> PackSummary:
    """Pack a checkpoint into a store. `progress(nbytes)` is called after each tensor.
    The output is a function of the input and the options alone: no timestamps, no
    machine-dependent choices, so a resumed pack equals an uninterrupted one byte for byte."""
    options.validate()
    t0 = time.perf_counter()
    summary = PackSummary()
    with open_checkpoint(input_path) as ckpt:
        plan = Plan.make(ckpt, input_path, options)
        calibration = _open_calibration(options)
        writer = StoreWriter(output_path, plan.meta, resume=resume)
        records = _run(plan, options, writer, calibration, resume, summary, progress)
        writer.commit(records)
    summary.dictionaries = sorted(writer.dictionaries)
    summary.attachments = [e["name"] for e in plan.meta.get("attachments", [])]
    summary.store_bytes = tree_size(output_path)
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
