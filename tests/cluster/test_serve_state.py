"""The rules `pagoda serve` follows on a shared Serve instance (`serve_state`, pure): whose an application
is, when a deploy would disturb someone else's, whether Serve's HTTP proxy is where --host/--port
ask, and the URL printed; plus the owner's mark on the ingress that `build_application` sets."""
from __future__ import annotations

import socket

import pytest

from pagoda.cluster import cli as cluster_cli
from pagoda.cluster.app import INGRESS_DEPLOYMENT, ClusterTuning, build_application
from pagoda.cluster.serve_state import (OWNER_ENV, AppOwner, AppState, Hints, ServeState, check_deploy,
                                        check_http_options, owned_by, serve_url)

ME = AppOwner("host-a", 100, "aaaa")
OTHER_PAGODA = AppOwner("host-b", 200, "bbbb")


def _state(*apps: AppState, host: str = "127.0.0.1", port: int = 8000, proxy_ips=("10.0.0.1",)) -> ServeState:
    return ServeState(host, port, {app.name: app for app in apps}, proxy_ips)


def test_the_owner_mark_round_trips_and_nothing_else_parses_as_one():
    assert AppOwner.from_marker(ME.marker()) == ME
    assert AppOwner.this_process() != AppOwner.this_process()      # same pid, another token
    for marker in (None, "", "pagoda-serve", "pagoda-serve host=x pid=nan token=t", "someone pid=1", 42):
        assert AppOwner.from_marker(marker) is None
    assert str(ME) == "`pagoda serve` (pid 100 on host-a)"


def test_build_application_marks_the_ingress_with_its_owner():
    args = {"model": "default", "num_gpus_per_worker": 0}
    ingress = build_application(args, ClusterTuning(), ME)._bound_deployment
    assert ingress.name == INGRESS_DEPLOYMENT
    assert ingress.ray_actor_options["runtime_env"] == {"env_vars": {OWNER_ENV: ME.marker()}}
    assert ingress.ray_actor_options["num_cpus"] == ClusterTuning().ingress_num_cpus
    assert "runtime_env" not in build_application(args, ClusterTuning())._bound_deployment.ray_actor_options


def test_a_free_name_and_route_deploy():
    check_deploy(None, "pagoda", "/", replace=False)
    check_deploy(_state(AppState("other", "/other", "RUNNING")), "pagoda", "/", replace=False)


@pytest.mark.parametrize("owner, who", [(None, "someone else (not `pagoda serve`)"),
                                        (OTHER_PAGODA, "`pagoda serve` (pid 200 on host-b)")])
def test_an_application_of_the_same_name_is_never_replaced_unasked(owner, who):
    state = _state(AppState("pagoda", "/", "RUNNING", owner))
    with pytest.raises(ValueError) as excinfo:
        check_deploy(state, "pagoda", "/", replace=False)
    message = str(excinfo.value)
    assert message.startswith("a Serve application named 'pagoda' already runs on this Ray cluster")
    assert f"deployed by {who}" in message
    assert "--app-name NAME" in message and "--replace" in message
    check_deploy(state, "pagoda", "/", replace=True)        # explicit: allowed
    # a --config file says where to rename
    with pytest.raises(ValueError, match="another `name` in serve.yaml"):
        check_deploy(state, "pagoda", "/", replace=False, hints=Hints(rename="another `name` in serve.yaml"))


def test_another_applications_route_is_never_taken():
    state = _state(AppState("theirs", "/v1", "RUNNING"), AppState("pagoda", "/", "RUNNING", ME))
    with pytest.raises(ValueError, match="route prefix '/v1' is taken by Serve application 'theirs'.*--route-prefix"):
        check_deploy(state, "mine", "/v1", replace=False)
    # --replace takes over a name, never someone else's route
    with pytest.raises(ValueError, match="taken by Serve application 'theirs'"):
        check_deploy(state, "pagoda", "/v1", replace=True)
    check_deploy(state, "pagoda", "/", replace=True)


