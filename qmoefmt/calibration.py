"""`qmoefmt.calibration`, kept as a public import path: the file format lives in
`qmoefmt.quantize.calibration`, the collector in `qmoefmt.quantize.collector`."""
from .quantize.calibration import (CalibrationFile, check_sequential, hessian_from_inputs,
                                   write_calibration)
from .quantize.collector import FUSED_EXPERTS, FusedExperts, HessianCollector, fused_experts

__all__ = ["CalibrationFile", "FUSED_EXPERTS", "FusedExperts", "HessianCollector",
           "check_sequential", "fused_experts", "hessian_from_inputs", "write_calibration"]
