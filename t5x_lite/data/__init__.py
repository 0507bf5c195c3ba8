"""t5x_lite input pipeline: vocabularies, sources, preprocessors, registered tasks, get_dataset.

    from t5x_lite import data
    batches = data.get_dataset("stdlib_span_corruption", {"inputs": 512, "targets": 114},
                               batch_size=8, seed=0)
    next(batches)  # {"encoder_input_tokens": int32[8, 512], ...}
"""
# TensorFlow first, quietly and off the GPUs (t5x_lite/quiet_start.py): the submodules below import
# it too, and the first import is the one that prints.
from t5x_lite.quiet_start import import_tensorflow

import_tensorflow()

# pylint: disable=g-import-not-at-top,wrong-import-position
from t5x_lite.data.feature_converters import CONVERTERS, MLMFeatureConverter, make_feature_converter
from t5x_lite.data.pipeline import BatchIterator, default_model_family, get_dataset, get_provider
from t5x_lite.data.pipeline import get_tf_dataset, registered_names, train_batches
from t5x_lite.data.pipeline import validation_batches
from t5x_lite.data.resume import TrainStream
from t5x_lite.data.sources import CorpusError
from t5x_lite.data.vocabularies import DEFAULT_VOCABULARY, check_vocabulary_fits, get_vocabulary
from t5x_lite.data.vocabularies import mask_id, special_ids
from t5x_lite.data import preferences  # noqa: F401  # registers the preference tasks
