"""Where the committed fixtures are (fixtures/README.md says what each holds): the one
place their paths are spelled. They sit in the source tree beside the package, so they
exist in a checkout (an editable install), not in an installed wheel."""
from __future__ import annotations

from pathlib import Path

from ..demo import CHECKOUT_MODEL

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
BROKEN = FIXTURES / "broken"
MAKE_FIXTURES = REPO / "scripts" / "make_fixtures.py"

# source checkpoints
CHECKPOINTS = {name: FIXTURES / name / "model.safetensors" for name in ("switch-tiny", "edge", "rank")}
CHECKPOINTS["moe-tiny"] = REPO / CHECKOUT_MODEL        # the bundled demo model

# the committed stores, by codec; the format version each declares beside it
TERNARY_STORES = ("switch-tiny.qmoe", "edge-trie.qmoe", "edge-auto.qmoe",     # 1.5, 1.4, 1.5
                  "switch-tiny-qmoe2023.qmoe", "edge.qmoe",                    # 1.0
                  "rank.qmoe")                                                 # 1.5
UINT_STORES = ("switch-tiny-2bit.qmoe", "edge-3bit-g16.qmoe",                  # 1.1
               "rank-2bit.qmoe")                                               # 1.5
UINT_DICT_STORES = ("switch-tiny-2bit-dict16.qmoe",                            # 1.5
                    "edge-2bit-g16-dict16.qmoe",                               # 1.2
                    "rank-2bit-dict16.qmoe")                                   # 1.5
# store -> the format version it declares. 1.5 (logical dtypes in the index, spec §4.5):
# today's packer's; edge-trie.qmoe stays 1.4, the base of the broken stores (broken/cases.json
# pins its digest), and the 1.0-1.2 ones are what older packers wrote
FORMAT_VERSIONS = {
    "switch-tiny.qmoe": "1.5", "edge-auto.qmoe": "1.5", "switch-tiny-2bit-dict16.qmoe": "1.5",
    "rank.qmoe": "1.5", "rank-2bit.qmoe": "1.5", "rank-2bit-dict16.qmoe": "1.5",
    "edge-trie.qmoe": "1.4",
    "switch-tiny-2bit.qmoe": "1.1", "edge-3bit-g16.qmoe": "1.1",
    "edge-2bit-g16-dict16.qmoe": "1.2", "switch-tiny-qmoe2023.qmoe": "1.0", "edge.qmoe": "1.0",
}
# coded tensors of rank 1 and 0, one store a codec (spec §1)
RANK_STORES = ("rank.qmoe", "rank-2bit.qmoe", "rank-2bit-dict16.qmoe")
STORES = TERNARY_STORES + UINT_STORES + UINT_DICT_STORES
# written by earlier versions, in their forms (dictionaries as §5.6 tables): never repacked
LEGACY_STORES = ("switch-tiny-qmoe2023.qmoe", "edge.qmoe", "edge-2bit-g16-dict16.qmoe")


def store(name: str) -> Path:
    """A committed store's directory (KeyError for a name that is not one, so a typo
    fails loudly instead of testing a path that does not exist)."""
    if name not in STORES:
        raise KeyError(f"{name!r} is not a committed fixture store; known: {STORES}")
    return FIXTURES / name


def checkpoint(name: str) -> Path:
    """A committed source checkpoint (KeyError for an unknown name)."""
    return CHECKPOINTS[name]