def test_an_application_still_being_deleted_is_waited_for():
    with pytest.raises(ValueError, match="still being deleted"):
        check_deploy(_state(AppState("pagoda", "/", "DELETING", ME)), "pagoda", "/", replace=True)


def test_serves_http_port_is_honoured_or_named():
    check_http_options(None, "127.0.0.1", 9000)          # no Serve yet: this process starts it
    state = _state(port=8000)
    check_http_options(state, "127.0.0.1", 8000)
    check_http_options(state, "localhost", 8000)
    with pytest.raises(ValueError) as excinfo:
        check_http_options(state, "127.0.0.1", 9000)
    message = str(excinfo.value)
    assert "HTTP proxy on port 8000" in message and "--port 9000 cannot be honoured" in message
    assert "Pass --port 8000" in message


def test_a_port_something_else_listens_on_is_named_before_serve_starts():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(ValueError, match=f"--port {port}: 127.0.0.1:{port} is not free on this machine"):
            cluster_cli._check_port_free("127.0.0.1", port)
    cluster_cli._check_port_free("127.0.0.1", port)       # closed: free again


def test_serves_http_host_must_cover_the_requested_one():
    check_http_options(_state(host="0.0.0.0"), "127.0.0.1", 8000)
    with pytest.raises(ValueError, match="does not listen on --host 0.0.0.0.*Pass --host 127.0.0.1"):
        check_http_options(_state(host="127.0.0.1"), "0.0.0.0", 8000)
    with pytest.raises(ValueError, match="does not listen on --host 10.1.2.3"):
        check_http_options(_state(host="127.0.0.1"), "10.1.2.3", 8000)


def test_only_the_mark_it_set_makes_an_application_its_own():
    assert owned_by(_state(AppState("pagoda", "/", "RUNNING", ME)), "pagoda", ME)
    assert not owned_by(_state(AppState("pagoda", "/", "RUNNING", OTHER_PAGODA)), "pagoda", ME)   # replaced since
    assert not owned_by(_state(AppState("pagoda", "/", "RUNNING", None)), "pagoda", ME)
    assert not owned_by(_state(), "pagoda", ME) and not owned_by(None, "pagoda", ME)
    # same pid and host, another process run: not the same owner
    assert not owned_by(_state(AppState("pagoda", "/", "RUNNING", AppOwner("host-a", 100, "cccc"))), "pagoda", ME)


def test_the_url_is_where_the_proxy_really_listens():
    here = "10.0.0.1"
    assert serve_url(_state(host="127.0.0.1", port=8123), "127.0.0.1", "/", here) == "http://127.0.0.1:8123"
    assert serve_url(_state(host="127.0.0.1", port=8123), "localhost", "/cli", here) == "http://localhost:8123/cli"
    # all interfaces: the requested host, else this node's address
    assert serve_url(_state(host="0.0.0.0"), "127.0.0.1", "/a/", here) == "http://127.0.0.1:8000/a"
    assert serve_url(_state(host="0.0.0.0"), "0.0.0.0", "/", here) == "http://10.0.0.1:8000"
    # joined from elsewhere (ray://): the proxy's node
    assert serve_url(_state(host="0.0.0.0", proxy_ips=("10.0.0.9",)), "127.0.0.1", "/", here) == "http://10.0.0.9:8000"
    assert serve_url(_state(host="::"), "::1", "/", here) == "http://[::1]:8000"


def test_a_config_file_is_told_where_to_rename(tmp_path):
    serve_config = tmp_path / "serve.yaml"
    serve_config.write_text("applications:\n  - name: pagoda\n    import_path: pagoda.cluster.app:build_app\n")
    hints = cluster_cli._config_hints(str(serve_config))
    assert hints == Hints(rename=f"another `name` in {serve_config}", reroute=f"another `route_prefix` in {serve_config}")
    bare = tmp_path / "models.yaml"
    bare.write_text("models: [{model: a}]\n")
    assert cluster_cli._config_hints(str(bare)).rename == "--app-name NAME"
