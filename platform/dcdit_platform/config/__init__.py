"""The experiment config tree: typed sections built strictly from YAML (with `_base_` inheritance) and dotted
command-line overrides, validated before any work starts, plus the config hash that guards resumption.

One `ExperimentConfig` describes one training run: model, diffusion, data, optimisation, checkpoints, logging,
resources, storage and tracking. Everything is checked here (unknown keys with a "did you mean", types, ranges,
cross-section rules) so that a bad config fails in a second instead of after Ray has started.

  sections.py    the typed sections and their range checks
  experiment.py  ExperimentConfig, building and hashing it, the schema's dotted keys
  tree.py        YAML files, `_base_`, the one dotted-key writer, flattening
"""

from dcdit_platform.config.experiment import (RESUME_FREE_KEYS, ExperimentConfig, build_config, build_model_config,
                                              check_config_key, check_run_name, config_paths, default_run_name,
                                              load_experiment, science_diff)
from dcdit_platform.config.sections import (SYNTHETIC, CheckpointSection, DataSection, DiffusionSection,
                                            LoggingSection, ResourcesSection, StorageSection, TrackingSection,
                                            TrainSection)
from dcdit_platform.config.tree import (apply_overrides, deep_merge, defining_file, flatten, load_yaml_tree,
                                        parse_yaml, set_dotted)

__all__ = ["ExperimentConfig", "TrainSection", "DiffusionSection", "DataSection", "CheckpointSection",
           "LoggingSection", "ResourcesSection", "StorageSection", "TrackingSection", "RESUME_FREE_KEYS", "SYNTHETIC",
           "build_config", "build_model_config", "load_experiment", "load_yaml_tree", "apply_overrides", "set_dotted",
           "deep_merge", "defining_file", "parse_yaml", "default_run_name", "check_run_name", "check_config_key",
           "config_paths", "flatten", "science_diff"]
