"""The naive recipe, standalone: what the published Keras transfer-learning examples do.

    image_dataset_from_directory (80/20 split, seed 123, 224 px, batch 32)
    -> frozen backbone with its own preprocessing, inside `model.fit` every epoch
    -> GlobalAveragePooling -> BatchNormalization -> Dropout 0.2 -> Dense softmax
    Adam 1e-2, categorical cross-entropy, no augmentation.

It deliberately imports nothing from transferlab, so it is the baseline our train stage is
compared with. It writes one JSON object (timings, validation accuracy) to `--result`.

    python bench/naive.py DATA_DIR --epochs 2 --backbone mobilenet_v2 --alpha 0.35 \
        --weights /path/to/no_top.h5 --result out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

STARTED = time.time()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

APPLICATIONS = {
    "efficientnet_b0": "EfficientNetB0",
    "mobilenet_v2": "MobileNetV2",
    "mobilenet": "MobileNet",
    "resnet50": "ResNet50",
}
# keras.applications.<module>.preprocess_input for each backbone (EfficientNet rescales inside).
PREPROCESS_MODULES = {"mobilenet_v2": "mobilenet_v2", "mobilenet": "mobilenet", "resnet50": "resnet50"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="a folder with one sub-folder per class")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backbone", default="efficientnet_b0", choices=sorted(APPLICATIONS))
    parser.add_argument("--alpha", type=float, default=None, help="width multiplier (MobileNet family)")
    parser.add_argument("--weights", default="imagenet", help="imagenet, none, or a no-top .h5 file")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--result", type=Path, required=True, help="where to write the JSON result")
    return parser.parse_args()


def load_datasets(args: argparse.Namespace):  # -> tuple[tf.data.Dataset, tf.data.Dataset, list[str]]
    """The recipe's 80/20 split of one folder, one-hot labels, prefetched."""
    import keras
    import tensorflow as tf

    train_ds, val_ds = keras.utils.image_dataset_from_directory(
        args.data_dir,
        validation_split=0.2,
        subset="both",
        seed=123,
        image_size=(args.image_size, args.image_size),
        batch_size=args.batch_size,
        label_mode="categorical",
    )
    classes = list(train_ds.class_names)
    return train_ds.prefetch(tf.data.AUTOTUNE), val_ds.prefetch(tf.data.AUTOTUNE), classes


def build_model(args: argparse.Namespace, num_classes: int):  # -> keras.Model
    """Backbone frozen, run in inference mode, with the recipe's head."""
    import keras

    weights = None if args.weights.lower() in ("none", "null") else args.weights
    kwargs = {"include_top": False, "weights": weights, "input_shape": (args.image_size, args.image_size, 3)}
    if args.alpha is not None:
        kwargs["alpha"] = args.alpha
    base = getattr(keras.applications, APPLICATIONS[args.backbone])(**kwargs)
    base.trainable = False
    inputs = keras.Input((args.image_size, args.image_size, 3))
    x = inputs
    if args.backbone in PREPROCESS_MODULES:
        x = getattr(keras.applications, PREPROCESS_MODULES[args.backbone]).preprocess_input(x)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.2, name="top_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="pred")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=args.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def epoch_timer():  # -> keras.callbacks.Callback
    """Records each epoch's wall time (training plus validation)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def main() -> None:
    args = parse_args()
    import tensorflow as tf  # noqa: F401  (timed: import is part of every run)

    imported = time.time()
    train_ds, val_ds, classes = load_datasets(args)
    model = build_model(args, len(classes))
    built = time.time()
    timer = epoch_timer()
    history = model.fit(train_ds, validation_data=val_ds, epochs=args.epochs, callbacks=[timer], verbose=2)
    fitted = time.time()
    result = {
        "val_accuracy": float(history.history["val_accuracy"][-1]),
        "seconds": {
            "import": imported - STARTED,
            "data_and_model": built - imported,
            "fit": fitted - built,
            "epochs": timer.seconds,
        },
    }
    args.result.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
