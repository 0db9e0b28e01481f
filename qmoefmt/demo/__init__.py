"""The bundled demo: a small Switch-style MoE language model and the text it was trained on,
apart from the format (nothing in the library imports it)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import QmoeError

MODEL_ENV = "QMOEFMT_DEMO_MODEL"
# Where the weights lie in a checkout; they are not part of the installed package.
CHECKOUT_MODEL = Path("fixtures/moe-tiny/model.safetensors")


def bundled_model_path() -> Path:
    """The bundled model's weights: $QMOEFMT_DEMO_MODEL if set, else the checkout this
    package runs from (an editable install), from whatever the working directory is."""
    if os.environ.get(MODEL_ENV):
        path = Path(os.environ[MODEL_ENV])
        if not path.is_file():
            raise QmoeError(f"{MODEL_ENV}={path}: no such file")
        return path
    path = Path(__file__).resolve().parents[2] / CHECKOUT_MODEL
    if not path.is_file():
        raise QmoeError(f"the bundled model is not at {path}: it ships in the source checkout, "
                        f"not in the installed package; point {MODEL_ENV} (or calibrate "
                        f"--model) at a checkout's {CHECKOUT_MODEL}")
    return path
