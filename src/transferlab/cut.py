"""The cut of a partially unfrozen backbone: the frozen bottom and the trainable top as two models.

With the top `unfreeze` layers of the backbone trainable, BatchNorm frozen (inference mode) and
no augmentation, everything below the first trainable layer is a fixed function of the image.
The tensors crossing from those frozen layers into trainable ones (the cut; more than one where
a residual connection jumps over it) can be computed once and cached (feature_cache.py), and
an epoch then runs only the top layers and the head. The top model shares its layers with the
classifier, so training it trains the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

    from transferlab.model import Classifier


@dataclass
class CutModels:
    """`bottom`: image -> cut tensors (frozen); `top`: cut tensors -> class probabilities (trainable)."""

    name: str  # "cut:<first trainable layer>", part of the cache key
    bottom: keras.Model
    top: keras.Model
    to_pooled: keras.Model  # cut tensors -> pooled features (the head's input)


def cut_tensors(backbone: keras.Model, first_trainable: int) -> list[keras.KerasTensor]:
    """Outputs of layers below `first_trainable` that layers from there on consume, in first-use order.

    Uses each layer's `input` and `output`, which name its one call in the backbone's graph
    (keras.applications backbones call every layer once).
    """
    top = backbone.layers[first_trainable:]
    produced_above = {id(t) for layer in top for t in _as_list(layer.output)}
    crossing: list[keras.KerasTensor] = []
    for layer in top:
        for tensor in _as_list(layer.input):
            if id(tensor) not in produced_above and not any(tensor is seen for seen in crossing):
                crossing.append(tensor)
    return crossing


def _as_list(tensors: object) -> list:
    return list(tensors) if isinstance(tensors, list | tuple) else [tensors]


def split_at_cut(classifier: Classifier, first_trainable: int) -> CutModels:
    """The bottom and top models of `classifier` when backbone layers from `first_trainable` on train."""
    import keras

    from transferlab.model import POOL_LAYER

    backbone = classifier.backbone
    crossing = cut_tensors(backbone, first_trainable)
    below = keras.Model(backbone.input, crossing, name="below_cut")
    bottom = keras.Model(
        classifier.model.input, below(classifier.preprocess(classifier.model.input), training=False), name="bottom"
    )
    above = keras.Model(crossing, backbone.output, name="above_cut")  # Keras clones the cut as Inputs
    inputs = [keras.Input(t.shape[1:], name=f"cut_{i}") for i, t in enumerate(crossing)]
    pooled = classifier.model.get_layer(POOL_LAYER)(above(inputs, training=False))
    top = keras.Model(inputs, classifier.head(pooled), name="top")
    to_pooled = keras.Model(inputs, pooled, name="to_pooled")
    return CutModels(f"cut:{backbone.layers[first_trainable].name}", bottom, top, to_pooled)
