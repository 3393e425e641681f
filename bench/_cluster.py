"""Replicas of the service behind nginx: the set-up docs/SCALING.md describes, on loopback, for the replica
test and the scaling bench.

nginx (Debian's ``nginx-light``) runs in the foreground from a prefix of its own (config, pid, logs, temp
files), so it needs no system configuration and leaves nothing behind. Each answer says which replica served
it in an ``X-Replica`` header (nginx's ``$upstream_addr``; after a failover it lists every address tried).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bench._servers import Server, free_port

CONFIG = """\
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream llm {{
        {balance}
{servers}
    }}
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;         # websockets
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_buffering off;                            # tokens as they come
            proxy_read_timeout 600s;
            proxy_next_upstream error timeout;              # a replica that is down: the next one
            add_header X-Replica $upstream_addr always;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        raise RuntimeError("nginx is not installed: run `make test-deps` (Debian package nginx-light)")
    return found


class Nginx(Server):
    """nginx on a free port in front of ``replicas`` (round robin, or ``balance``: e.g. ``least_conn;``), ready
    once ``/health`` answers through it; its prefix is removed when it stops."""

    def __init__(self, replicas: list[Server], balance: str = ""):
        self.prefix = Path(tempfile.mkdtemp(prefix="llm-nginx-"))
        port = free_port()
        servers = "\n".join(f"        server 127.0.0.1:{r.port} max_fails=1 fail_timeout=30s;" for r in replicas)
        user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the prefix's temp folders
        config = self.prefix / "nginx.conf"
        config.write_text(CONFIG.format(user=user, prefix=self.prefix, balance=balance, servers=servers, port=port))
        super().__init__("nginx", [nginx_binary(), "-p", str(self.prefix), "-c", str(config)], dict(os.environ),
                         port, "/health")

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            shutil.rmtree(self.prefix, ignore_errors=True)
