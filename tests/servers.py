"""Real servers for the cluster tests, each on this machine, bounded in time and stopped on exit:
a Ray head (`ray start --head`), moto's S3 server, PostgreSQL (Debian's) and MLflow's server.

Each is a context manager; the tests wrap them in fixtures. Processes are started in their own
session and stopped by process group; anything left that names the server's folder is killed by pid.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import requests

BIN = Path(sys.executable).parent  # this venv's scripts: ray, mlflow, restorch


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(ready: Callable[[], bool], *, timeout: float, what: str, process: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    """Poll `ready` until it holds; fail with the server's log tail if it times out or its process exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        exited = process is not None and process.poll() is not None
        if exited or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            state = f"exited with {process.returncode}" if exited else f"not ready after {timeout:.0f} s"
            raise RuntimeError(f"{what} {state}\n{tail}")
        time.sleep(0.5)


def answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
        return True
    except requests.RequestException:
        return False


def stop_process_group(process: subprocess.Popen, *, grace: float = 20) -> None:
    """SIGTERM to the process group started with `process`, SIGKILL after `grace` seconds; then
    SIGKILL to whatever is left in its session (children that moved to a group of their own)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == process.pid:
                proc.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass


def kill_leftovers(marker: str) -> None:
    """Kill (by pid) processes of ours whose command line names `marker` (a server's own folder)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid != os.getpid() and marker in " ".join(proc.info["cmdline"] or ()):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@contextmanager
def started(command: list[str], *, env: dict[str, str], log: Path, marker: str) -> Iterator[subprocess.Popen]:
    """Run `command` in its own session, output to `log`; on exit stop it and whatever names `marker`."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop_process_group(process)
        kill_leftovers(marker)


def ray_env(root: Path) -> dict[str, str]:
    """Environment for a test Ray head and its clients: token auth with a token of its own (not
    ~/.ray/auth_token), this venv first on PATH (the job's `python`), no inherited cluster address."""
    token = root / "auth_token"
    if not token.exists():
        token.write_text(os.urandom(16).hex())
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


NODE_PORT_FLAGS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                   "--runtime-env-agent-port")  # every node's own (Ray's defaults are fixed numbers)


def node_ports() -> list[str]:
    """Free ports for a Ray node's agents, as `ray start` arguments."""
    return [str(part) for flag in NODE_PORT_FLAGS for part in (flag, free_port())]


@contextmanager
def ray_head(root: Path, *, num_cpus: int = 2, resources: dict[str, float] | None = None,
             timeout: float = 120) -> Iterator[str]:
    """`ray start --head --block` with its own temp dir and ports (dashboard on 127.0.0.1); yields the
    dashboard URL (the GCS address is in `root/ray/ray_current_cluster`). `root` should be a short path:
    Ray puts unix sockets under it."""
    ports = {flag: free_port() for flag in ("--port", "--dashboard-port", "--ray-client-server-port")}
    command = [str(BIN / "ray"), "start", "--head", "--block", "--temp-dir", str(root / "ray"),
               "--dashboard-host", "127.0.0.1", "--num-cpus", str(num_cpus), "--disable-usage-stats"]
    command += [str(part) for flag, port in ports.items() for part in (flag, port)] + node_ports()
    command += ["--resources", json.dumps(resources)] if resources else []
    url = f"http://127.0.0.1:{ports['--dashboard-port']}"
    log = root / "ray-head.log"
    with started(command, env=ray_env(root), log=log, marker=str(root / "ray")) as process:
        # Up once `ray start` got to blocking (its raylet registered) and the dashboard answers.
        wait_for(lambda: "block forever" in log.read_text() and answers(f"{url}/api/version"), timeout=timeout,
                 what="ray head", process=process, log=log)
        yield url


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client of the moto server at `endpoint`."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=S3_ENV["AWS_DEFAULT_REGION"],
                        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a thread of this process); yields its endpoint URL. Clients
    need credentials, any will do: S3_ENV."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def postgres_bin(program: str) -> str:
    """A PostgreSQL server program: on PATH, else in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(program) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"))[-1:]), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {program} is not installed: apt-get install -y postgresql (make test and make test-all do as root)")
    return found


def as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run `command` as the postgres user."""
    return ["su", "postgres", "-c", shlex.join(command)] if os.geteuid() == 0 else command


def run_checked(command: list[str], *, timeout: float) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


@contextmanager
def postgres(database: str = "mlflow") -> Iterator[str]:
    """A PostgreSQL cluster initialised in a folder of its own under /tmp, listening on 127.0.0.1 only
    (its unix socket in that folder too), with an empty `database`; yields its SQLAlchemy URI."""
    root = Path(tempfile.mkdtemp(prefix="rt-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port, pg_ctl = root / "data", free_port(), postgres_bin("pg_ctl")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    try:
        run_checked(as_postgres([postgres_bin("initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "--no-sync"]),
                    timeout=120)
        run_checked(as_postgres([pg_ctl, "-D", str(data), "-l", str(root / "postgres.log"), "-o", options, "-w",
                                 "-t", "60", "start"]), timeout=90)
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {database}")
        connection.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"]),
                           capture_output=True, timeout=90)
        kill_leftovers(str(data))
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def tracking_server(root: Path, backend: str, artifacts: str, s3_endpoint: str | None, *,
                    timeout: float = 180) -> Iterator[str]:
    """`restorch tracking up` on 127.0.0.1, with moto's credentials for its S3 artifacts (`s3_endpoint`;
    None: `artifacts` is a folder); yields its URL."""
    port = free_port()
    log = root / "mlflow-server.log"
    command = [str(BIN / "restorch"), "tracking", "up", "--backend", backend, "--artifacts", artifacts,
               "--host", "127.0.0.1", "--port", str(port)]
    command += ["--endpoint-url", s3_endpoint] if s3_endpoint else []
    url = f"http://127.0.0.1:{port}"
    with started(command, env={**os.environ, **S3_ENV}, log=log, marker=f"--port {port} --workers") as process:
        wait_for(lambda: answers(f"{url}/health"), timeout=timeout, what="mlflow server", process=process, log=log)
        yield url


@contextmanager
def shared_tracking(bucket: str) -> Iterator[tuple[str, str, Any, str]]:
    """A team's set-up: moto S3 with `bucket`, PostgreSQL and `restorch tracking up` storing artifacts
    in s3://bucket/mlflow; yields (tracking URL, S3 endpoint, boto3 client, backend URI)."""
    with tempfile.TemporaryDirectory(prefix="rt-team-") as root, moto_s3() as endpoint:
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket=bucket)
        with postgres() as backend, tracking_server(Path(root), backend, f"s3://{bucket}/mlflow", endpoint) as url:
            yield url, endpoint, s3, backend
