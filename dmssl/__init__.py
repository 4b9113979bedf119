"""dmssl: semi-supervised contrastive learning with pseudo-labels and distribution matching.

The public surface, one screen:
"""

from dmssl.config import Config
from dmssl.distances import build_distance
from dmssl.errors import CheckpointError, ConfigError, DataError, TrainingDiverged, UserError
from dmssl.modality import Modality, RawData
from dmssl.recipe import resolve

__all__ = ["Config", "resolve", "build_distance", "Modality", "RawData", "UserError", "ConfigError",
           "DataError", "CheckpointError", "TrainingDiverged"]
__version__ = "0.1.0"
