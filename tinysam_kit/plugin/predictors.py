"""One predictor per (model, engine, precision, device) per process, so the App's interactive operator
keeps its embedding cache between clicks instead of reloading weights every time."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..operators.predictor import TinySamPredictor

MAX_PREDICTORS = 2  # each holds weights plus an embedding cache; two covers "compare fp32 vs int8"

_predictors: OrderedDict[tuple, TinySamPredictor] = OrderedDict()
_lock = threading.Lock()


def get_predictor(model: str = "tinysam", engine: str = "torch", precision: str = "fp32",
                  device: str = "auto") -> TinySamPredictor:
    key = (str(model), engine, precision, device)
    with _lock:
        predictor = _predictors.get(key)
        if predictor is not None:
            _predictors.move_to_end(key)
            return predictor
    # Loading takes seconds; do it outside the lock (a concurrent duplicate load is harmless).
    predictor = TinySamPredictor.from_pretrained(str(model), engine=engine, precision=precision, device=device)
    with _lock:
        predictor = _predictors.setdefault(key, predictor)
        _predictors.move_to_end(key)
        while len(_predictors) > MAX_PREDICTORS:
            _predictors.popitem(last=False)
    return predictor


def clear_predictors() -> None:
    with _lock:
        _predictors.clear()
