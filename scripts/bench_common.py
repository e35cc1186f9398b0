"""Helpers the benchmark scripts share: the operator API over pinned TLS, starting and stopping
the control plane and an agent from release binaries, percentiles."""

import glob
import shutil
import tempfile
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "bench"


def log(msg):
    print(f"[{PREFIX}] {msg}", file=sys.stderr, flush=True)


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


class Api:
    """The operator API over TLS with the CA pinned."""

    def __init__(self, port, data_dir):
        self.port = port
        self.token = open(os.path.join(data_dir, "admin.token")).read().strip()
        self.ctx = ssl.create_default_context(cafile=os.path.join(data_dir, "ca.crt"))
        self.conn = None

    def call(self, method, path, body=None):
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection("localhost", self.port, context=self.ctx, timeout=60)
            try:
                headers = {"authorization": f"Bearer {self.token}", "content-type": "application/json"}
                self.conn.request(method, path, body=json.dumps(body) if body is not None else None,
                                  headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                if r.status >= 300:
                    raise RuntimeError(f"{method} {path}: HTTP {r.status}: {data[:300]!r}")
                return json.loads(data) if data else None
            except (http.client.HTTPException, ConnectionError):
                self.conn = None
                if attempt:
                    raise


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_haproxy(tmp, ports, ca_file, conns=1024):
    """HAProxy in TCP mode in front of control plane replicas (TLS passes through), checking
    each one's /v1/health over TLS with the control plane's CA: the configuration
    docs/scaling.md gives. Returns the process and the front port on 127.0.0.1. It holds two
    descriptors per connection: the file-descriptor limit must exceed 2 * conns."""
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(exe):
        raise RuntimeError("HAProxy is not installed (apt-get install haproxy)")
    front = free_port()
    servers = "".join(f"    server r{i} 127.0.0.1:{port} check check-ssl verify required ca-file {ca_file}\n"
                      for i, port in enumerate(ports))
    config = (f"global\n    maxconn {conns}\n"
              f"defaults\n    mode tcp\n    maxconn {conns}\n    timeout connect 1s\n    timeout client 60s\n"
              "    timeout server 60s\n    retries 3\n    option redispatch\n"
              f"frontend outpost\n    bind 127.0.0.1:{front}\n    default_backend replicas\n"
              "backend replicas\n    balance roundrobin\n    option httpchk GET /v1/health\n"
              "    http-check expect status 200\n    default-server inter 500ms fall 2 rise 1\n" + servers)
    path = os.path.join(tmp, f"haproxy-{front}.cfg")
    with open(path, "w") as f:
        f.write(config)
    p = subprocess.Popen([exe, "-db", "-f", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", front)) == 0:
                break
        if time.time() > deadline or p.poll() is not None:
            raise RuntimeError("HAProxy did not start")
        time.sleep(0.1)
    time.sleep(1.5)  # its first health checks
    return p, front


def start_control(bin_dir, data_dir, extra=()):
    p = subprocess.Popen([os.path.join(bin_dir, "outpost-control"), "serve", "--listen", "127.0.0.1:0",
                          "--data-dir", data_dir, *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    line = p.stdout.readline()
    m = re.search(r"https://[^ ]*:(\d+) \(CA sha256 ([0-9a-f]+)\)", line)
    if not m:
        p.kill()
        raise RuntimeError(f"unexpected control plane output: {line!r}")
    return p, int(m.group(1)), m.group(2)


def start_node(bin_dir, config):
    p = subprocess.Popen([os.path.join(bin_dir, "outpost"), "--config", config, "run"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, RUST_LOG="info"))
    for line in p.stderr:
        if "outpost agent ready" in line:
            ready = time.time()
            break
    else:
        raise RuntimeError("the agent exited before it was ready")
    # Keep draining its log so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p, ready


def smaps_mb(pid, field):
    """A field of /proc/PID/smaps_rollup (Pss, Anonymous, ...) in MB."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()


class Postgres:
    """A PostgreSQL server of the benchmark's own: initdb into a temporary directory, a unix
    socket there, no TCP,
    durable commits (fsync on, as the embedded store flushes every write). As root it runs as
    the `postgres` user, which refuses root."""

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        if not bins:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = os.path.dirname(bins[-1])
        # A directory of its own: the server's user must reach it (a root-only parent would not do).
        directory = tempfile.mkdtemp(prefix="outpost-bench-pg-")
        self.dir = directory
        self.user = None
        if os.geteuid() == 0:
            import pwd
            self.user = "postgres"
            pw = pwd.getpwnam("postgres")
            os.chown(directory, pw.pw_uid, pw.pw_gid)
        data = os.path.join(directory, "data")
        subprocess.run([os.path.join(self.bin, "initdb"), "--no-sync", "--auth=trust", "-U", "outpost",
                        "--encoding=UTF8", "--locale=C", "-D", data], check=True, user=self.user,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.proc = subprocess.Popen([os.path.join(self.bin, "postgres"), "-D", data, "-k", directory,
                                      "-c", "listen_addresses=", "-c", "max_connections=400",
                                      "-c", "shared_buffers=128MB"],
                                     user=self.user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"host={directory} port=5432 user=outpost dbname=postgres"
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(directory, ".s.PGSQL.5432")):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("PostgreSQL did not start")
            time.sleep(0.1)
        time.sleep(0.5)

    def cpu_seconds(self):
        """CPU used so far by the server and every backend (utime + stime of each process)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in [self.proc.pid] + children(self.proc.pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
        return total / tick

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def children(parent):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(") ", 1)[1].split()[1]) == parent:
                    out.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return out
