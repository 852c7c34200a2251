"""``cluster.yaml`` (the Ray cluster launcher config) checked offline.

It must pass Ray's own autoscaler schema (``ray/autoscaler/ray-schema.json``,
applied with ``jsonschema`` directly) and Ray's config preparation
(``prepare_config`` fills the AWS defaults, ``validate_config`` checks the result),
pin the Ray version that ``pyproject.toml`` requires and that is installed, keep
every port away from the Internet, share its storage, and be run with commands
(in docs/cluster.md and the README) that exist. No Ray instance is started and
nothing leaves this machine: sockets refuse to connect and boto3 cannot be imported.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import socket
import sys
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
SHARED = "/mnt/efs"  # the shared file system on every node
WORKDIR = "/mnt/efs/e2e"  # where searches run, so that their e2e_runs/ is shared
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?:cpu|gpu|cu\d+)$")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may reach the network (or AWS) while these tests run."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during an offline test: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for mod in ("boto3", "botocore"):  # `import boto3` raises ImportError
        monkeypatch.setitem(sys.modules, mod, None)


def _raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _check(cfg: dict) -> dict:
    """What `ray up` checks before it touches the cloud: the schema, then the prepared config."""
    jsonschema.validate(cfg, SCHEMA)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def _ray_requirement() -> Requirement:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert len(reqs) == 1, f"pyproject.toml should require ray once: {deps}"
    return reqs[0]


def _commands(cfg: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    return [c for k in keys for c in cfg.get(k) or []]


# --------------------------------------------------------------------------- Ray's own checks
def test_cluster_yaml_passes_rays_schema_and_preparation():
    raw = _raw()
    prepared = _check(raw)
    jsonschema.validate(prepared, SCHEMA)  # the filled-in config too
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert prepared["provider"]["type"] == "aws"
    assert types[head]["max_workers"] == 0
    assert types[head]["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {n: t for n, t in types.items() if n != head and t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    assert any(t["max_workers"] > t["min_workers"] for t in gpu_types.values()), "no GPU type can autoscale"
    assert all(t["max_workers"] <= prepared["max_workers"] for t in gpu_types.values())
    # head_setup_commands = setup_commands + the head's own (what the head really runs)
    assert prepared["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    assert any("boto3" in c for c in prepared["head_setup_commands"]), "the AWS autoscaler on the head needs boto3"


def _drop(path: str):
    def edit(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        del node[last]
    return edit


def _set(path: str, value):
    def edit(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


BROKEN = {
    "unknown top-level key": (_set("max_worker", 3), jsonschema.ValidationError),
    "max_workers not an integer": (_set("max_workers", "ten"), jsonschema.ValidationError),
    "node type without resources": (_drop("available_node_types.gpu_1x.resources"), jsonschema.ValidationError),
    "fractional GPU resource": (_set("available_node_types.gpu_1x.resources", {"CPU": 8, "GPU": 0.5}),
                                jsonschema.ValidationError),
    "negative CPU resource": (_set("available_node_types.head_cpu.resources", {"CPU": -1}), jsonschema.ValidationError),
    "unknown docker key": (_set("docker.imag", "rayproject/ray:2.60.0-py311-gpu"), jsonschema.ValidationError),
    "unknown node type key": (_set("available_node_types.gpu_1x.min_worker", 1), jsonschema.ValidationError),
    "provider without type": (_drop("provider.type"), jsonschema.ValidationError),
    "commands not a list of strings": (_set("setup_commands", [["pip", "install", "."]]), jsonschema.ValidationError),
    "head type not a node type": (_set("head_node_type", "head"), ValueError),
    "min_workers above max_workers": (_set("available_node_types.gpu_1x.min_workers", 11), ValueError),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_copies_are_rejected(case):
    edit, error = BROKEN[case]
    cfg = _raw()
    _check(copy.deepcopy(cfg))  # the shipped file passes...
    edit(cfg)
    with pytest.raises(error):  # ...and each broken copy does not
        _check(cfg)


def test_on_premise_variant_as_the_comments_describe_it():
    """provider: local, without available_node_types / head_node_type (cluster.yaml's comment)."""
    cfg = _raw()
    cfg["provider"] = {"type": "local", "head_ip": "10.0.0.10", "worker_ips": ["10.0.0.11", "10.0.0.12"]}
    del cfg["available_node_types"], cfg["head_node_type"]
    prepared = _check(cfg)
    assert prepared["head_node_type"] == "local.cluster.node"


# --------------------------------------------------------------------------- the Ray version pin
def test_ray_version_pin_matches_pyproject_and_installed_ray():
    req = _ray_requirement()
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"pyproject.toml does not pin ray exactly: {req}"
    version = specs[0].version
    assert metadata.version("ray") == version == ray.__version__

    raw = _raw()
    images = [raw["docker"][k] for k in ("image", "head_image", "worker_image") if k in raw["docker"]]
    images += [t["docker"]["worker_image"] for t in raw["available_node_types"].values()
               if "worker_image" in t.get("docker", {})]
    requires_python = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    for image in images:
        m = IMAGE.match(image)
        assert m, f"{image}: not a pinned rayproject/ray:<version>-py3XX-<platform> tag"
        assert m["ray"] == version, f"{image} runs Ray {m['ray']}, pyproject.toml pins {version}"
        py = f"{m['py'][0]}.{m['py'][1:]}"
        assert py in requires_python, f"{image}: Python {py} outside requires-python {requires_python}"

    # The setup commands install exactly pyproject's requirement (same extras, same version) and check it.
    pins = [Requirement(r) for c in raw["setup_commands"] for r in re.findall(r'"(ray\[[^"]*\]==[^"]+)"', c)]
    assert pins and all(p.name == "ray" and str(p) == str(req) for p in pins), (pins, req)
    assert any(f'ray.__version__ == "{version}"' in c for c in raw["setup_commands"])
    assert any(re.search(r"pip install .*-e /home/ray/e2e-search\b", c) for c in raw["setup_commands"])


# --------------------------------------------------------------------------- network and storage
def test_no_port_is_open_to_the_world():
    raw = _raw()
    assert "0.0.0.0" not in json.dumps(raw), "something binds or opens 0.0.0.0"
    # Ray creates its own security group (SSH from 0.0.0.0/0) for node types without SecurityGroupIds,
    # and adds provider.security_group.IpPermissions to it.
    assert "security_group" not in raw["provider"]
    for name, t in raw["available_node_types"].items():
        assert t["node_config"].get("SecurityGroupIds"), f"{name}: Ray would create a group open to SSH"
    assert raw["provider"].get("use_internal_ips") is True
    start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    mlflow = next(c for c in raw["head_start_ray_commands"] if "mlflow server" in c)
    assert re.search(r"--host \$HEAD_IP\b", mlflow), "MLflow should listen on the head's private IP only"
    assert "--allowed-hosts" in mlflow


def test_storage_is_shared_and_the_project_is_mounted():
    raw = _raw()
    assert f"-v {SHARED}:{SHARED}" in raw["docker"]["run_options"], "the shared file system is not in the container"
    assert any(SHARED in c and "mount" in c for c in raw["initialization_commands"])
    mlflow = next(c for c in raw["head_start_ray_commands"] if "mlflow server" in c)
    assert re.search(rf"--backend-store-uri sqlite:///{WORKDIR}/e2e_runs/mlflow\.db\b", mlflow)
    assert f"--artifacts-destination {WORKDIR}/e2e_runs/mlartifacts" in mlflow
    assert f"> {WORKDIR}/mlflow_tracking_uri" in mlflow
    for remote, local in raw["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} does not exist in the repository"
    mounted = {remote: (REPO / local).resolve() for remote, local in raw["file_mounts"].items()}
    assert any((p / "search_spaces").is_dir() or p.name == "search_spaces" for p in mounted.values())
    assert (REPO / "pyproject.toml").resolve().parent in mounted.values(), "the project itself is not mounted"
    # The copy leaves out what git ignores (the venv, e2e_runs/): rsync_filter reads .gitignore.
    assert ".gitignore" in raw["rsync_filter"]
    ignored = (REPO / ".gitignore").read_text().split()
    assert ".venv/" in ignored and ("e2e_runs/" in ignored or "/e2e_runs" in ignored)


# --------------------------------------------------------------------------- documented commands
def _cluster_docs() -> list[tuple[str, str]]:
    docs = [("docs/cluster.md", (REPO / "docs/cluster.md").read_text())]
    readme = (REPO / "README.md").read_text()
    m = re.search(r"^## Running on a cluster\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert m, 'README.md has no "## Running on a cluster" section'
    assert "docs/cluster.md" in m.group(1)
    docs.append(("README.md", m.group(1)))
    return docs


def _e2e_commands(text: str) -> list[tuple[str, str]]:
    """(the text just before, the command) of each `e2e-search ...` in a fenced code block."""
    out = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        for m in re.finditer(r"e2e-search (?:run|validate|best|report|ui|export|data)\b[^'\n]*", block):
            out.append((block[max(0, m.start() - 80) : m.start()], m.group(0)))
    return out


def test_documented_cluster_commands_use_flags_and_keys_that_exist():
    from e2e_search.cli import _parser
    from e2e_search.spec.loader import load

    mounts = {remote.rstrip("/"): (REPO / local).resolve() for remote, local in _raw()["file_mounts"].items()}
    runs = 0
    for doc, text in _cluster_docs():
        cmds = _e2e_commands(text)
        assert cmds, f"{doc}: no e2e-search command"
        for before, cmd in cmds:
            # a shell substitution stands for one word (the MLflow URI written by the head)
            argv = shlex.split(re.sub(r"\$\([^)]*\)", "http://10.0.0.5:5000", cmd))[1:]
            try:
                args = _parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"{doc}: `{cmd}` is not a valid e2e-search command line")
            if args.cmd != "run":
                continue
            runs += 1
            assert args.address, f"{doc}: `{cmd}` would start a local Ray on the head: add --address auto"
            assert f"cd {WORKDIR} &&" in before, f"{doc}: `{cmd}` must run in {WORKDIR} (shared e2e_runs/)"
            assert any(s.startswith("tracking.uri=") for s in args.sets), f"{doc}: `{cmd}` does not use MLflow"
            remote = next((r for r in mounts if args.file.startswith(r + "/")), None)
            assert remote, f"{doc}: {args.file} is not under a file_mounts path"
            load(mounts[remote] / args.file[len(remote) + 1 :], args.sets)  # keys and values valid
    assert runs >= 2, "the docs should show at least two searches on the cluster"
