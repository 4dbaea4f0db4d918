"""``unibus check`` against the real brokers, as a user runs it on a live URL.

The command runs in its own process against the broker this session started; its JSON
report must show the selected properties held on RabbitMQ, Kafka and NATS JetStream,
and neither its report nor its progress may print the broker's password.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from unibus_contract.provision import Broker

pytestmark = pytest.mark.broker

#: A round trip, a nack's redelivery and the password rule: the paths every adapter has.
PROPERTIES = ("A1", "C2", "F7")
#: The contract suite's test-friendly timings for these brokers (see targets.py).
URL_OPTIONS = {"rabbitmq": "", "kafka": "?session_timeout=2",
               "nats": "?ack_wait=2&heartbeat=0.5"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(URL_OPTIONS))
def test_check_runs_the_contract_on_a_live_broker(request: pytest.FixtureRequest, name: str,
                                                  tmp_path: Path) -> None:
    broker: Broker = request.getfixturevalue(f"{name}_broker")
    url = broker.url + URL_OPTIONS[name]
    script = Path(sys.executable).parent / "unibus"
    done = subprocess.run([str(script), "check", url, "--name", name,
                           "--property", ",".join(PROPERTIES), "--json"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=280,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads(done.stdout)["status"][name]
    assert {p: status[p] for p in PROPERTIES} == dict.fromkeys(PROPERTIES, "held")
    assert all(s == "not run" for p, s in status.items() if p not in PROPERTIES)
    password = urlsplit(url).password
    if password is not None:
        assert f":{password}@" not in done.stdout + done.stderr
