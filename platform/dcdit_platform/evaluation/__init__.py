"""The distributed evaluator (transitional: re-exports dcdit_platform.evaluate until it is split into this package)."""

from dcdit_platform.evaluate import (PROTOCOL_PARAMS, EvalConfig, domain_classifier_path, evaluate, fid_between,
                                     protocol_slug, training_reference)

__all__ = ["EvalConfig", "evaluate", "fid_between", "domain_classifier_path", "training_reference", "protocol_slug",
           "PROTOCOL_PARAMS"]
