"""`model.save` without the throwaway layers Keras 3 builds for every layer it saves.

Saving walks every object of the model (each layer, the optimizer, the loss) and asks
`saving_lib.get_attr_skipset(type)` which attributes to leave out: the attributes of a fresh
reference object of that type. The answer is meant to be computed once per type and kept in
Keras's global state, but Keras 3.15 keeps it under `saving_attr_skipset_<type>` and looks for
it under `saving_attr_skiplist_<type>`. So every save builds a new reference `Layer()` for each
layer it walks: 163 for MobileNetV2, a third of a classifier's save (README, "Performance").

`save` puts the set Keras computes under the key Keras looks up, then saves as Keras does: the
file holds the same members with the same contents. The keys live in thread-local state that
`keras.backend.clear_session` empties, so they are filled before every save (a dictionary
lookup when they are there). Should Keras rename or fix either key, this costs nothing and
changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

# The object types a classifier's save walks (`KerasSaveable._obj_type()`).
SAVED_TYPES = ("Functional", "Sequential", "Layer", "Operation", "Optimizer", "Loss", "Metric")
LOOKUP_KEY = "saving_attr_skiplist_{}"  # what `get_attr_skipset` reads


def save(model: keras.Model, path: Path) -> None:
    """`model.save(path)`, with Keras's attribute skip sets where Keras looks for them."""
    fill_skipsets()
    model.save(path)


def fill_skipsets() -> None:
    """Store each type's skip set under the key `get_attr_skipset` reads, where it is missing."""
    try:
        from keras.src.backend.common import global_state
        from keras.src.saving.saving_lib import get_attr_skipset
    except ImportError:  # a Keras without these private modules: nothing to fill
        return
    for obj_type in SAVED_TYPES:
        key = LOOKUP_KEY.format(obj_type)
        if global_state.get_global_attribute(key) is None:
            try:
                global_state.set_global_attribute(key, get_attr_skipset(obj_type))
            except ValueError:  # a type this Keras does not know: its saves never ask for it
                continue
