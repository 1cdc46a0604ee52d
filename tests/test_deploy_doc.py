"""docs/DEPLOY.md's manifest stays true: it parses as Kubernetes YAML, and the serve arguments it gives are options
`olmoscope serve` has, probing the routes the server has (checked against the app itself)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from olmoscope.serve import serve_command as serve

DOC = Path(__file__).resolve().parents[1] / "docs" / "DEPLOY.md"


def manifest() -> list[dict]:
    block = re.search(r"```yaml\n(.*?)```", DOC.read_text(), re.S).group(1)
    return list(yaml.safe_load_all(block))


def test_the_manifest_is_a_deployment_and_a_service_whose_args_serve_accepts():
    deployment, service = manifest()
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "serve"
    flags = {flag for param in serve.params for flag in param.opts}
    given = [a for a in args if a.startswith("--")]
    assert given and not set(given) - flags, f"options serve does not have: {set(given) - flags}"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert float(args[args.index("--shutdown-timeout") + 1]) < grace, "the pod must outlive the shutdown timeout"
