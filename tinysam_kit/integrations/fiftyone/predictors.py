"""One predictor per engine setting per process, so the App's interactive operator keeps its embedding cache
between clicks instead of reloading weights every time. Every predictor reads and fills the shared persistent
embedding store (`policy.embedding_store()`), so an image encoded once, by any front end or by the
*Compute TinySAM embeddings* operator, is not encoded again."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

from tinysam_kit.inference import policy
from tinysam_kit.inference.policy import EngineOptions
from tinysam_kit.inference.predictor import TinySamPredictor

MAX_PREDICTORS = 2  # each holds weights plus an embedding cache; two covers "compare fp32 vs int8"

logger = logging.getLogger(__name__)

_predictors: OrderedDict[tuple, TinySamPredictor] = OrderedDict()
_lock = threading.Lock()


def get_predictor(options: EngineOptions | None = None) -> TinySamPredictor:
    """The predictor for `options` (`auto` resolved by `policy.resolve_model`; `predictor.model_choice` says
    which model was used and why)."""
    options = options or EngineOptions()
    resolved, choice = options.resolved()
    key = (resolved, choice)  # the choice keeps its note: "demo" asked for is not "auto" fallen back
    with _lock:
        predictor = _predictors.get(key)
        if predictor is not None:
            _predictors.move_to_end(key)
            return predictor
    policy.announce(choice, logger.warning)
    # Loading takes seconds; do it outside the lock (a concurrent duplicate load is harmless).
    predictor = TinySamPredictor.from_options(options, store=policy.embedding_store())
    with _lock:
        predictor = _predictors.setdefault(key, predictor)
        _predictors.move_to_end(key)
        while len(_predictors) > MAX_PREDICTORS:
            _predictors.popitem(last=False)
    return predictor


def image_key(filepath: str) -> str:
    """The embedding key of an image file as the App's operators and panel use it: an edited file (new
    modification time or size) gets a new embedding."""
    stat = os.stat(filepath)
    return f"{filepath}:{stat.st_mtime_ns}:{stat.st_size}"


def clear_predictors() -> None:
    with _lock:
        _predictors.clear()
