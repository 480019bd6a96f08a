"""Write k8s/monitoring/grafana-dashboard.yaml from deploy/grafana/flexcache.json (the one source).

    python deploy/grafana/configmap.py           # rewrite the ConfigMap after editing the JSON
    python deploy/grafana/configmap.py --check   # exit 1 if the ConfigMap is not the JSON's (a test runs this)

The ConfigMap carries the JSON verbatim under the key flexcache.json, labelled grafana_dashboard: "1":
the label Grafana's dashboard sidecar (the grafana Helm chart's, kube-prometheus-stack's) watches.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "flexcache.json"
CONFIGMAP = ROOT / "k8s" / "monitoring" / "grafana-dashboard.yaml"

HEADER = """\
# Generated from deploy/grafana/flexcache.json by deploy/grafana/configmap.py: edit the JSON, then rerun it.
# The FlexCache Grafana dashboard, for Grafana's dashboard sidecar (it loads every ConfigMap labelled
# grafana_dashboard: "1"; apply it in the namespace the sidecar watches):
#   kubectl apply -f k8s/monitoring/grafana-dashboard.yaml -n monitoring
# yamllint disable rule:line-length
apiVersion: v1
kind: ConfigMap
metadata:
  name: flexcache-grafana-dashboard
  labels:
    app.kubernetes.io/name: flexcache
    app.kubernetes.io/component: dashboard
    grafana_dashboard: "1"
data:
  flexcache.json: |
"""


def render(dashboard_text: str) -> str:
    body = "".join(f"    {line}".rstrip() + "\n" for line in dashboard_text.splitlines())
    return HEADER + body


def main(argv: list[str]) -> int:
    expected = render(DASHBOARD.read_text())
    if "--check" in argv:
        if not CONFIGMAP.is_file() or CONFIGMAP.read_text() != expected:
            print(f"{CONFIGMAP.relative_to(ROOT)} is not generated from {DASHBOARD.relative_to(ROOT)}: "
                  "run python deploy/grafana/configmap.py", file=sys.stderr)
            return 1
        return 0
    CONFIGMAP.parent.mkdir(parents=True, exist_ok=True)
    CONFIGMAP.write_text(expected)
    print(f"wrote {CONFIGMAP.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
