"""Protocol identity: which evaluations count as the same protocol, how a protocol is titled, and the warning a
report shows when a sweep mixes protocols."""

from __future__ import annotations

from dcdit_platform.reports.protocols import PROTOCOL_KEYS, normalise, protocol_id, protocol_title, protocol_warning
from helpers.reports import protocol

BASE = {"num_samples": "256", "sampler": "ddim", "steps": "25", "cfg_scale": "1", "lite_cfg": "false",
        "extractor": "x", "weights_sha256": "1e5", "reference_id": "r", "seed": "0", "num_classes": "4",
        "image_size": "8", "vae": "none"}


def _normalised(params: dict[str, str]) -> dict[str, str]:
    return {k: normalise(k, v) for k, v in params.items()}


def test_equal_values_written_differently_are_one_protocol():
    same = {**BASE, "cfg_scale": "1.0", "lite_cfg": "False", "vae": "null"}
    assert protocol_id(_normalised(BASE)) == protocol_id(_normalised(same))  # cfg 1 and 1.0, None and null
    assert normalise("weights_sha256", "1e5") == "1e5"  # a hex digest is never read as a number
    assert normalise("steps", "25.0") == "25" and normalise("vae", None) == "none"


def test_any_protocol_field_changes_the_id():
    ids = {protocol_id(_normalised({**BASE, key: "9" if BASE[key] != "9" else "8"})) for key in PROTOCOL_KEYS}
    assert len(ids) == len(PROTOCOL_KEYS) and protocol_id(_normalised(BASE)) not in ids
    assert protocol_id(_normalised(BASE)).startswith("P") and len(protocol_id(_normalised(BASE))) == 7


def test_title_names_the_distance_and_the_sampler():
    assert protocol_title(protocol()) == ("FD (dcdit-synthetic-classifier), 256 samples, ddim 25 steps, cfg 1, "
                                          "reference synthetic:0123456789ab")
    fid = protocol(extractor="inception-v3-compat", lite_cfg=True, cfg_scale=1.5)
    assert protocol_title(fid) == ("FID (inception-v3-compat), 256 samples, ddim 25 steps, cfg 1.5, Lite-CFG, "
                                   "reference synthetic:0123456789ab")


def test_warning_names_the_fields_that_differ():
    text = protocol_warning([protocol(), protocol(num_samples=64, steps=50), protocol(seed=1)])
    assert text.startswith("WARNING: 3 different evaluation protocols (they differ in samples, steps, seed).")
