"""The deployment files under deploy/: container image, Helm chart, systemd unit, Slack app.

The Helm chart is rendered offline by Helm's own template engine (helm-python-sdk binds
Helm's Go SDK through ctypes: no cluster, no helm binary) and every rendered object is
validated against the Kubernetes OpenAPI schemas shipped by kubernetes-validate, in strict
mode, so a broken template or a misspelt field fails here rather than at `helm install`.
The ServiceMonitor is a CRD without a schema there: its structure is checked by hand.

No Docker engine runs in CI, so the Dockerfile is checked as text, and its HEALTHCHECK
command is run for real against a local HTTP server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from bot.config import Config
from runbookctl.cli import cli

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "runbook-bot"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "systemd" / "runbook-bot.service"
SLACK_MANIFEST = DEPLOY / "slack-app-manifest.yaml"
README = DEPLOY / "README.md"

# Settings the bot reads (bot/config.py, checked against the README by test_docs): the
# deployment files may set nothing else, and credentials only from secrets.
KNOWN_ENV = {f.metadata["env"] for f in fields(Config)}
CREDENTIALS = {f.metadata["env"] for f in fields(Config) if str(f.type) == "Secret"}
BOT_UID = 10001
SHUTDOWN_GRACE_SECONDS = 60
# The oldest Kubernetes minor we support, and the newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]

GIT_REPO = "https://git.example.com/sre/runbook-catalog.git"
FULL_VALUES: dict[str, Any] = {
    "environment": "prod",
    "pagerduty": {"from": "runbook-bot@example.com"},
    "catalog": {
        "source": "gitSync",
        "gitSync": {
            "repo": GIT_REPO,
            "ref": "v2",
            "credentialsSecret": "catalog-git-https",
            "sshKeySecret": "catalog-git-ssh",
        },
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "serviceAccount": {"name": "runbook-bot-actions", "automountToken": True},
    "podAnnotations": {"example.com/team": "sre"},
    "extraEnv": [{"name": "SLACK_API_URL", "value": "https://slack.internal.example.com/api/"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
}
# Several replicas on PostgreSQL: the URL and the runner signing key from Secrets.
POSTGRES_VALUES: dict[str, Any] = {
    "database": {"existingSecret": "runbook-bot-db"},
    "signingKey": {"existingSecret": "runbook-bot-signing"},
}
PG_URL = "postgresql://runbook@db.internal:5432/runbook"


# -- Helm ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm() -> Any:
    try:
        import helm_python
    except ImportError:  # pragma: no cover - only without the test extras
        pytest.fail(
            "helm-python-sdk is missing: install the test extras (pip install -e '.[test]'); "
            "the chart is rendered with Helm's own engine, not a stand-in"
        )
    return helm_python


@dataclass
class Rendered:
    objects: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def bot(self) -> dict[str, Any]:
        return next(c for c in self.pod["containers"] if c["name"] == "runbook-bot")

    def env(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.bot["env"]}


def render(helm: Any, values: dict[str, Any] | None = None, release: str = "rb") -> Rendered:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=release, namespace="ops")
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(objects, notes)


def bundled_catalog_files() -> dict[str, str]:
    """The bundled catalog, flattened to file name -> text, as a ConfigMap holds it (its
    runbook tests, in tests/, are not part of the catalog and stay out)."""
    root = REPO / "runbooks"
    paths = [p for p in sorted(root.rglob("*.yaml")) if p.relative_to(root).parts[0] != "tests"]
    files = {p.name: p.read_text("utf-8") for p in paths}
    assert len(files) == len(paths), "file names collide"
    return files


VALUE_SETS: dict[str, dict[str, Any] | None] = {
    "defaults": None,
    "git-sync+servicemonitor": FULL_VALUES,
    "configmap-catalog": {
        "catalog": {"source": "configMap", "configMap": {"files": bundled_catalog_files()}}
    },
    "existing-configmap+claim": {
        "catalog": {"source": "configMap", "configMap": {"name": "runbook-catalog"}},
        "persistence": {"existingClaim": "runbook-bot-state"},
    },
    "ephemeral": {"persistence": {"enabled": False}},
    "postgresql": POSTGRES_VALUES,
    "kubernetes-executor": {
        "serviceAccount": {"create": True, "automountToken": True},
        "kubernetes": {
            "namespaces": ["payments", "search"],
            "serviceAccounts": [
                {
                    "name": "payments-fixer",
                    "namespace": "payments",
                    "rules": [
                        {
                            "apiGroups": ["apps"],
                            "resources": ["deployments"],
                            "verbs": ["get", "patch"],
                        }
                    ],
                },
                {"name": "search-reader", "namespace": "search", "create": False, "rules": []},
            ],
        },
    },
}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints_clean(helm: Any, values: dict[str, Any] | None) -> None:
    report = helm.lint(str(CHART), values, strict=True, kube_version="v" + KUBE_VERSIONS[0])
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_is_valid_kubernetes(
    helm: Any, values: dict[str, Any] | None, kube_version: str
) -> None:
    rendered = render(helm, values)
    assert {"Deployment", "Service"} <= {o["kind"] for o in rendered.objects}
    for obj in rendered.objects:
        if obj["kind"] == "ServiceMonitor":
            continue  # a CRD: see test_service_monitor_scrapes_metrics_through_the_service
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {e.message}")


def test_defaults_render_the_bot_its_service_and_its_volume_only(helm: Any) -> None:
    rendered = render(helm)
    assert sorted(o["kind"] for o in rendered.objects) == [
        "Deployment",
        "PersistentVolumeClaim",
        "Service",
    ]
    assert rendered.env()["RUNBOOK_CATALOG"]["value"] == "/app/runbooks"
    assert rendered.bot["image"] == "runbook-bot:0.1.0"


def test_sqlite_runs_one_replica_replaced_by_recreate_on_its_claim(helm: Any) -> None:
    for values in (None, {"replicaCount": 1}):
        rendered = render(helm, values)
        deployment = rendered.one("Deployment")
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        assert rendered.of_kind("PodDisruptionBudget") == []
        assert "one pod only" in rendered.notes.lower()
        claim = rendered.one("PersistentVolumeClaim")
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        env = rendered.env()
        assert env["RUNBOOK_DB"] == {"name": "RUNBOOK_DB", "value": "/data/runbook-bot.db"}
        assert "RUNBOOK_REPLICA_ID" not in env


@pytest.mark.parametrize("count", [0, 2, 3])
def test_sqlite_refuses_any_other_replica_count(helm: Any, count: int) -> None:
    with pytest.raises(helm.HelmRenderError, match=f"replicaCount={count}: SQLite is one replica"):
        render(helm, {"replicaCount": count})


def test_postgresql_runs_two_replicas_rolling_with_a_disruption_budget(helm: Any) -> None:
    rendered = render(helm, {"database": {"existingSecret": "runbook-bot-db"}})
    deployment = rendered.one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    budget = rendered.one("PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["minAvailable"] == 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "2 replicas on PostgreSQL" in rendered.notes
    assert "WARNING: no signingKey.existingSecret" in rendered.notes

    env = rendered.env()
    assert env["RUNBOOK_DB"] == {
        "name": "RUNBOOK_DB",
        "valueFrom": {"secretKeyRef": {"name": "runbook-bot-db", "key": "url"}},
    }
    assert env["RUNBOOK_REPLICA_ID"] == {
        "name": "RUNBOOK_REPLICA_ID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    # No claim: the database is elsewhere, and a ReadWriteOnce claim cannot follow pods
    # spread over nodes. The state directory is each pod's own emptyDir.
    assert rendered.of_kind("PersistentVolumeClaim") == []
    assert not [v for v in rendered.pod["volumes"] if "persistentVolumeClaim" in v]


def test_postgresql_takes_the_replica_count_and_key_it_is_given(helm: Any) -> None:
    values = {"database": {"existingSecret": "prod-db", "secretKey": "dsn"}, "replicaCount": 3}
    rendered = render(helm, values)
    assert rendered.one("Deployment")["spec"]["replicas"] == 3
    ref = rendered.env()["RUNBOOK_DB"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "prod-db", "key": "dsn"}
    assert rendered.one("PodDisruptionBudget")["spec"]["minAvailable"] == 1

    single = render(helm, {**values, "replicaCount": 1})
    assert single.one("Deployment")["spec"]["replicas"] == 1
    assert single.of_kind("PodDisruptionBudget") == []  # it would block every drain
    unbudgeted = render(helm, {**values, "podDisruptionBudget": {"enabled": False}})
    assert unbudgeted.of_kind("PodDisruptionBudget") == []

    with pytest.raises(helm.HelmRenderError, match="replicaCount=0: run at least 1 replica"):
        render(helm, {**values, "replicaCount": 0})


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_the_bot_writes_its_state_where_a_volume_is_mounted(
    helm: Any, values: dict[str, Any] | None
) -> None:
    """The root filesystem is read-only: the database file (SQLite), the step
    supervisors' state directory and the created signing key must be on writable mounts,
    and a signing key from a Secret on its mount."""
    rendered = render(helm, values)
    env = {name: e.get("value", "") for name, e in rendered.env().items()}
    postgres = "secretKeyRef" in rendered.env()["RUNBOOK_DB"].get("valueFrom", {})
    if postgres:
        env["RUNBOOK_DB"] = PG_URL
    config = Config.from_env(env)
    mounts = {Path(m["mountPath"]): m for m in rendered.bot["volumeMounts"]}

    def mount_of(path: Path) -> dict[str, Any]:
        found = [mounts[m] for m in mounts if path.is_relative_to(m)]
        assert found, f"{path} is on the read-only root filesystem"
        return max(found, key=lambda m: len(m["mountPath"]))

    writable = [config.state_directory]
    if not postgres:
        writable.append(Path(config.db))
    if not config.signing_key:
        writable.append(config.signing_key_path)
    for path in writable:
        assert not mount_of(path).get("readOnly", False), path
    if config.signing_key:
        mount = mount_of(config.signing_key_path)
        volume = next(v for v in rendered.pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "runbook-bot-signing"
        assert volume["secret"]["items"] == [{"key": "signing.key", "path": "signing.key"}]
        assert config.signing_key_path.name == "signing.key"


def test_every_replica_signs_with_the_key_from_the_secret(helm: Any) -> None:
    rendered = render(helm, {**POSTGRES_VALUES, "replicaCount": 4})
    env = rendered.env()
    assert env["RUNBOOK_SIGNING_KEY"]["value"] == "/etc/runbook-bot/signing/signing.key"
    mount = next(m for m in rendered.bot["volumeMounts"] if m["name"] == "signing-key")
    assert mount == {
        "name": "signing-key",
        "mountPath": "/etc/runbook-bot/signing",
        "readOnly": True,
    }
    assert 'signed with the key in Secret "runbook-bot-signing"' in rendered.notes
    assert "WARNING" not in rendered.notes
    # Without one, every pod creates its own key in its emptyDir.
    assert (
        "RUNBOOK_SIGNING_KEY" not in render(helm, {"database": POSTGRES_VALUES["database"]}).env()
    )


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_container_is_locked_down(helm: Any, values: dict[str, Any] | None) -> None:
    rendered = render(helm, values)
    pod = rendered.pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == BOT_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["terminationGracePeriodSeconds"] == SHUTDOWN_GRACE_SECONDS

    for container in pod.get("initContainers", []) + pod["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True, container["name"]
        assert sc["runAsUser"] != 0, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        assert "limits" in container["resources"] and "requests" in container["resources"]
        # A read-only root needs a writable scratch directory.
        tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
        volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
        assert "emptyDir" in volume

    assert rendered.bot["securityContext"]["runAsUser"] == BOT_UID


def test_state_lives_on_the_claim_at_runbook_db(helm: Any) -> None:
    rendered = render(helm)
    db = Path(rendered.env()["RUNBOOK_DB"]["value"])
    mount = next(m for m in rendered.bot["volumeMounts"] if m["mountPath"] == str(db.parent))
    volume = next(v for v in rendered.pod["volumes"] if v["name"] == mount["name"])
    claim = rendered.one("PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert not mount.get("readOnly", False)

    ephemeral = render(helm, {"persistence": {"enabled": False}})
    assert ephemeral.of_kind("PersistentVolumeClaim") == []
    assert "LOST AT" in ephemeral.notes

    existing = render(helm, {"persistence": {"existingClaim": "runbook-bot-state"}})
    assert existing.of_kind("PersistentVolumeClaim") == []
    data = next(v for v in existing.pod["volumes"] if v["name"] == mount["name"])
    assert data["persistentVolumeClaim"]["claimName"] == "runbook-bot-state"


@pytest.mark.parametrize("values", [None, POSTGRES_VALUES], ids=["sqlite", "postgresql"])
def test_probes_ask_healthz_and_readyz_on_the_served_port(
    helm: Any, values: dict[str, Any] | None
) -> None:
    rendered = render(helm, values)
    bot = rendered.bot
    ports = {p["name"]: p["containerPort"] for p in bot["ports"]}
    assert ports == {"http": 3000}
    assert rendered.env()["PORT"]["value"] == "3000"
    # Alive while the process serves; ready (given traffic) while it can write its database.
    assert bot["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert bot["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def test_credentials_come_only_from_the_named_secret(helm: Any) -> None:
    env = render(helm, {"secrets": {"existingSecret": "prod-runbook-bot"}}).env()
    assert env.keys() >= CREDENTIALS
    for name in CREDENTIALS:
        assert "value" not in env[name], f"{name} must not be a plain value"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "prod-runbook-bot"
        assert ref["key"] == name
    required = {n for n in CREDENTIALS if not env[n]["valueFrom"]["secretKeyRef"]["optional"]}
    assert required == {"SLACK_BOT_TOKEN", "PAGERDUTY_WEBHOOK_SECRET"}

    env = render(helm, {"secrets": {"keys": {"SLACK_APP_TOKEN": None}}}).env()
    assert "SLACK_APP_TOKEN" not in env


def test_the_chart_sets_only_variables_the_bot_knows(helm: Any) -> None:
    for values in VALUE_SETS.values():
        assert render(helm, values).env().keys() <= KNOWN_ENV


def test_values_yaml_names_secrets_but_holds_no_credential() -> None:
    text = (CHART / "values.yaml").read_text("utf-8")
    values = yaml.safe_load(text)
    assert set(values["secrets"]) == {"existingSecret", "keys"}
    assert set(values["secrets"]["keys"]) == CREDENTIALS
    for ref in values["secrets"]["keys"].values():
        assert set(ref) == {"key", "optional"}
    # Shapes of Slack and PagerDuty credentials, and long random-looking strings.
    assert not re.search(r"xox[abpe]-|xapp-|u\+[A-Za-z0-9_-]{16,}|[A-Za-z0-9+/]{32,}", text)
    # Outside `secrets.keys`, no value is named after a credential either.
    assert not CREDENTIALS & set(_all_keys(values))
    # The database URL may carry a password: only the name of a Secret holding it.
    assert values["database"] == {"existingSecret": "", "secretKey": "url"}
    assert values["signingKey"] == {"existingSecret": "", "secretKey": "signing.key"}
    # (comments may say `postgresql://...`, never name a server)
    assert not re.search(r"postgres(ql)?://[^.\s'\"]", text)


def _all_keys(tree: Any) -> Iterator[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield str(key)
            if key != "keys":
                yield from _all_keys(value)
    elif isinstance(tree, list):
        for item in tree:
            yield from _all_keys(item)


def test_catalog_from_a_chart_configmap_loads_in_the_bot(helm: Any, tmp_path: Path) -> None:
    from bot.catalog.loader import parse_catalog

    files = bundled_catalog_files()
    rendered = render(helm, {"catalog": {"source": "configMap", "configMap": {"files": files}}})
    configmap = rendered.one("ConfigMap")
    assert configmap["data"] == files

    catalog_dir = Path(rendered.env()["RUNBOOK_CATALOG"]["value"])
    mount = next(m for m in rendered.bot["volumeMounts"] if m["mountPath"] == str(catalog_dir))
    assert mount["readOnly"] is True
    volume = next(v for v in rendered.pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    annotations = rendered.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/catalog" in annotations

    # Lay the files out as the kubelet does (a hidden timestamped folder, ..data pointing at
    # it, and one symlink per key) and load them the way the bot will.
    mounted = tmp_path / "catalog"
    hidden = mounted / "..2024_01_01_00_00_00.000000001"
    hidden.mkdir(parents=True)
    for name, text in configmap["data"].items():
        (hidden / name).write_text(text, "utf-8")
    (mounted / "..data").symlink_to(hidden.name)
    for name in configmap["data"]:
        (mounted / name).symlink_to(Path("..data") / name)
    parsed = parse_catalog(mounted)
    assert parsed.files == len(files)
    assert not parsed.has_errors, [str(d) for d in parsed.diagnostics]


def test_existing_catalog_configmap_is_mounted_not_created(helm: Any) -> None:
    rendered = render(helm, VALUE_SETS["existing-configmap+claim"])
    assert rendered.of_kind("ConfigMap") == []
    volume = next(v for v in rendered.pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == "runbook-catalog"
    assert rendered.env()["RUNBOOK_CATALOG"]["value"] == "/catalog"


def test_git_sync_fills_the_catalog_before_the_bot_starts_and_keeps_it_current(
    helm: Any,
) -> None:
    rendered = render(helm, FULL_VALUES)
    pod = rendered.pod
    (init,) = pod["initContainers"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "git-sync")
    for container in (init, sidecar):
        assert container["image"].startswith("registry.k8s.io/git-sync/git-sync:v4.")
        assert f"--repo={GIT_REPO}" in container["args"]
        assert "--ref=v2" in container["args"]
        assert "--link=current" in container["args"]
        assert container["envFrom"] == [{"secretRef": {"name": "catalog-git-https"}}]
        assert {"name": "catalog", "mountPath": "/git"} in container["volumeMounts"]
    assert "--one-time" in init["args"]
    assert "--one-time" not in sidecar["args"]

    assert rendered.env()["RUNBOOK_CATALOG"]["value"] == "/git/current/runbooks"
    bot_mount = next(m for m in rendered.bot["volumeMounts"] if m["name"] == "catalog")
    assert bot_mount == {"name": "catalog", "mountPath": "/git", "readOnly": True}
    ssh = next(v for v in pod["volumes"] if v["name"] == "git-secret")
    assert ssh["secret"]["secretName"] == "catalog-git-ssh"
    assert pod["serviceAccountName"] == "runbook-bot-actions"
    assert pod["automountServiceAccountToken"] is True

    at_root = {"source": "gitSync", "gitSync": {"repo": GIT_REPO, "path": ""}}
    at_root_env = render(helm, {"catalog": at_root}).env()
    assert at_root_env["RUNBOOK_CATALOG"]["value"] == "/git/current"


def test_service_monitor_scrapes_metrics_through_the_service(helm: Any) -> None:
    assert render(helm).of_kind("ServiceMonitor") == []

    rendered = render(helm, FULL_VALUES)
    monitor = rendered.one("ServiceMonitor")
    service = rendered.one("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"] == service["metadata"]["name"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert set(endpoint) == {"port", "path", "interval", "scrapeTimeout"}

    # And the Service reaches the bot's pod and port.
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in rendered.bot["ports"]}


def test_catalog_refresh_commit_and_log_format_reach_the_bot(helm: Any) -> None:
    def config(values: dict[str, Any] | None) -> Config:
        env = render(helm, values).env()
        return Config.from_env({name: e["value"] for name, e in env.items() if "value" in e})

    defaults = config(None)
    assert (defaults.catalog_refresh, defaults.catalog_commit) == (10.0, "")
    assert defaults.log_format == "text"
    commit = "0123456789abcdef0123456789abcdef01234567"
    configmap = config(
        {
            "catalog": {
                "source": "configMap",
                "configMap": {"name": "runbook-catalog"},
                "commit": commit,
                "refreshSeconds": 0,
            },
            "logFormat": "json",
        }
    )
    assert (configmap.catalog_refresh, configmap.catalog_commit) == (0.0, commit)
    assert configmap.log_format == "json"
    # git-sync: no fixed commit; the bot reads it from the synced checkout's directory
    assert "RUNBOOK_CATALOG_COMMIT" not in render(helm, FULL_VALUES).env()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"catalog": {"source": "nfs"}}, "catalog.source must be one of"),
        ({"catalog": {"source": "gitSync"}}, "needs catalog.gitSync.repo"),
        ({"catalog": {"source": "configMap"}}, "needs catalog.configMap.name"),
        ({"secrets": {"existingSecret": ""}}, "secrets.existingSecret must name"),
        (
            {
                "catalog": {
                    "source": "configMap",
                    "configMap": {"files": {"actions/clear-cache.yaml": "id: x\n"}},
                }
            },
            "must be a plain YAML file name",
        ),
        (
            {"catalog": {"source": "gitSync", "gitSync": {"repo": GIT_REPO}, "commit": "abc"}},
            "catalog.commit is for image and configMap catalogs",
        ),
        ({"catalog": {"refreshSeconds": -1}}, "catalog.refreshSeconds must be 0"),
        ({"logFormat": "xml"}, "logFormat must be text or json"),
        (
            {"database": {"url": PG_URL}},
            "database.url: the database URL may carry a password, so it is never a value",
        ),
        ({"database": {"existingSecret": "db", "secretKey": ""}}, "database.secretKey must"),
        ({"signingKey": {"existingSecret": "k", "secretKey": ""}}, "signingKey.secretKey must"),
        (
            {"database": {"existingSecret": "db"}, "replicaCount": 2.5},
            "replicaCount must be a whole number",
        ),
        (
            {
                "kubernetes": {"namespaces": ["payments"]},
                "serviceAccount": {"automountToken": True},
            },
            "give it its own service account",
        ),
        (
            {"kubernetes": {"namespaces": ["payments"]}, "serviceAccount": {"create": True}},
            "needs serviceAccount.automountToken=true",
        ),
        (
            {"kubernetes": {"serviceAccounts": [{"name": "payments-fixer"}]}},
            "needs a name and a namespace",
        ),
    ],
    ids=[
        "unknown-source",
        "git-without-repo",
        "configmap-without-files",
        "no-secret",
        "folder",
        "git-with-fixed-commit",
        "negative-refresh",
        "log-format",
        "database-url-in-values",
        "database-without-key",
        "signing-key-without-key",
        "fractional-replicas",
        "kubernetes-jobs-as-the-default-account",
        "kubernetes-jobs-without-a-token",
        "action-account-without-namespace",
    ],
)
def test_values_that_cannot_work_are_refused(
    helm: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(helm, values)


def test_the_bot_may_run_jobs_in_the_declared_namespaces_and_nothing_more(helm: Any) -> None:
    rendered = render(helm, VALUE_SETS["kubernetes-executor"])
    named = {a["metadata"]["name"]: a for a in rendered.of_kind("ServiceAccount")}
    assert "namespace" not in named["rb-runbook-bot"]["metadata"]  # the release's
    assert rendered.pod["serviceAccountName"] == "rb-runbook-bot"
    assert rendered.pod["automountServiceAccountToken"] is True

    def ours(kind: str) -> list[dict[str, Any]]:
        return [o for o in rendered.of_kind(kind) if o["metadata"]["name"] == "rb-runbook-bot-jobs"]

    roles = ours("Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["payments", "search"]
    jobs_verbs = ["create", "get", "list", "delete"]
    for role in roles:
        assert role["rules"] == [
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": jobs_verbs},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
            {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        ]
    bindings = ours("RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["payments", "search"]
    for binding in bindings:
        assert binding["roleRef"]["name"] == "rb-runbook-bot-jobs"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "rb-runbook-bot", "namespace": "ops"}
        ]


def test_each_action_account_gets_exactly_its_rules(helm: Any) -> None:
    rendered = render(helm, VALUE_SETS["kubernetes-executor"])
    # search-reader exists already (create: false) and has no rules: nothing for it.
    accounts = {
        (a["metadata"].get("namespace", "ops"), a["metadata"]["name"])
        for a in rendered.of_kind("ServiceAccount")
    }
    assert accounts == {("ops", "rb-runbook-bot"), ("payments", "payments-fixer")}
    name = "runbook-action-payments-fixer"
    role = next(r for r in rendered.of_kind("Role") if r["metadata"]["name"] == name)
    assert role["metadata"]["namespace"] == "payments"
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]}
    ]
    binding = next(b for b in rendered.of_kind("RoleBinding") if b["metadata"]["name"] == name)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "payments-fixer", "namespace": "payments"}
    ]
    assert not [r for r in rendered.of_kind("Role") if "search-reader" in r["metadata"]["name"]]


# -- Dockerfile ------------------------------------------------------------------------------


@dataclass
class Instruction:
    name: str
    args: str
    stage: int


def dockerfile() -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        name, _, args = (pending + line).partition(" ")
        pending = ""
        if name.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(name.upper(), args.strip(), stage))
    return instructions


def final_stage() -> list[Instruction]:
    instructions = dockerfile()
    last = instructions[-1].stage
    return [i for i in instructions if i.stage == last]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in instructions:
        if i.name == "ENV":
            for token in shlex.split(i.args):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def test_image_builds_a_wheel_then_installs_only_that() -> None:
    instructions = dockerfile()
    froms = [i.args for i in instructions if i.name == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    (base,) = [i.args for i in instructions if i.name == "ARG" and i.stage == -1]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim(-bookworm)?", base), base

    build = [i.args for i in instructions if i.name == "RUN" and i.stage == 0]
    assert any("pip wheel --no-cache-dir" in r and r.rstrip().endswith(" .") for r in build)
    runs = [i.args for i in final_stage() if i.name == "RUN"]
    install = next(r for r in runs if "pip install" in r)
    assert "--no-cache-dir" in install and "--no-index" in install
    assert "from=build" in install

    args = {i.args.split("=")[0] for i in instructions if i.name == "ARG"}
    assert "SOURCE_DATE_EPOCH" in args


def test_image_runs_as_an_unprivileged_user() -> None:
    stage = final_stage()
    (user,) = [i.args for i in stage if i.name == "USER"]
    uid = user.split(":")[0]
    assert uid == str(BOT_UID)
    assert any(f"--uid {BOT_UID}" in i.args for i in stage if i.name == "RUN")
    # USER comes after every RUN: nothing executes as root once it is set.
    names = [i.name for i in stage]
    assert names.index("USER") > max(n for n, name in enumerate(names) if name == "RUN")


def test_image_layout_matches_the_interface() -> None:
    stage = final_stage()
    env = env_of(stage)
    assert env["RUNBOOK_DB"] == "/data/runbook-bot.db"
    assert env["RUNBOOK_CATALOG"] == "/app/runbooks"
    assert env["PORT"] == "3000"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["RUNBOOK_CATALOG_COMMIT"] == "${CATALOG_COMMIT}"  # the build argument
    assert env.keys() & KNOWN_ENV <= {
        "RUNBOOK_DB",
        "RUNBOOK_CATALOG",
        "RUNBOOK_CATALOG_COMMIT",
        "PORT",
    }

    single = {i.name: i.args for i in stage if i.name not in ("ENV", "RUN", "ARG", "COPY")}
    assert single["WORKDIR"] == "/app"
    assert json.loads(single["VOLUME"]) == ["/data"]
    assert single["EXPOSE"] == "3000"
    assert single["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(single["ENTRYPOINT"]) == ["runbook-bot"]
    copies = [i.args for i in stage if i.name == "COPY"]
    assert "--chown=root:root runbooks /app/runbooks" in copies


def test_image_carries_no_credentials() -> None:
    instructions = dockerfile()
    declared = set(env_of(instructions)) | {
        i.args.partition("=")[0] for i in instructions if i.name == "ARG"
    }
    for name in declared:
        assert name not in CREDENTIALS
        assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", name), name


def test_build_context_holds_what_the_image_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text("utf-8").splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else stays out of the context
    for instruction in dockerfile():
        if instruction.name != "COPY" or "--from" in instruction.args:
            continue
        *sources, _destination = [a for a in instruction.args.split() if not a.startswith("--")]
        for source in sources:
            assert source.rstrip("/") in included, f"{source} is excluded from the context"
            if "*" not in source:
                assert (REPO / source).exists(), source


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _run_healthcheck(port: int) -> int:
    healthcheck = next(i.args for i in final_stage() if i.name == "HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python", "the slim image has no curl: use the standard library"
    env = {"PATH": os.environ.get("PATH", ""), "PORT": str(port)}
    return subprocess.run(
        [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30
    ).returncode


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.slow
def test_healthcheck_passes_only_when_healthz_answers_ok(
    health_server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = health_server.server_address[1]
    assert _run_healthcheck(port) == 0

    monkeypatch.setattr(_Health, "status", 503)
    assert _run_healthcheck(port) != 0

    health_server.shutdown()
    health_server.server_close()
    assert _run_healthcheck(port) != 0


# -- systemd ---------------------------------------------------------------------------------


def unit() -> dict[str, dict[str, list[str]]]:
    """The unit file as section -> key -> every value (Environment= may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_is_hardened() -> None:
    service = {k: v[-1] for k, v in unit()["Service"].items()}
    assert service["DynamicUser"] == "yes" or service.get("User", "root") not in ("", "root")
    for key, expected in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[key] == expected, key
    assert service["ExecStart"].split()[0].endswith("/runbook-bot")
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_keeps_state_and_secrets_where_the_docs_say() -> None:
    service = unit()["Service"]
    assert service["StateDirectory"] == ["runbook-bot"]
    assert service["EnvironmentFile"] == ["/etc/runbook-bot/env"]
    env = dict(pair.split("=", 1) for line in service["Environment"] for pair in shlex.split(line))
    assert env["RUNBOOK_DB"].startswith("/var/lib/runbook-bot/")
    assert env.keys() <= KNOWN_ENV | {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
    assert not env.keys() & CREDENTIALS, "secrets belong in the EnvironmentFile"


def test_stop_grace_is_the_same_everywhere(helm: Any) -> None:
    service = unit()["Service"]
    assert service["TimeoutStopSec"] == [str(SHUTDOWN_GRACE_SECONDS)]
    # SIGTERM to the bot only: steps go on under their supervisors across a restart
    assert service["KillMode"] == ["process"]
    assert render(helm).pod["terminationGracePeriodSeconds"] == SHUTDOWN_GRACE_SECONDS
    values = yaml.safe_load((CHART / "values.yaml").read_text("utf-8"))
    assert values["terminationGracePeriodSeconds"] == SHUTDOWN_GRACE_SECONDS


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this environment's console script.
    installed = Path(sys.executable).parent / "runbook-bot"
    executable = installed if installed.exists() else Path(shutil.which("true") or "/bin/true")
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={executable}", UNIT.read_text("utf-8"), flags=re.M)
    copy = tmp_path / UNIT.name
    copy.write_text(text, "utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # Unknown keys and unparsable values are only warnings, naming the file: fail on them.
    complaints = [line for line in result.stderr.splitlines() if str(copy) in line]
    assert complaints == []


# -- Slack app manifest ----------------------------------------------------------------------


def test_slack_manifest_asks_for_what_the_bot_uses() -> None:
    manifest = yaml.safe_load(SLACK_MANIFEST.read_text("utf-8"))
    assert manifest["display_information"]["name"] == "runbook-bot"
    assert manifest["features"]["bot_user"]["display_name"] == "runbook-bot"
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == {
        "chat:write",
        "reactions:read",
        "reactions:write",
        "channels:history",
        "channels:read",
        "groups:read",
        "groups:history",
        "usergroups:read",
        "users:read",
        "commands",
    }
    assert "user" not in manifest["oauth_config"]["scopes"]
    events = manifest["settings"]["event_subscriptions"]
    assert set(events["bot_events"]) == {"reaction_added", "reaction_removed"}
    assert events["request_url"] == "https://runbook-bot.example.com/slack/events"
    assert manifest["settings"]["socket_mode_enabled"] is False
    interactivity = manifest["settings"]["interactivity"]  # the step buttons
    assert interactivity["is_enabled"] is True
    assert interactivity["request_url"] == events["request_url"]
    (command,) = manifest["features"]["slash_commands"]
    assert command["command"] == "/runbook" and command["url"] == events["request_url"]


# -- docs ------------------------------------------------------------------------------------


def test_readme_covers_every_deployment_step() -> None:
    text = README.read_text("utf-8")
    assert "docker build -f deploy/Dockerfile" in text
    assert "--set secrets.existingSecret=" in text
    assert re.search(r"kubectl (-n \S+ )?create secret generic", text)
    assert "systemctl enable --now runbook-bot" in text
    values = yaml.safe_load((CHART / "values.yaml").read_text("utf-8"))
    for ref in values["secrets"]["keys"].values():
        assert f"--from-literal={ref['key']}=" in text, ref["key"]
    for name in ("SLACK_BOT_TOKEN", "PAGERDUTY_WEBHOOK_SECRET"):
        assert f"{name}=" in text
    assert "one replica" in text.lower()
    # Several replicas on PostgreSQL, and the way there from SQLite.
    assert re.search(r"create secret generic runbook-bot-db \\\n\s+--from-literal=url=", text)
    assert "--set database.existingSecret=runbook-bot-db" in text
    assert "--set signingKey.existingSecret=" in text
    assert "scale deployment/runbook-bot --replicas=0" in text
    assert "runbookctl db migrate-to" in text


def test_readme_migration_pod_copies_the_release_claim_into_the_database_secret(
    helm: Any, tmp_path: Path
) -> None:
    """The Pod that deploy/README.md applies to move from SQLite is valid Kubernetes,
    mounts the claim the chart made for release runbook-bot, reads the URL from the
    Secret the README makes, and runs a runbookctl command line that parses."""
    text = README.read_text("utf-8")
    block = re.search(r"<<'YAML'\n(.*?)\nYAML\n", text, re.S)
    assert block, "the migration Pod is a heredoc ending in YAML"
    pod = yaml.safe_load(block.group(1))
    kubernetes_validate.validate(pod, KUBE_VERSIONS[0], strict=True)

    claim = render(helm, None, release="runbook-bot").one("PersistentVolumeClaim")
    (volume,) = pod["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/data"}]
    (env,) = container["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "runbook-bot-db", "key": "url"}

    # Kubernetes puts the variable's value in place of $(NAME); then click parses it,
    # with the claim's file at a path that exists here.
    sqlite = tmp_path / "runbook-bot.db"
    sqlite.touch()
    given = {f"$({env['name']})": PG_URL, "/data/runbook-bot.db": str(sqlite)}
    program, group_name, command_name, *args = [given.get(a, a) for a in container["command"]]
    assert program == "runbookctl"
    ctx = click.Context(cli)
    group = cli.get_command(ctx, group_name)
    assert isinstance(group, click.Group)
    command = group.get_command(ctx, command_name)
    assert command is not None
    parsed = command.make_context(command_name, args, parent=ctx)
    assert parsed.params == {"url": PG_URL, "sqlite_path": str(sqlite)}
