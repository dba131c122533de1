"""depthpipe: a reproducible DVC pipeline for monocular depth estimation (LightlyTrain + fastai)."""

import os

# LightlyTrain sends a usage event on import unless told not to; the pipeline is offline by design.
os.environ.setdefault("LIGHTLY_TRAIN_EVENTS_DISABLED", "1")

__version__ = "0.1.0"
