"""nginx: the load balancer's config, and its loopback rendering checked by `nginx -t`."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.system.deploy_files import DEPLOY, run, tool


def _loopback_module():
    spec = importlib.util.spec_from_file_location("nginx_loopback", DEPLOY / "nginx/loopback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nginx_request_id_map(text: str) -> dict[str, str]:
    """{value of $http_x_request_id: id sent upstream} from the one map that makes it."""
    [body] = re.findall(r"map \$http_x_request_id \$lamina_request_id \{([^}]*)\}", text)
    entries = [line.strip().rstrip(";").split() for line in body.strip().splitlines()]
    return {key: value for key, value in entries}


def test_nginx_passes_the_clients_request_id():
    # A client's X-Request-Id goes through unchanged; nginx makes one only when absent.
    # (test_load_balancer.py proves it on a running nginx.)
    text = (DEPLOY / "nginx/nginx.conf").read_text()
    assert _nginx_request_id_map(text) == {
        "default": "$http_x_request_id",
        '""': "$request_id",
    }
    sent = re.findall(r"proxy_set_header\s+X-Request-Id\s+([^;]*);", text)
    assert sent == ["$lamina_request_id"]
    assert '"request_id":"$lamina_request_id"' in text  # the access log's id is the same


def test_nginx_config_is_made_for_streaming():
    text = (DEPLOY / "nginx/nginx.conf").read_text()
    assert re.search(r"upstream lamina \{[^}]*least_conn;", text)
    assert "proxy_buffering off;" in text and "proxy_http_version 1.1;" in text
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", text)
    assert read_timeout and int(read_timeout.group(1)) >= 300
    retry_on = re.search(r"proxy_next_upstream ([^;]*);", text).group(1).split()
    assert {"error", "timeout", "http_502", "http_503"} <= set(retry_on)


def test_nginx_loopback_config_passes_nginx_t(tmp_path):
    nginx = tool("nginx")
    loopback = _loopback_module()
    config = loopback.write_loopback_config(tmp_path, 18080, ["127.0.0.1:18001", "127.0.0.1:18002"])
    text = config.read_text()
    assert "server 127.0.0.1:18001 max_fails=1 fail_timeout=5s;" in text
    assert "lamina:8000" not in text and "resolver" not in text
    source = (DEPLOY / "nginx/nginx.conf").read_text()
    assert _nginx_request_id_map(text) == _nginx_request_id_map(source)
    assert "proxy_set_header X-Request-Id $lamina_request_id;" in text
    run([nginx, "-t", "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log")])


def test_nginx_loopback_render_refuses_a_config_it_does_not_understand(tmp_path):
    loopback = _loopback_module()
    source = (DEPLOY / "nginx/nginx.conf").read_text().replace("listen 80;", "listen 81;")
    with pytest.raises(ValueError, match="listen 80"):
        loopback.render_loopback_config(source, 18080, ["127.0.0.1:1"], tmp_path)


def _without_leading_comments(text: str) -> str:
    lines = text.splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(lines)


def test_nginx_session_variant_differs_only_in_balancing():
    # The session-affinity config is nginx.conf with the upstream hashed on a session key.
    plain = (DEPLOY / "nginx/nginx.conf").read_text()
    session = (DEPLOY / "nginx/nginx-session.conf").read_text()
    session_map = re.search(
        r"\n *# The session key:[^\n]*\n"
        r" *map \$http_x_session_id \$lamina_session_key \{([^}]*)\}\n\n",
        session,
    )
    assert session_map, "the map from X-Session-Id to the hash key is missing"
    entries = [
        line.strip().rstrip(";").split() for line in session_map.group(1).strip().splitlines()
    ]
    assert dict(entries) == {"default": "$http_x_session_id", '""': "$lamina_request_id"}
    assert re.search(r"upstream lamina \{[^}]*hash \$lamina_session_key consistent;", session)
    rebuilt = session.replace(session_map.group(0), "\n").replace(
        "hash $lamina_session_key consistent;", "least_conn;"
    )
    assert _without_leading_comments(rebuilt) == _without_leading_comments(plain)


def test_nginx_session_loopback_config_passes_nginx_t(tmp_path):
    nginx = tool("nginx")
    loopback = _loopback_module()
    config = loopback.write_loopback_config(
        tmp_path, 18080, ["127.0.0.1:18001", "127.0.0.1:18002"], DEPLOY / "nginx/nginx-session.conf"
    )
    assert "hash $lamina_session_key consistent;" in config.read_text()
    run([nginx, "-t", "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log")])


def test_the_readmes_proxy_example_passes_nginx_t(tmp_path):
    """README's 'Behind a proxy of your own' block, inside an http block, is valid nginx
    and keeps what streaming needs."""
    nginx = tool("nginx")
    readme = (DEPLOY.parent / "README.md").read_text()
    [block] = re.findall(r"^```nginx\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    assert "proxy_buffering off;" in block and "proxy_http_version 1.1;" in block
    config = tmp_path / "nginx.conf"
    config.write_text(f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n{block}}}\n")
    run([nginx, "-t", "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log")])
