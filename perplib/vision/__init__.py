"""The vision track: ResNets on image classification, global magnitude pruning and parameter-
efficient retraining (paper Section 3.1, 3.4, Appendix A-B)."""

from .artefacts import accuracy_frame, accuracy_table, claims_31, claims_34, cost_table, table12
from .data import DATASETS, available, load_vision_data
from .experiments import (
    PretrainConfig,
    VisionConfig,
    layer_output,
    models_for_features,
    pretrained_model,
    run_vision,
    run_vision_grid,
)
from .models import VISION_MODELS, build_model, is_vision_model
from .pruning import ALLOCATIONS, prune_
from .retrain import METHODS
from .schedules import SCHEDULES

__all__ = [
    "ALLOCATIONS", "DATASETS", "METHODS", "SCHEDULES", "VISION_MODELS", "PretrainConfig", "VisionConfig",
    "accuracy_frame", "accuracy_table", "available", "build_model", "claims_31", "claims_34", "cost_table",
    "is_vision_model", "layer_output", "load_vision_data", "models_for_features", "pretrained_model", "prune_",
    "run_vision", "run_vision_grid", "table12",
]  # fmt: skip
