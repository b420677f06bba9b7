"""Start a real `tritonserver` on a sora-triton repository without a Triton container: the server binary and Python
backend that the `nvidia-pytriton` wheel ships (Linux x86-64; it has no onnxruntime backend, so write the repository
with `sora-triton --python-engines`).

    python -m soraedge.cli.triton_serve REPO [--http-port 8000 --grpc-port 8001 --metrics-port 8002]

What it takes to run that binary outside pytriton (found here, Python 3.11): its Python-backend stub for this
Python's minor version copied into a backend folder of its own (pytriton ships one stub per version), the wheel's
bundled libraries on LD_LIBRARY_PATH, and this interpreter's site-packages on PYTHONPATH. The stub embeds the
system's libpython and its standard library (3.11.2 on Debian 12) and ignores PYTHONPATH itself; the generated
model.py files add it to sys.path (serve/bls.py). `start_server` is what the server test uses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

import click

from ..runtime.errors import SoraError
from .common import cli_errors


def _pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError:
        raise SoraError("no tritonserver here: pip install nvidia-pytriton (or run a Triton container)") from None
    return Path(pytriton.__file__).parent


def _libs_dir() -> Path:
    """The shared libraries the wheel bundles for the server and the stub."""
    return _pytriton_dir().parent / "nvidia_pytriton.libs"


def _stub(dist: Path) -> Path:
    return dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"


def missing_libraries() -> list[str]:
    """Shared libraries the Python-backend stub for this Python needs and cannot find (libpython3.X.so comes
    from the system: `apt install libpython3.11` on Debian), by `ldd`; [] when it would load."""
    stub = _stub(_pytriton_dir() / "tritonserver")
    env = dict(os.environ, LD_LIBRARY_PATH=str(_libs_dir()))
    out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=env).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def server_command(repo: Path, work: Path, http_port: int, grpc_port: int, metrics_port: int,
                   address: str = "0.0.0.0") -> tuple[list, dict]:
    """(argv, environment) that run pytriton's tritonserver on `repo`, listening on `address`; `work` receives
    the backend folder."""
    dist = _pytriton_dir() / "tritonserver"
    stub = _stub(dist)
    if not stub.is_file():
        raise SoraError(f"nvidia-pytriton has no Python-backend stub for Python {sys.version_info[0]}."
                        f"{sys.version_info[1]}")
    if missing := missing_libraries():
        raise SoraError(f"the Python-backend stub cannot load {', '.join(missing)} (install the system's "
                        f"libpython{sys.version_info[0]}.{sys.version_info[1]})")
    backends = work / "backends"
    shutil.copytree(dist / "backends", backends, dirs_exist_ok=True)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(_libs_dir()), env.get("LD_LIBRARY_PATH")) if p)
    site = sysconfig.get_paths()["purelib"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
    argv = [str(dist / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory",
            str(backends), "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port",
            str(metrics_port), "--http-address", address, "--grpc-address", address, "--allow-metrics", "false",
            "--exit-timeout-secs", "10"]
    return argv, env


def wait_ready(http_port: int, process: subprocess.Popen, timeout_s: float) -> None:
    """Poll /v2/health/ready until the server (and every model) is ready; SoraError if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SoraError(f"tritonserver exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SoraError(f"tritonserver was not ready within {timeout_s:.0f} s")


def start_server(repo: Path, http_port: int, grpc_port: int, metrics_port: int, log: Path,
                 timeout_s: float = 120.0) -> subprocess.Popen:
    """Start the server listening on loopback only, wait until it is ready, and return the process (stop it with
    `stop_server`). Its output goes to `log`."""
    work = Path(tempfile.mkdtemp(prefix="soraedge-triton-"))
    argv, env = server_command(repo, work, http_port, grpc_port, metrics_port, address="127.0.0.1")
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    process.work = work  # removed by stop_server
    try:
        wait_ready(http_port, process, timeout_s)
    except BaseException:
        stop_server(process)
        raise
    return process


def stop_server(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    shutil.rmtree(getattr(process, "work", ""), ignore_errors=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("repo", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@cli_errors
def main(repo, http_port, grpc_port, metrics_port):
    """Run tritonserver on REPO in the foreground (Ctrl-C stops it)."""
    work = Path(tempfile.mkdtemp(prefix="soraedge-triton-"))
    try:
        argv, env = server_command(repo, work, http_port, grpc_port, metrics_port)
        sys.exit(subprocess.call(argv, env=env))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
