"""Models: a registry of architectures (timm-style), model files, and where a model comes from.

    base.py         MODELS, `create_model(spec)`, `ModelSpec`, the `model` config section, `Classifier`
                    (an input normalisation in front of a network), `fingerprint`, `eval_mode`
    resnet.py, wide_resnet.py, dm_wide_resnet.py, mobilenet.py, small_cnn.py   the architectures
                    (layers.py: shared pooling)
    fold.py         the attacks' view of a model with its batch norms folded into its convolutions
    checkpoint.py   safetensors model files that carry their architecture (`ModelMeta`), foreign state dicts
    robustbench.py  RobustBench model-zoo entries read from a local model directory (robustbench_zoo.yaml:
                    the entries built natively, with their source)
    sources.py      what a model path means (run folder, file, zoo entry), loading it; teachers

Every model takes images in [0, 1] (NCHW) and returns logits; the optional mean/std normalisation
lives inside the model, as attack code expects.
"""

from . import dm_wide_resnet, mobilenet, resnet, small_cnn, wide_resnet  # noqa: F401  (register the models)
from .base import (
    MODELS,
    Classifier,
    ModelConfig,
    ModelSpec,
    Normalize,
    check_model_builds,
    create_model,
    eval_mode,
    fingerprint,
    list_models,
)

__all__ = [
    "MODELS",
    "Classifier",
    "ModelConfig",
    "ModelSpec",
    "Normalize",
    "check_model_builds",
    "create_model",
    "eval_mode",
    "fingerprint",
    "list_models",
]
