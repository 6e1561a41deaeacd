"""A trained stage-2 run loaded for inference: its config, the parameters only, the codebook and the decoder.

Inference never builds an optimizer and never reads optimizer state: the restore target holds the parameters alone
(the EMA parameters when the run kept them), sharded on the sampling mesh by the run's logical-axis rules, and the
checkpoint is read partially (`Checkpointer.restore(..., partial=True)`). A 1.4B model then needs its 5.6 GB of
float32 parameters, not the 3x that the whole TrainState (Adam moments included) would take. The run is opened
read-only: sampling from a run that is still training never touches its checkpoints.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import paths
from ctxrq_jax.core import sharding
from ctxrq_jax.data import code_captions
from ctxrq_jax.data import codes as codes_lib
from ctxrq_jax.models import artifact
from ctxrq_jax.models import transformer


def inference_mesh() -> jax.sharding.Mesh:
  """Sampling runs data parallel on this process's devices (whatever mesh the run trained on): in a multi-host job
  each host restores its own copy of the parameters and draws its own block of samples (`runner.shard_indices`)
  or evaluates on its own, with no traffic between hosts."""
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())


def params_target(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
  """ShapeDtypeStructs (with shardings) of the model's parameters for `config`; allocates nothing."""
  model = transformer.from_run_config(config)
  boxed = transformer.abstract_variables(model)["params"]
  shardings = sharding.logical_to_shardings(boxed, mesh, sharding.logical_rules(config))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                      shardings)


def restore_params(workdir: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                   use_ema: bool = True) -> tuple[Any, int, str]:
  """(params, step, which) from the newest good checkpoint of a stage-2 run; `which` is 'ema_params' or 'params'.

  Only the parameters are read; see the module doc.
  """
  directory = paths.path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no stage-2 checkpoints in {workdir} (expected {directory})")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=1, save_interval_steps=1, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no stage-2 checkpoint in {directory}")
    saved = ckpt.saved_structure()
    which = "ema_params" if use_ema and saved.get("ema_params") is not None else "params"
    restored, step = ckpt.restore({which: params_target(config, mesh)}, partial=True)
  finally:
    ckpt.close()
  return restored[which], int(step), which


class Stage2Model:
  """A trained stage-2 run: `model`, `params` (EMA if trained with it), `codebook` [K, n_z], `config`, `step`,
  `mesh`, and `decoder` (the stage-1 RQ-VAE as a `CodeDecoder`)."""

  def __init__(self, workdir: str, *, use_ema: bool = True, decode_batch_size: int = 100,
               mesh: Optional[jax.sharding.Mesh] = None):
    self.workdir = workdir
    self.tokenizer_dir: Optional[str] = None  # overrides config.data.tokenizer_dir (text-to-image runs)
    self.config = configlib.load_snapshot(workdir)
    if "code_shape" not in self.config.get("data", {}):
      raise ValueError(f"{workdir} is not a stage-2 run (its config has no data.code_shape: a stage-1 workdir?)")
    self.model = transformer.from_run_config(self.config)
    self.mesh = mesh if mesh is not None else inference_mesh()
    self.params, self.step, self.params_name = restore_params(workdir, self.config, self.mesh, use_ema=use_ema)
    # Names the restored save (`checkpoint.step_fingerprint`): sample sets record it, so a run retrained in the same
    # directory to the same step is told apart.
    self.checkpoint_id = checkpoint.step_fingerprint(paths.path(workdir) / "checkpoints", self.step)
    codebook = codes_lib.load_codebook(self.config.data.codes_dir)
    codes_lib.check_trained_codebook(workdir, codebook, self.config.data.codes_dir)
    self.codebook = jnp.asarray(codebook, jnp.float32)
    self.code_shape = tuple(int(v) for v in self.config.data.code_shape)
    self.decoder = artifact.CodeDecoder(self.config.data.stage1_dir, batch_size=decode_batch_size)
    if self.decoder.code_shape != self.code_shape:
      raise ValueError(f"stage-1 artifact {self.config.data.stage1_dir} makes codes {self.decoder.code_shape}, "
                       f"the stage-2 run was trained on {self.code_shape}")
    vocab = int(self.config.data.vocab_size)
    if self.decoder.model.codebook_size != vocab:
      raise ValueError(f"stage-1 artifact {self.config.data.stage1_dir} has K={self.decoder.model.codebook_size} "
                       f"codes, the stage-2 run was trained on K={vocab}")
    if not np.array_equal(np.asarray(self.decoder.variables["quantizer"]["codebook"], np.float32), codebook):
      raise ValueError(f"stage-1 artifact {self.config.data.stage1_dir} is not the RQ-VAE that encoded "
                       f"{self.config.data.codes_dir} (their codebooks differ): its decoder would draw other images "
                       "from the sampled codes")

  def tokenizer(self) -> Any:
    """The run's caption tokenizer (`config.data.tokenizer_dir`, or `tokenizer_dir` set on this object),
    deterministic, L = model.cond_length; ValueError unless it is the tokenizer the run's caption codes were encoded
    with (`data.code_captions.check_tokenizer`) and the one the model was trained on (`check_trained_tokenizer`)."""
    from ctxrq_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    if not self.model.is_text:
      raise ValueError(f"{self.workdir} is conditioned on class labels, not captions")
    directory = self.tokenizer_dir or self.config.data.get("tokenizer_dir", "")
    if not directory:
      raise ValueError(f"{self.workdir}'s config has no data.tokenizer_dir; pass --tokenizer_dir=DIR (the "
                       "bpe-16k-vocab.json / merges.txt the captions were encoded with)")
    tok = tokenizer_lib.CaptionTokenizer.from_directory(directory, context_length=self.model.cond_length,
                                                        bpe_dropout=0.0)
    if tok.vocab_size > self.model.cond_vocab:
      raise ValueError(f"tokenizer {directory} has {tok.vocab_size} tokens, the model embeds {self.model.cond_vocab}")
    # A different tokenizer of the same size would silently turn every prompt into other words' ids: it must be the
    # one the codes were encoded with, and the one the model trained on (codes re-encoded in place would pass the first).
    code_captions.check_tokenizer(self.config.data.codes_dir, tok)
    tokenizer_lib.check_trained_tokenizer(self.workdir, tok.fingerprint, self.config.data.codes_dir)
    return tok

  @property
  def resolution(self) -> int:
    """R: the decoded images are R x R."""
    return int(self.decoder.model.resolution)

  def images(self, codes: np.ndarray, *, uint8: bool = False, out: Optional[np.ndarray] = None) -> np.ndarray:
    """codes int [B, N, D] (or [B, h, w, D]) -> images [B, R, R, C] (see `CodeDecoder.images`)."""
    return self.decoder.images(codes, uint8=uint8, out=out)
