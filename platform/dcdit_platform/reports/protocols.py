"""Evaluation protocols: the fields that make two evaluations comparable, their normal form, a short id and a title
for each protocol, and the warning a report shows when a sweep mixes protocols.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

# The fields of an evaluation that change its numbers (evaluation.PROTOCOL_PARAMS minus per-run bookkeeping): two
# evaluations are ranked together only when all of them are equal.
PROTOCOL_KEYS = ("num_samples", "sampler", "steps", "cfg_scale", "lite_cfg", "extractor", "weights_sha256",
                 "reference_id", "seed", "num_classes", "image_size", "vae")
PROTOCOL_LABELS = {"num_samples": "samples", "sampler": "sampler", "steps": "steps", "cfg_scale": "cfg",
                   "lite_cfg": "Lite-CFG", "extractor": "extractor", "weights_sha256": "weights",
                   "reference_id": "reference", "seed": "seed", "num_classes": "classes",
                   "image_size": "image size", "vae": "VAE"}
_NUMERIC = ("num_samples", "steps", "cfg_scale", "seed", "num_classes", "image_size")


def normalise(key: str, value: str | None) -> str:
    """Protocol values as comparable text: '1' and '1.0' are the same cfg scale, 'None' and 'null' the same
    (hashes and ids stay verbatim: a hex digest can look like a number)."""
    if value is None or value in ("None", "null", ""):
        return "none"
    if key == "lite_cfg":
        return str(value).lower()
    if key in _NUMERIC:
        try:
            return f"{float(value):g}"
        except ValueError:
            return value
    return value


def protocol_of(params: dict[str, str]) -> dict[str, str]:
    """The normalised protocol of an evaluation from its logged params (`eval/<slug>/<key>` without the prefix)."""
    return {k: normalise(k, params.get(k)) for k in PROTOCOL_KEYS}


def protocol_id(protocol: dict[str, str]) -> str:
    body = json.dumps({k: protocol.get(k, "none") for k in PROTOCOL_KEYS}, sort_keys=True)
    return "P" + hashlib.sha256(body.encode()).hexdigest()[:6]


def protocol_title(protocol: dict[str, str]) -> str:
    extractor = protocol.get("extractor", "?")
    distance = "FID" if extractor == "inception-v3-compat" else "FD"
    parts = [f"{distance} ({extractor})", f"{protocol.get('num_samples')} samples",
             f"{protocol.get('sampler')} {protocol.get('steps')} steps", f"cfg {protocol.get('cfg_scale')}"]
    if protocol.get("lite_cfg") == "true":
        parts.append("Lite-CFG")
    parts.append(f"reference {protocol.get('reference_id')}")
    return ", ".join(parts)


def protocol_warning(protocols: Sequence[dict[str, str]]) -> str:
    """What a report says when its evaluations fall under several protocols, naming the fields that differ."""
    differing = [k for k in PROTOCOL_KEYS if len({p.get(k) for p in protocols}) > 1]
    named = ", ".join(PROTOCOL_LABELS[k] for k in differing) or "protocol"
    return (f"WARNING: {len(protocols)} different evaluation protocols (they differ in {named}). Runs are ranked "
            "only within one protocol table; numbers from different tables are not comparable.")
