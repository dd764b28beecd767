"""TinySAM as a FiftyOne model for `dataset.apply_model(...)`.

Built on `fiftyone.core.models.Model` + `SamplesMixin` directly: `fiftyone.utils.torch` would pull in
torchvision, which TinySAM does not need. Prompt arguments are those of FiftyOne's SAM models:

    dataset.apply_model(model, "masks", box_prompt_field="ground_truth")    # boxes
    dataset.apply_model(model, "masks", point_prompt_field="keypoints")     # points (+ sam_labels)
    dataset.apply_model(model, "masks", prompt_field="ground_truth")        # legacy: either kind
    dataset.apply_model(model, "masks")                                     # no prompts: segment everything

It is also an embeddings model for `dataset.compute_embeddings(model)` and the FiftyOne Brain: each image's
TinySAM encoder output averaged over its spatial grid (a 256-vector).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import fiftyone.core.labels as fol
import fiftyone.core.models as fom
import numpy as np

from tinysam_kit.data.images import load_image
from tinysam_kit.inference.policy import EngineOptions, everything_params
from tinysam_kit.inference.predictor import PromptError
from tinysam_kit.integrations.fiftyone import labels as L
from tinysam_kit.integrations.fiftyone.predictors import get_predictor

PROMPT_KEYS = ("box_prompt_field", "point_prompt_field", "prompt_field")


@dataclass
class TinySamModelConfig:
    """What `apply_model` may look at (`confidence_thresh`, `filter_classes`) plus TinySAM's settings."""

    options: EngineOptions = field(default_factory=EngineOptions)  # model, engine, precision, device, threads
    mode: str = "hierarchical"  # everything mode when no prompt field is given
    everything: dict = field(default_factory=dict)  # explicit values; the rest are the model's own
    label: str = "object"
    output: str = "detections"  # or "polylines": one filled, closed Polyline per connected part of each mask
    point_label_attribute: str | None = None
    confidence_thresh: float | None = None
    filter_classes: list | None = None


def pooled_embedding(embedding) -> np.ndarray:
    """An image embedding (torch tensor or array, [1,] C x H x W) averaged over its spatial grid: float32 (C,)."""
    if hasattr(embedding, "detach"):
        embedding = embedding.detach().float().cpu().numpy()
    array = np.asarray(embedding, dtype=np.float32)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"expected the embedding of one image, got a batch of {array.shape[0]}")
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a C x H x W image embedding, got shape {array.shape}")
    return array.mean(axis=(1, 2))


