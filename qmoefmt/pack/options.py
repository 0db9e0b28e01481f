"""What a pack is asked to do: `PackOptions`, validated before anything is read or written.
The options are recorded in the store's root, so their fields are part of the format's
output: adding one changes every new root."""
from __future__ import annotations

from dataclasses import dataclass

from .. import codecs
from ..errors import QmoeError
from ..format import constants as C


class PackError(QmoeError):
    pass


@dataclass(frozen=True)
class PackOptions:
    experts: tuple[str, ...] = ()
    preset: str | None = None
    dictionary: str = "auto"          # "auto" (the cheapest counting its bytes) | "qmoe-2023"
    method: str = "rtn"
    bits: str = C.TERNARY             # "ternary" | "2" | "3" | "4"
    group_size: int | None = None     # k-bit only: scale/zero per this many columns
    calibration: str | None = None    # gptq only: a calibration file (spec/calibration-v1.md)
    act_order: bool | None = None     # gptq only: None = GPTQ_ACT_ORDER
    kbit_codec: str = "auto"          # 2/3/4 bits: "auto" | "packed" | "dict16" (spec §12, §13)
    device: str = "cpu"               # gptq only: "cpu" | "cuda" (a torch device string)

    def validate(self) -> None:
        if self.dictionary not in ("auto", "qmoe-2023"):
            raise PackError(f"--dictionary must be auto or qmoe-2023, not {self.dictionary!r}")
        if self.bits not in C.GRIDS:
            raise PackError(f"--bits must be ternary, 2, 3 or 4, not {self.bits!r}")
        if self.method not in ("rtn", "gptq"):
            raise PackError(f"--method must be rtn or gptq, not {self.method!r}")
        if (self.method == "gptq") != (self.calibration is not None):
            raise PackError("--method gptq needs --calibration FILE, and only it takes one")
        if self.kbit_codec not in ("auto", "packed", "dict16"):
            raise PackError(f"--kbit-codec must be auto, packed or dict16, not {self.kbit_codec!r}")
        if self.kbit_codec != "auto" and self.bits == C.TERNARY:
            raise PackError("--kbit-codec needs --bits 2, 3 or 4")
        if self.method == "gptq" or self.bits != C.TERNARY:
            # Before the store exists, so that a refused pack leaves nothing behind.
            from .._torch import require_torch
            require_torch("pack --method gptq" if self.method == "gptq" else f"pack --bits {self.bits}")
        if self.device != "cpu":
            self._check_device()
        if self.act_order is not None and self.method != "gptq":
            raise PackError("--act-order/--no-act-order need --method gptq")
        if self.group_size is not None and (self.bits == C.TERNARY or self.group_size < 1):
            raise PackError("--group-size needs --bits 2, 3 or 4 and a positive size")
        if not self.experts and not self.preset:
            raise PackError("no experts selected: give --experts GLOB or --preset NAME")

    def _check_device(self) -> None:
        if self.method != "gptq":
            raise PackError("--device needs --method gptq (it is where GPTQ runs)")
        from .._torch import require_torch
        torch = require_torch("pack --device")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise PackError(f"--device {self.device!r} is not a torch device") from None
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise PackError(f"--device {self.device}: no such device here "
                            "(torch sees no CUDA GPU)")

    @property
    def gptq_act_order(self) -> bool:
        return C.GPTQ_ACT_ORDER if self.act_order is None else self.act_order

    @property
    def gptq_settings(self):
        from ..quantize.expert_gptq import GPTQSettings
        return GPTQSettings(bits=self.bits, group_size=self.group_size,
                            act_order=self.gptq_act_order, device=self.device)

    @property
    def format_version(self) -> str:
        """The version the pack may need; the finished store declares what it used. Every
        dictionary it writes is compact (§5.7)."""
        if self.bits != C.TERNARY and self.kbit_codec == "packed":
            return codecs.get(C.CODEC_UINT).since
        return C.COMPACT_DICTIONARIES_SINCE
