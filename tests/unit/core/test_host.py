"""Multi-host detection from the environment (ctxrq_jax/core/host.py)."""

from ctxrq_jax.core import host


def test_distributed_requested_from_environment(monkeypatch):
  for k in ("CTXRQ_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
            "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert not host.distributed_requested()
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert host.distributed_requested()
  monkeypatch.setenv("CTXRQ_DISTRIBUTED", "0")
  assert not host.distributed_requested()
  monkeypatch.delenv("CTXRQ_DISTRIBUTED")
  monkeypatch.delenv("SLURM_NTASKS")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0,h1")
  assert host.distributed_requested()
