"""dmssl: semi-supervised contrastive learning with pseudo-labels and distribution matching.

The public surface, one screen:

    run = dmssl.fit("quickstart", trainer__max_steps=300)   # train (same checks as the command line)
    clf = dmssl.load(run.run_dir)                            # a run folder or an export, for new samples
    clf.predict(samples), clf.predict_proba(samples), clf.embed(samples), clf.class_names
    dmssl.export(run.run_dir, "my-model")                    # safetensors + config + model card
"""

from dmssl.api import Run, fit, resolve_config
from dmssl.classifier import Classifier, load
from dmssl.config import Config
from dmssl.distances import build_distance
from dmssl.errors import CheckpointError, ConfigError, DataError, TrainingDiverged, UserError
from dmssl.export import export
from dmssl.modality import Modality, RawData
from dmssl.recipe import resolve

__all__ = ["fit", "load", "export", "Run", "Classifier", "resolve_config", "Config", "resolve", "build_distance",
           "Modality", "RawData", "UserError", "ConfigError", "DataError", "CheckpointError", "TrainingDiverged"]
__version__ = "0.1.0"
