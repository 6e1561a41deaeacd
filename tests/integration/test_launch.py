"""Tests for the launch scripts (launch/tpu.sh, launch/gpu.sh).

Nothing here talks to a cloud or a cluster: the scripts run with --dry-run, or
with fake gcloud/scontrol/srun/python executables first on PATH.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TPU = ROOT / "launch" / "tpu.sh"
GPU = ROOT / "launch" / "gpu.sh"
BASH = shutil.which("bash")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(BASH is None, reason="bash not available")]

CONFIG = "--config=configs/imagenet.py:821m"
WORKDIR = "--workdir=gs://my-bucket/ctxrq/821m"


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture()
def fakebin(tmp_path: Path) -> Path:
    """A bin dir whose `gcloud` records each call (one argv per call, NUL separated)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_exe(
        bindir / "gcloud",
        '#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done >> "$GCLOUD_LOG"\n'
        'printf "\\n" >> "$GCLOUD_LOG"\n',
    )
    return bindir


def _env(tmp_path: Path, bindir: Path | None = None, **extra: str) -> dict[str, str]:
    env = {
        "PATH": (f"{bindir}{os.pathsep}" if bindir else "") + os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "LC_ALL": "C",
        "GCLOUD_LOG": str(tmp_path / "gcloud.log"),
    }
    env.update(extra)
    return env


def _run(script: Path, *args: str, env: dict[str, str], stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(script), *args], env=env, stdin=stdin, capture_output=True, text=True, timeout=60
    )


