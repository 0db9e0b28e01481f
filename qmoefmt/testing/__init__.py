"""Test support: the paths of the committed fixtures (`paths`), the conformance vectors
(`conformance`), the independent QMoE reference (`qmoe_reference`), plain-numpy decoders
from the spec (`reference`) and the suite every decode backend passes (`backends`).
Nothing in qmoefmt imports these; `backends` needs pytest and hypothesis, the others
only what qmoefmt itself needs."""
