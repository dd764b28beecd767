"""One predictor per (model, engine, precision, device) per process, so the App's interactive operator
keeps its embedding cache between clicks instead of reloading weights every time."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from tinysam_kit.inference import policy
from tinysam_kit.inference.predictor import TinySamPredictor

MAX_PREDICTORS = 2  # each holds weights plus an embedding cache; two covers "compare fp32 vs int8"

logger = logging.getLogger(__name__)

_predictors: OrderedDict[tuple, TinySamPredictor] = OrderedDict()
_lock = threading.Lock()


def resolve_model(model: str) -> str:
    """`auto` → the model `policy.resolve_model` picks (a fallback to the demo model is logged)."""
    choice = policy.resolve_model(model)
    if choice.note:
        logger.warning(choice.note)
    return choice.name


def get_predictor(model: str = "auto", engine: str = "torch", precision: str = "fp32",
                  device: str = "auto") -> TinySamPredictor:
    model = resolve_model(model)
    key = (model, engine, precision, device)
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
