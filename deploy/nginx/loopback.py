"""Render deploy/nginx/nginx.conf for lamina replicas on this machine (no Docker, no root).

The compose file runs nginx.conf as is; this script derives the same configuration for
replicas listening on loopback ports, with every file nginx writes kept in one
folder. The load-balancer system test uses it, and so can a developer:

    python deploy/nginx/loopback.py --listen 8080 --replica 127.0.0.1:8001 \
        --replica 127.0.0.1:8002 --workdir /tmp/lb > /tmp/lb/nginx.conf
    nginx -p /tmp/lb -c /tmp/lb/nginx.conf -e /tmp/lb/error.log

`--source deploy/nginx/nginx-session.conf` renders the session-affinity variant.

Only what must differ is rewritten (upstream servers, listen address, file paths);
each rewrite insists on matching exactly once, so a change to nginx.conf that this
script would silently miss fails loudly instead.
"""

from __future__ import annotations

import argparse
import getpass
import grp
import os
import re
import sys
from pathlib import Path

DEPLOY_CONFIG = Path(__file__).resolve().parent / "nginx.conf"

# The one upstream line of nginx.conf: `server lamina:8000 resolve <params>;`.
_UPSTREAM_SERVER = re.compile(r"^(\s*)server\s+lamina:8000\b([^;]*);", re.MULTILINE)
_RESOLVER = re.compile(r"^\s*resolver\s[^;]*;\n", re.MULTILINE)
_LISTEN = re.compile(r"^(\s*)listen\s+80;", re.MULTILINE)
_ACCESS_LOG = re.compile(r"^(\s*)access_log\s+/var/log/nginx/access\.log\b", re.MULTILINE)
_HTTP_OPEN = re.compile(r"^http\s*\{\n", re.MULTILINE)
_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def _sub_once(pattern: re.Pattern[str], replacement, text: str, what: str) -> str:
    result, count = pattern.subn(replacement, text)
    if count != 1:
        raise ValueError(f"nginx.conf: expected exactly one {what}, found {count}")
    return result


def _replica_lines(indent: str, params: str, replicas: list[str]) -> str:
    # `resolve` needs a DNS resolver and nginx >= 1.27.3; loopback addresses need neither.
    kept = " ".join(p for p in params.split() if p != "resolve")
    return "\n".join(f"{indent}server {addr} {kept};".rstrip() for addr in replicas)


def _user_directive() -> str:
    """Workers run as the invoking user; only a root master may (and must) say so."""
    if os.geteuid() != 0:
        return ""
    return f"user {getpass.getuser()} {grp.getgrgid(os.getegid()).gr_name};\n"


def render_loopback_config(
    source: str, listen_port: int, replicas: list[str], workdir: Path, listen_host="127.0.0.1"
) -> str:
    """nginx.conf text for `replicas` ("host:port") behind nginx on listen_host:listen_port.

    pid, error log, access log and temp folders all live in `workdir`.
    """
    if not replicas:
        raise ValueError("at least one replica is needed")
    workdir = Path(workdir)
    text = _sub_once(
        _UPSTREAM_SERVER,
        lambda m: _replica_lines(m.group(1), m.group(2), replicas),
        source,
        "`server lamina:8000` upstream line",
    )
    text = _sub_once(_RESOLVER, "", text, "resolver directive")
    text = _sub_once(_LISTEN, rf"\g<1>listen {listen_host}:{listen_port};", text, "`listen 80`")
    text = _sub_once(_ACCESS_LOG, rf"\g<1>access_log {workdir}/access.log", text, "access_log")
    temp_paths = "".join(f"    {name}_temp_path {workdir}/{name};\n" for name in _TEMP_DIRS)
    text = _sub_once(_HTTP_OPEN, lambda m: m.group(0) + temp_paths, text, "http block")
    header = (
        "# Rendered by deploy/nginx/loopback.py from deploy/nginx/nginx.conf.\n"
        f"{_user_directive()}"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log notice;\n"
        "daemon off;\n"
    )
    return header + text


def write_loopback_config(
    workdir: Path, listen_port: int, replicas: list[str], source_path: Path = DEPLOY_CONFIG
) -> Path:
    """Render into workdir/nginx.conf (and create the temp folders); return its path."""
    workdir = Path(workdir)
    for name in _TEMP_DIRS:
        (workdir / name).mkdir(parents=True, exist_ok=True)
    config_path = workdir / "nginx.conf"
    text = render_loopback_config(source_path.read_text(), listen_port, replicas, workdir)
    config_path.write_text(text)
    return config_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True, help="loopback port for nginx")
    parser.add_argument("--replica", action="append", required=True, help="host:port")
    parser.add_argument("--workdir", type=Path, required=True, help="pid, logs, temp files")
    parser.add_argument(
        "--source", type=Path, default=DEPLOY_CONFIG, help="the config to render (nginx.conf)"
    )
    args = parser.parse_args(argv)
    sys.stdout.write(
        render_loopback_config(
            args.source.read_text(), args.listen, args.replica, args.workdir.resolve()
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
