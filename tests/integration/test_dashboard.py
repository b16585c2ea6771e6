"""The dashboard served by the head: who may read it, its JSON API, and the page in a real browser.

The browser is Debian's headless ``chromium`` (installed by .ci/run): it opens the
one-time link of a live cluster, and the test reads the page it rendered (its DOM,
after the page's own requests ran) and keeps a screenshot.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request

import pytest

import farpool
from farpool._private import dashboard_page
from farpool_testing import TIMEOUT, wait_at_gate, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _get(url, token=None, host=None):
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if host is not None:
        headers["Host"] = host
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def dash():
    farpool.shutdown()
    info = farpool.init(num_cpus=2)
    yield info, info["dashboard_url"].split("?")[0], farpool.api._client().token
    farpool.shutdown()


def test_init_returns_a_loopback_link_and_nothing_is_served_without_the_token(dash):
    info, base, token = dash
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?login=[\w-]+", info["dashboard_url"]), info
    for path in ("", "api/status", "api/tasks", "api/stack", "index.html"):
        code, body = _get(base + path)
        assert code == 401, (path, code)
        assert b"needs the cluster token" in body
    assert _get(base + "api/status", token="not-the-token")[0] == 401
    assert _get(base + "api/status", token=token, host="attacker.example:80")[0] == 403  # DNS rebinding
    code, body = _get(base + "api/nodes", token=token, host=f"localhost:{base.rsplit(':', 1)[1].strip('/')}")
    assert code == 200 and json.loads(body)[0]["node_id"] == info["node_id"]


def test_a_one_time_link_works_once_and_sets_an_httponly_samesite_cookie(dash):
    _, base, _ = dash
    link = farpool.api.runtime.dashboard_url(farpool.api._client())

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as first:
        opener.open(link, timeout=TIMEOUT)
    assert first.value.code == 303
    cookie = first.value.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    value = cookie.split(";")[0]
    req = urllib.request.Request(base + "api/status", headers={"Cookie": value})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as again:
        opener.open(link, timeout=TIMEOUT)
    assert again.value.code == 401


def test_the_json_api_is_the_one_the_cli_uses(dash):
    _, base, token = dash
    farpool.get(farpool.remote(lambda: 1).options(name="dash_api_task").remote(), timeout=TIMEOUT)
    mine = farpool.status()
    code, body = _get(base + "api/status", token=token)
    served = json.loads(body)
    assert code == 200 and [n["node_id"] for n in served["nodes"]] == [n["node_id"] for n in mine["nodes"]]
    assert served["tasks"]["groups"] == mine["tasks"]["groups"]
    code, body = _get(base + "api/tasks?state=FINISHED&name=dash_api_task", token=token)
    assert code == 200 and [t["name"] for t in json.loads(body)] == ["dash_api_task"]
    assert _get(base + "api/tasks?limit=0", token=token)[0] == 400
    assert _get(base + "api/nope", token=token)[0] == 404
    code, body = _get(base + "api/stack", token=token)
    assert code == 200 and json.loads(body)[0]["node_id"] == mine["nodes"][0]["node_id"]


def test_the_page_loads_nothing_from_elsewhere():
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", dashboard_page.PAGE, re.I)
    assert "<script src" not in dashboard_page.PAGE and "@import" not in dashboard_page.PAGE


def test_chromium_shows_the_nodes_and_a_running_task(dash, gate, tmp_path):
    assert CHROMIUM, "Debian's chromium is needed (apt-get install chromium; .ci/run installs it)"
    info, _, _ = dash
    ref = farpool.remote(wait_at_gate).options(name="dash_running_task").remote(gate.path, 1)
    gate.wait_arrivals(1)
    try:
        wait_until(lambda: any(t["name"] == "dash_running_task" for t in farpool.observe.list_tasks(state="RUNNING")),
                   "the gated task known to the head as RUNNING")
        link = farpool.api.runtime.dashboard_url(farpool.api._client())
        shot = tmp_path / "dashboard.png"
        proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000", "--virtual-time-budget=4000",
             "--dump-dom", f"--screenshot={shot}", link],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            dom, _ = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        gate.open()
    assert farpool.get(ref, timeout=TIMEOUT) == 1
    assert proc.returncode == 0
    assert f">{info['node_id'][:8]}<" in dom, dom[-3000:]  # the node table
    rows = re.findall(r"<tr>(?:(?!</tr>).)*dash_running_task(?:(?!</tr>).)*</tr>", dom)
    assert any(">RUNNING<" in row for row in rows), rows  # its row in the task table
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("FARPOOL_DASHBOARD_SCREENSHOT")  # docs: where to keep it (README's image)
    if keep:
        shutil.copyfile(shot, keep)
