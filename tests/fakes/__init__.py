"""Stand-ins for the services runbook-bot talks to: real HTTP servers on 127.0.0.1.

- `FakeSlack`: the Slack Web API. ``WebClient(token=..., base_url=slack.api_url)``.
- `FakePagerDuty`: the PagerDuty REST API v2, over HTTPS.
  ``RestApiV2Client(key, default_from=..., base_url=pd.url, verify=pd.client_ssl_context())``.
- `FakeKubernetes`: the Jobs, Pods and pod logs of the Kubernetes API, whose Jobs' commands
  really run as local processes.
  ``ApiClient(Configuration(host=kube.url))``.
- `TcpProxy`: a TCP relay to a server (PostgreSQL) that a test can cut and restore: one
  client's network path failing while the server stays up.

Both record every call (`Call`), can wait for calls, queue faults (429 with
``Retry-After``, 500) and add latency; see `FakeServer`.
"""

from .base import ANY, Call, FakeServer
from .kube_api import FakeKubernetes
from .pagerduty_api import FakePagerDuty, make_alert, make_incident
from .slack_api import FakeSlack, visible_text
from .tcp_proxy import TcpProxy

__all__ = [
    "ANY",
    "Call",
    "FakeKubernetes",
    "FakePagerDuty",
    "FakeServer",
    "FakeSlack",
    "TcpProxy",
    "make_alert",
    "make_incident",
    "visible_text",
]
