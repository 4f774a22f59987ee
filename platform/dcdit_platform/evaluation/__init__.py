"""The distributed sample-quality evaluator (`dcdit eval`) and `dcdit fid`.

protocol (EvalConfig, the protocol record and slug) -> sources, extractors -> references (reference statistics,
cached) -> actors (typed tasks) in a pool -> metrics -> outputs (storage, MLflow); evaluator holds the spine.
"""

from dcdit_platform.evaluation.extractors import domain_classifier_path
from dcdit_platform.evaluation.fid import fid_between
from dcdit_platform.evaluation.protocol import PROTOCOL_PARAMS, EvalConfig, protocol_slug
from dcdit_platform.evaluation.sources import training_reference


def __getattr__(name: str):
    # Lazy: `dcdit fid` and `dcdit report` use this package without Ray; the evaluator imports ray and matplotlib.
    if name == "evaluate":
        from dcdit_platform.evaluation.evaluator import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EvalConfig", "evaluate", "fid_between", "domain_classifier_path", "training_reference", "protocol_slug",
           "PROTOCOL_PARAMS"]
