"""The cluster files are checked against Ray's own launcher schema and KubeRay's required fields."""

import copy
import json
import pathlib

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = pathlib.Path(__file__).resolve().parents[2] / "cluster"
SCHEMA = json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher_config():
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def test_launcher_yaml_validates_against_rays_schema():
    config = launcher_config()
    jsonschema.validate(config, SCHEMA)
    validate_config(prepare_config(copy.deepcopy(config)))
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "the launcher config must offer GPU worker nodes"


def test_schema_check_is_strict_enough_to_catch_a_typo():
    config = launcher_config()
    config["docker"]["imag"] = config["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, SCHEMA)


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob-sweep.yaml", "RayJob")])
def test_kuberay_manifests_have_the_fields_kuberay_requires(name, kind):
    manifest = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    spec = manifest["spec"]
    cluster = spec if kind == "RayCluster" else spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["template"]["spec"]["containers"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" in limits
    if kind == "RayJob":
        assert spec["entrypoint"].split()[:2] == ["dcdit", "sweep"]
        assert spec["shutdownAfterJobFinishes"] is True
    # Credentials come from a Secret, never from the manifest itself.
    assert "AWS_SECRET_ACCESS_KEY" not in yaml.safe_dump(manifest)
