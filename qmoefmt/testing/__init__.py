"""Test support: the paths of the committed fixtures (`paths`), the conformance vectors
(`conformance`), the independent QMoE reference (`qmoe_reference`), plain-numpy decoders
from the spec (`reference`), the suite every decode backend passes (`backends`), the
store fuzzer (`fuzz`, its `fuzz_targets` and `fuzz_worker`), packs killed mid-write
(`kill`) and trees compared byte for byte (`trees`).
Nothing in qmoefmt imports these; `backends` needs pytest and hypothesis, the others
only what qmoefmt itself needs."""