class TinySamModel(fom.Model, fom.SamplesMixin, fom.EmbeddingsMixin):
    """`fo.Detections` with instance masks (cropped to their boxes), or with `output="polylines"`
    `fo.Polylines` (one filled, closed polyline per connected part); confidence = predicted IoU in [0, 1]
    (the raw value in the `predicted_iou` attribute).

    Keyword arguments: the engine options (`model`, `engine`, `precision`, `device`, `threads`) and the
    fields of `TinySamModelConfig`."""

    def __init__(self, config: TinySamModelConfig | None = None, **kwargs) -> None:
        fom.SamplesMixin.__init__(self)
        if config is None:
            engine_keys = {f.name for f in fields(EngineOptions)}
            options = EngineOptions.from_mapping({k: kwargs.pop(k) for k in list(kwargs) if k in engine_keys})
            config = TinySamModelConfig(options=options, **kwargs)
        if config.output not in L.OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(L.OUTPUTS)}, got {config.output!r}")
        self.config = config
        self.predictor = get_predictor(self.config.options)
        self._preprocess = False
        self._everything = None
        self._last_embedding: np.ndarray | None = None

    # ----- fiftyone.core.models.Model interface
    @property
    def media_type(self) -> str:
        return "image"

    @property
    def ragged_batches(self) -> bool:
        return True  # images of any size

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self) -> bool:
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value: bool) -> None:
        self._preprocess = value

    @property
    def model_choice(self):
        """The model actually used (`auto` may have fallen back to the demo model; `.note` says why)."""
        return self.predictor.model_choice

    @property
    def model_version(self) -> str:
        return self.predictor.model_version

    @property
    def needs_fields(self) -> dict:
        return self._fields

    @needs_fields.setter
    def needs_fields(self, fields) -> None:
        # apply_model sets this before the first sample, so bad arguments fail once instead of per sample
        self._fields = dict(fields or {})
        self._prompt_fields()

    def _prompt_fields(self) -> tuple[str | None, str | None, str | None]:
        fields = self._fields
        unknown = sorted(set(fields) - set(PROMPT_KEYS))
        if unknown:
            raise ValueError(f"unsupported argument(s) {', '.join(unknown)}; TinySAM accepts "
                             f"{', '.join(PROMPT_KEYS)}")
        if fields.get("prompt_field") and (fields.get("box_prompt_field") or fields.get("point_prompt_field")):
            raise ValueError("prompt_field cannot be combined with box_prompt_field / point_prompt_field")
        return fields.get("box_prompt_field"), fields.get("point_prompt_field"), fields.get("prompt_field")

    def _prompts(self, sample, width: int, height: int) -> list[L.Prompt] | None:
        box_field, point_field, legacy = self._prompt_fields()
        if not (box_field or point_field or legacy):
            return None
        if sample is None:
            raise ValueError("prompt fields need the sample: call through dataset.apply_model()")
        boxes = sample[box_field] if box_field else None
        points = sample[point_field] if point_field else None
        if legacy:
            value = sample[legacy]
            if isinstance(value, fol.Detections):
                boxes = value
            elif isinstance(value, fol.Keypoints):
                points = value
            elif value is not None:
                raise PromptError(f"prompt field {legacy!r} holds {type(value).__name__}; expected Detections "
                                  "or Keypoints")
        prompts = L.combine_prompts(
            L.box_prompts(boxes, width, height, box_field or legacy or "boxes"),
            L.point_prompts(points, width, height, point_field or legacy or "points",
                            self.config.point_label_attribute))
        return prompts

    def predict(self, arg, sample=None):
        image = load_image(arg)  # FiftyOne hands over HWC uint8 RGB; PIL images and paths work too
        h, w = image.shape[:2]
        prompts = self._prompts(sample, w, h)
        state = self.predictor.embed(image, cache=False)  # as dataset-wide runs: exact, never the fp16 store
        self._last_embedding = pooled_embedding(state.embedding)
        if prompts is None:
            if self._everything is None:
                from tinysam_kit.inference.everything import EverythingGenerator

                params = everything_params(self.predictor.model_name, self.config.everything, prelabel=True)
                self._everything = EverythingGenerator(self.predictor, self.config.mode, **params)
            results = L.everything_results(self._everything.generate(image_embedding=state), self.config.label)
        elif not prompts:
            results = []
        else:
            results = L.segment_prompts(self.predictor, state, prompts)
        return L.results_to_labels(results, self.config.output)

    def predict_all(self, args, samples=None):
        samples = samples if samples is not None else [None] * len(args)
        return [self.predict(a, s) for a, s in zip(args, samples)]

    # ----- fiftyone.core.models.EmbeddingsMixin interface
    @property
    def has_embeddings(self) -> bool:
        return True

    def embed(self, arg) -> np.ndarray:
        """The image's TinySAM embedding averaged over the spatial grid (float32, 256 values for TinySAM)."""
        self._last_embedding = pooled_embedding(self.predictor.embed(load_image(arg), cache=False).embedding)
        return self._last_embedding

    def embed_all(self, args) -> np.ndarray:
        return np.stack([self.embed(arg) for arg in args])

    def get_embeddings(self) -> np.ndarray:
        """The embedding of the last image given to `predict` or `embed`, as a batch of one."""
        if self._last_embedding is None:
            raise ValueError("no image has been embedded yet")
        return self._last_embedding[np.newaxis]