def _commands(stdout: str) -> list[list[str]]:
    """The argv of every '+ ' line of a dry run."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _gcloud_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "gcloud.log"
    if not log.exists():
        return []
    calls = []
    for record in log.read_text().split("\n"):
        if record:
            calls.append(record.split("\0")[:-1])
    return calls


def _flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


# ----------------------------------------------------------------- shellcheck


@pytest.mark.parametrize("script", [TPU, GPU], ids=["tpu.sh", "gpu.sh"])
def test_shellcheck_clean(script: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    result = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_sbatch_script_is_shellcheck_clean(tmp_path: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    out = _run(GPU, "slurm", "--dry-run", "-N", "2", "-G", "4", CONFIG, env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(_sbatch_script(out.stdout))
    result = subprocess.run([shellcheck, "-s", "bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", [TPU, GPU], ids=["tpu.sh", "gpu.sh"])
def test_help(script: Path, tmp_path: Path) -> None:
    out = _run(script, "-h", env=_env(tmp_path))
    assert out.returncode == 0
    assert "Usage:" in out.stdout and "--dry-run" in out.stdout


# ----------------------------------------------------------------- tpu.sh


def test_tpu_create_dry_run(tmp_path: Path, fakebin: Path) -> None:
    out = _run(
        TPU, "create", "--name", "ctxrq-test", "--zone=us-central2-b", "-t", "v4-32", "--spot",
        "--project", "my-proj", "--dry-run", env=_env(tmp_path, fakebin),
    )
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ctxrq-test"]
    assert _flag(cmd, "--zone") == "us-central2-b"
    assert _flag(cmd, "--accelerator-type") == "v4-32"
    assert _flag(cmd, "--version") == "tpu-ubuntu2204-base"
    assert _flag(cmd, "--project") == "my-proj"
    assert "--spot" in cmd and "--preemptible" not in cmd
    assert _gcloud_calls(tmp_path) == []  # a dry run never calls gcloud


def test_tpu_options_from_env_and_version_default(tmp_path: Path) -> None:
    env = _env(tmp_path, TPU_NAME="envtpu", TPU_ZONE="europe-west4-a", TPU_TYPE="v5p-64")
    out = _run(TPU, "create", "--preemptible", "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert cmd[5] == "envtpu"
    assert _flag(cmd, "--zone") == "europe-west4-a"
    assert _flag(cmd, "--accelerator-type") == "v5p-64"
    assert _flag(cmd, "--version") == "v2-alpha-tpuv5"
    assert "--preemptible" in cmd


def test_tpu_queued_create_and_delete(tmp_path: Path) -> None:
    env = _env(tmp_path)
    out = _run(TPU, "create", "-n", "q1", "-z", "us-east5-a", "-t", "v6e-16", "--queued", "--spot", "--dry-run",
               env=env)
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "q1"]
    assert _flag(cmd, "--node-id") == "q1"
    assert _flag(cmd, "--runtime-version") == "v2-alpha-tpuv6e"
    assert "--spot" in cmd
    out = _run(TPU, "delete", "-n", "q1", "-z", "us-east5-a", "--queued", "--yes", "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "q1"]
    assert "--force" in cmd and "--quiet" in cmd


def test_tpu_setup_local_source_dry_run(tmp_path: Path) -> None:
    out = _run(TPU, "setup", "-n", "ctxrq-test", "-z", "us-central2-b", "--dry-run", env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    tar, scp, ssh = _commands(out.stdout)
    assert tar[0] == "tar" and str(ROOT) in tar
    assert {"--exclude=./runs", "--exclude=./workdir*", "--exclude=./build"} <= set(tar)  # never a local run
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in scp and "ctxrq-test:ctxrq_jax_src.tar.gz" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ctxrq-test"]
    assert "--worker=all" in ssh and _flag(ssh, "--zone") == "us-central2-b"
    remote = _flag(ssh, "--command")
    assert "pip install -e '.[tpu]'" in remote
    assert "tar -xzf" in remote
    _bash_syntax_ok(remote)


def test_tpu_setup_git_source_dry_run(tmp_path: Path) -> None:
    url = "https://github.com/example/ctxrq_jax.git"
    out = _run(TPU, "setup", "-n", "t", "-z", "z", "--repo", url, "--ref", "v1", "--dry-run", env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    (ssh,) = _commands(out.stdout)  # nothing copied from here
    assert "--worker=all" in ssh
    remote = _flag(ssh, "--command")
    assert f"git clone --depth 1 {url}" in remote and "fetch --depth 1 origin v1" in remote
    assert "pip install -e '.[tpu]'" in remote
    _bash_syntax_ok(remote)


def test_tpu_train_dry_run_passes_args(tmp_path: Path) -> None:
    out = _run(
        TPU, "train", "-n", "ctxrq-test", "-z", "us-central2-b", CONFIG, WORKDIR, "--dry-run",
        "-e", "TFDS_DATA_DIR=gs://my-bucket/tfds", "--", "--config.batch_size=64", env=_env(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    (ssh,) = _commands(out.stdout)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ctxrq-test"]
    assert "--worker=all" in ssh
    remote = _flag(ssh, "--command")
    assert "python -m ctxrq_jax.train " in remote
    assert CONFIG in remote and WORKDIR in remote and "--config.batch_size=64" in remote
    assert "TFDS_DATA_DIR=gs://my-bucket/tfds" in remote
    # Every worker joins the job: a TPU VM exports nothing that says it is one host of several.
    assert "env CTXRQ_DISTRIBUTED=1 " in remote
    assert "tee -a" in remote  # streamed and kept in a log
    _bash_syntax_ok(remote)


def test_tpu_train_remote_command_runs(tmp_path: Path) -> None:
    """Execute the generated remote command locally against a fake venv python."""
    out = _run(
        TPU, "train", "-n", "t", "-z", "z", "-m", "ctxrq_jax.train_rqvae", "--dry-run",
        "--", "--config=configs/rqvae_imagenet.py", "--workdir=gs://b/it's a dir", env=_env(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    remote = _flag(_commands(out.stdout)[0], "--command")
    (tmp_path / "ctxrq_jax").mkdir()
    venv_bin = tmp_path / "ctxrq_venv" / "bin"
    venv_bin.mkdir(parents=True)
    _write_exe(venv_bin / "python", '#!/bin/sh\nprintf "[%s]" "$@"; echo\n')
    result = subprocess.run([BASH, "-c", remote], env=_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    expected = "[-m][ctxrq_jax.train_rqvae][--config=configs/rqvae_imagenet.py][--workdir=gs://b/it's a dir]"
    assert expected in result.stdout
    assert expected in (tmp_path / "ctxrq_train.log").read_text()


def test_tpu_readme_multi_host_encode(tmp_path: Path, fakebin: Path) -> None:
    """The README's multi-host encode runs `encode` with the workers' venv Python in the copied checkout (where the
    relative --config is), as the training does, and needs no --workdir; no README line runs a bare `python` over
    ssh."""
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    (line,) = [l for l in readme.splitlines()
               if l.strip().startswith("launch/tpu.sh train") and "ctxrq_jax.encode" in l]
    words = shlex.split(line)
    split = words.index("--")
    out = _run(TPU, *words[1:split], "--dry-run", *words[split:], env=_env(tmp_path, fakebin))
    assert out.returncode == 0, out.stderr
    assert not _gcloud_calls(tmp_path)
    remote = _flag(_commands(out.stdout)[0], "--command")
    tail = words[split + 1:]
    venv_python = "cd ~/ctxrq_jax && env CTXRQ_DISTRIBUTED=1 ~/ctxrq_venv/bin/python"
    assert f"{venv_python} -m ctxrq_jax.encode {' '.join(tail)} 2>&1" in remote
    assert tail[0] == "encode" and any(w.startswith("--out=gs://") for w in tail)
    _bash_syntax_ok(remote)
    assert "--command='CTXRQ_DISTRIBUTED=1 python" not in readme


def test_tpu_all_and_logs_dry_run(tmp_path: Path) -> None:
    env = _env(tmp_path)
    out = _run(TPU, "all", "-n", "a1", "-z", "us-central2-b", "-t", "v4-8", CONFIG, WORKDIR, "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    assert cmds[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert any(c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] for c in cmds)
    assert "ctxrq_jax.train" in _flag(cmds[-1], "--command") and CONFIG in _flag(cmds[-1], "--command")
    assert all("--worker=all" in c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"])
    out = _run(TPU, "logs", "-n", "a1", "-z", "us-central2-b", "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    (ssh,) = _commands(out.stdout)
    assert "--worker=0" in ssh and "tail" in _flag(ssh, "--command")


@pytest.mark.parametrize("failures, retries, ok", [(2, 3, True), (3, 3, False)])
def test_tpu_all_waits_through_failed_describe_calls(tmp_path: Path, failures: int, retries: int, ok: bool) -> None:
    # A queued request can wait for hours: a few failed `describe` calls in a row (a network blip) used to end
    # `all` (set -e) with the request left standing; now only TPU_POLL_RETRIES failures in a row do, naming what next.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_exe(
        bindir / "gcloud",
        '#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done >> "$GCLOUD_LOG"\nprintf "\\n" >> "$GCLOUD_LOG"\n'
        'case "$*" in *"queued-resources describe"*)\n'
        '  n=$(cat "$GCLOUD_LOG.n" 2>/dev/null || echo 0); echo $((n + 1)) > "$GCLOUD_LOG.n"\n'
        f'  [ "$n" -ge {failures} ] || exit 1; echo ACTIVE ;;\nesac\n',
    )
    env = _env(tmp_path, bindir, TPU_POLL_S="0", TPU_POLL_RETRIES=str(retries))
    out = _run(TPU, "all", "-n", "q", "-z", "z", "-t", "v4-8", "--queued", "--repo", "https://example.com/x.git",
               CONFIG, WORKDIR, env=env)
    describes = [c for c in _gcloud_calls(tmp_path) if c[:4] == ["compute", "tpus", "queued-resources", "describe"]]
    assert "failed (2 in a row); trying again" in out.stderr, out.stderr
    if ok:
        assert out.returncode == 0, out.stderr
        assert len(describes) == failures + 1 and "queued resource q is ACTIVE" in out.stderr
        assert any("ctxrq_jax.train" in a for a in _gcloud_calls(tmp_path)[-1])  # went on to set up and train
    else:
        assert out.returncode == 2 and len(describes) == retries, out.stderr
        assert "3 describe calls failed in a row" in out.stderr and "run 'tpu.sh setup'" in out.stderr


def test_tpu_single_host_slice_takes_a_local_workdir(tmp_path: Path) -> None:
    for accel in ("v4-8", "v5p-8", "v5litepod-8", "v6e-4"):
        out = _run(TPU, "train", "-n", "one", "-z", "z", "-t", accel, CONFIG, "--workdir=runs/821m", "--dry-run",
                   env=_env(tmp_path))
        assert out.returncode == 0, (accel, out.stderr)
        assert "--workdir=runs/821m" in _flag(_commands(out.stdout)[0], "--command")
    # `train` on a slice created earlier (`all -t v4-8`) without -t: its type is unknown, so nothing is refused (the
    # `all` default v4-32 is for creating one); `all` without -t creates a v4-32 and refuses.
    out = _run(TPU, "train", "-n", "one", "-z", "z", CONFIG, "--workdir=runs/821m", "--dry-run", env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    out = _run(TPU, "all", "-n", "one", "-z", "z", CONFIG, "--workdir=runs/821m", "--dry-run", env=_env(tmp_path))
    assert out.returncode != 0 and "a multi-host slice (v4-32) needs --workdir=gs://" in out.stderr


def test_tpu_real_run_calls_gcloud(tmp_path: Path, fakebin: Path) -> None:
    out = _run(TPU, "create", "-n", "real", "-z", "us-central2-b", "-t", "v4-16", env=_env(tmp_path, fakebin))
    assert out.returncode == 0, out.stderr
    (call,) = _gcloud_calls(tmp_path)
    assert call[:5] == ["compute", "tpus", "tpu-vm", "create", "real"]
    assert "--accelerator-type=v4-16" in call


def test_tpu_delete_requires_yes_when_not_interactive(tmp_path: Path, fakebin: Path) -> None:
    env = _env(tmp_path, fakebin)
    for extra in ([], ["--dry-run"]):
        out = _run(TPU, "delete", "-n", "keep-me", "-z", "us-central2-b", *extra, env=env)
        assert out.returncode != 0
        assert "--yes" in out.stderr
    assert _gcloud_calls(tmp_path) == []
    out = _run(TPU, "delete", "-n", "gone", "-z", "us-central2-b", "--yes", env=env)
    assert out.returncode == 0, out.stderr
    (call,) = _gcloud_calls(tmp_path)
    assert call[:5] == ["compute", "tpus", "tpu-vm", "delete", "gone"]
    assert "--zone=us-central2-b" in call


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "-n", "x", "-z", "y", "--bogus"], "unknown option '--bogus'"),
        (["create", "-n", "x", "--zone"], "--zone requires a value"),
        (["create", "-z", "y"], "missing TPU name"),
        (["create", "-n", "x"], "missing zone"),
        (["launch", "-n", "x", "-z", "y"], "unknown subcommand 'launch'"),
        (["-n", "x", "-z", "y"], "missing subcommand"),
        (["create", "-n", "x", "-z", "y", "--spot", "--preemptible"], "mutually exclusive"),
        (["train", "-n", "x", "-z", "y", "--env", "NOEQUALS"], "KEY=VALUE"),
        (["train", "-n", "x", "-z", "y", "-t", "v4-32", CONFIG, "--workdir=runs/821m"],
         "a multi-host slice (v4-32) needs --workdir=gs://BUCKET/"),
        (["all", "-n", "x", "-z", "y", "-t", "v5litepod-16", "--", "--workdir", "/data/run"],
         "'/data/run' would be a separate local directory on every host"),
    ],
)
def test_tpu_errors(tmp_path: Path, fakebin: Path, args: list[str], message: str) -> None:
    out = _run(TPU, *args, "--dry-run", env=_env(tmp_path, fakebin))
    assert out.returncode != 0
    assert message in out.stderr
    assert _gcloud_calls(tmp_path) == []


# ----------------------------------------------------------------- gpu.sh


def _sbatch_script(stdout: str) -> str:
    lines = stdout.splitlines()
    start = lines.index("# ----- generated sbatch script -----")
    end = lines.index("# ----- end of script -----")
    return "\n".join(lines[start + 1 : end]) + "\n"


def test_gpu_local_dry_run(tmp_path: Path) -> None:
    out = _run(GPU, "local", "--gpus", "0,1,2,3", CONFIG, "--workdir=/ckpt/run", "--dry-run", env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert cmd == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "python", "-m", "ctxrq_jax.train", CONFIG,
                   "--workdir=/ckpt/run"]
    assert not any(c.startswith("JAX_") for c in cmd)


def test_gpu_local_multinode_env(tmp_path: Path) -> None:
    out = _run(
        GPU, "local", "--coordinator", "node0:12345", "--num-processes", "2", "--process-id", "1",
        "-m", "ctxrq_jax.train_rqvae", "--dry-run", "--", "--config=configs/rqvae_imagenet.py", env=_env(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert "JAX_COORDINATOR_ADDRESS=node0:12345" in cmd
    assert "JAX_NUM_PROCESSES=2" in cmd and "JAX_PROCESS_ID=1" in cmd
    assert cmd[-3:] == ["-m", "ctxrq_jax.train_rqvae", "--config=configs/rqvae_imagenet.py"]
    out = _run(GPU, "local", "--coordinator", "node0:1", "--dry-run", env=_env(tmp_path))
    assert out.returncode != 0 and "--num-processes" in out.stderr


@pytest.mark.parametrize("extra, env, smi, ids", [
    (["--gpus", "2,3,5"], {}, 8, "0,1,2"),  # indices within CUDA_VISIBLE_DEVICES
    ([], {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 8, "0,1,2,3"),  # what the allocation gave (--gres)
    (["--env", "JAX_LOCAL_DEVICE_IDS=1"], {}, 8, "1"),  # the user's own choice, untouched
    ([], {}, 2, "0,1"),  # every GPU nvidia-smi lists
    ([], {}, 0, None),  # none listed: an error, not one GPU per process
])
def test_gpu_local_multinode_inside_slurm_names_every_gpu(tmp_path: Path, extra, env, smi, ids) -> None:
    # Started on each node of an allocation, JAX's SLURM detection would give the process only GPU SLURM_LOCALID.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    lines = "".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i})\\n" for i in range(smi))
    _write_exe(bindir / "nvidia-smi", f'#!/bin/sh\nprintf "{lines}"\n')
    out = _run(GPU, "local", "--coordinator", "node0:1", "--num-processes", "2", "--process-id", "0", *extra,
               "--dry-run", CONFIG, env=_env(tmp_path, bindir, SLURM_JOB_ID="7", SLURM_LOCALID="0", **env))
    if ids is None:
        assert out.returncode == 2 and "no GPU found" in out.stderr, out.stderr
        return
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert [a for a in cmd if a.startswith("JAX_LOCAL_DEVICE_IDS=")] == [f"JAX_LOCAL_DEVICE_IDS={ids}"]


def test_gpu_local_runs_command(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_exe(bindir / "python", '#!/bin/sh\necho "CVD=$CUDA_VISIBLE_DEVICES"; printf "[%s]" "$@"; echo\n')
    out = _run(GPU, "local", "--gpus", "1", CONFIG, env=_env(tmp_path, bindir))
    assert out.returncode == 0, out.stderr
    assert "CVD=1" in out.stdout
    assert f"[-m][ctxrq_jax.train][{CONFIG}]" in out.stdout


def test_gpu_slurm_dry_run(tmp_path: Path) -> None:
    out = _run(
        GPU, "slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "a100", "--account", "proj",
        "--time", "12:00:00", CONFIG, "--workdir=/shared/ckpt/821m", "--dry-run", env=_env(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    script = _sbatch_script(out.stdout)
    assert script.startswith("#!/bin/bash\n")
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=a100",
        "#SBATCH --account=proj",
        "#SBATCH --time=12:00:00",
        "export JAX_NUM_PROCESSES=4",
        "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
        "#SBATCH --signal=TERM@300",  # the processes' SIGTERM, in time to save before the limit
    ]:
        assert line in script.splitlines(), line
    out = _run(GPU, "slurm", "--signal-s", "0", CONFIG, "--dry-run", env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "--signal" not in _sbatch_script(out.stdout)
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert "JAX_COORDINATOR_ADDRESS=" in script and "JAX_PROCESS_ID=$SLURM_PROCID" in script
    assert "srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8" in script
    assert f"python -m ctxrq_jax.train {CONFIG} --workdir=/shared/ckpt/821m" in script
    assert [c[0] for c in _commands(out.stdout)] == ["sbatch"]


def test_gpu_slurm_script_runs_with_fake_slurm(tmp_path: Path) -> None:
    """Run the generated batch script with fake scontrol/srun/python: check each task's env and argv."""
    out = _run(
        GPU, "slurm", "-N", "2", "-G", "4", "--port", "23456", "--dry-run",
        "--", "--config=configs/imagenet.py:821m", "--workdir=/shared/a b", env=_env(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(_sbatch_script(out.stdout))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_exe(bindir / "scontrol", "#!/bin/sh\nprintf 'gpu-node07\\ngpu-node08\\n'\n")
    # One task per node: run the command once per node with SLURM_PROCID set.
    _write_exe(
        bindir / "srun",
        '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
        'for i in 0 1; do SLURM_PROCID=$i "$@" || exit 1; done\n',
    )
    _write_exe(
        bindir / "python",
        '#!/bin/sh\necho "$JAX_PROCESS_ID $JAX_NUM_PROCESSES $JAX_COORDINATOR_ADDRESS $JAX_LOCAL_DEVICE_IDS"\n'
        'printf "[%s]" "$@"; echo\n',
    )
    env = _env(tmp_path, bindir, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node[07-08]")
    result = subprocess.run([BASH, str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "0 2 gpu-node07:23456 0,1,2,3" in result.stdout
    assert "1 2 gpu-node07:23456 0,1,2,3" in result.stdout
    assert "[-m][ctxrq_jax.train][--config=configs/imagenet.py:821m][--workdir=/shared/a b]" in result.stdout


def test_gpu_slurm_submits_with_sbatch(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_exe(bindir / "sbatch", f'#!/bin/sh\ncat > {tmp_path}/submitted.sh\necho "Submitted batch job 7"\n')
    saved = tmp_path / "saved.sbatch"
    out = _run(GPU, "slurm", "-N", "3", "-G", "2", "--save-script", str(saved), CONFIG, env=_env(tmp_path, bindir))
    assert out.returncode == 0, out.stderr
    assert "Submitted batch job 7" in out.stdout
    submitted = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --nodes=3" in submitted and "#SBATCH --gpus-per-node=2" in submitted
    assert saved.read_text() == submitted


@pytest.mark.parametrize(
    "args, message",
    [
        (["slurm", "--bogus"], "unknown option '--bogus'"),
        (["slurm", "--nodes"], "--nodes requires a value"),
        (["slurm", "--nodes", "0"], "--nodes must be a positive integer"),
        (["slurm", "-G", "two"], "--gpus-per-node must be a positive integer"),
        (["slurm", "--signal-s", "-5"], "--signal-s must be a number of seconds"),
        (["local", "--gpus", "a,b"], "--gpus expects"),
        (["cluster"], "unknown subcommand 'cluster'"),
        ([], "missing subcommand"),
    ],
)
def test_gpu_errors(tmp_path: Path, args: list[str], message: str) -> None:
    out = _run(GPU, *args, "--dry-run", env=_env(tmp_path))
    assert out.returncode != 0
    assert message in out.stderr


# ----------------------------------------------------------------- helpers


def _bash_syntax_ok(command: str) -> None:
    result = subprocess.run([BASH, "-n", "-c", command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
