"""Draft-and-Revise sampling from a trained stage-2 run: PNG grids and an FID-ready .npz.

  python -m ctxrq_jax.sample --workdir=runs/demo/stage2 --classes=all --num_per_class=10
  python -m ctxrq_jax.sample --workdir=runs/imagenet --classes=1,207,980 --num_per_class=8 \
      --t_draft=64 --t_revise=2 --num_revisions=2 --revise_guidance=1.8 --revise_temperature=0.8

Phase settings default to the run's `config.sample` section (the paper's Table 3 setting: no guidance and
temperature 1 in the draft, temperature 0.8 and guidance 1.8 in the revisions). Guidance follows Ho & Salimans:
logits = cond + s (cond - uncond), s = 0 is the conditional model alone.

Writes to --out (default WORKDIR/samples):
  samples.png      the final samples, one row per class (a preview: --preview_per_class x --preview_classes)
  phases.png       the draft and every revision side by side (one panel per phase, the preview's samples)
  samples.npz      arr_0: uint8 [M, H, W, 3] final images (the layout FID/IS/precision-recall evaluators read),
                   labels: int32 [M], codes: int32 [M, h, w, D]
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctxrq_jax import checkpoint
from ctxrq_jax import decode
from ctxrq_jax import grids
from ctxrq_jax import rqvae
from ctxrq_jax import runtime
from ctxrq_jax import sharding
from ctxrq_jax import train
from ctxrq_jax.data import codes as codes_lib


class Stage2Model:
  """A trained stage-2 run loaded for sampling: model, params (EMA if trained with it), codebook, RQ-VAE."""

  def __init__(self, workdir: str, *, use_ema: bool = True):
    self.workdir = workdir
    self.config = runtime.load_config(workdir)
    self.model = train.build_model(self.config)
    # Sampling runs on whatever devices are here: a data-parallel mesh, whatever mesh the run trained on.
    self.mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = sharding.logical_rules(self.config)
    abstract, _ = train.abstract_train_state(self.model, train.make_optimizer(self.config), self.config, self.mesh,
                                             rules)
    # Read-only: sampling from a run that is still training must not touch its checkpoints.
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1, save_interval_steps=1,
                                   read_only=True)
    state, step = ckpt.restore(abstract)
    ckpt.close()
    if state is None:
      raise FileNotFoundError(f"no stage-2 checkpoint in {os.path.join(workdir, 'checkpoints')}")
    self.step = step
    self.params = state.ema_params if (use_ema and state.ema_params is not None) else state.params
    self.codebook = jnp.asarray(codes_lib.load_codebook(self.config.data.codes_dir), jnp.float32)
    self.code_shape = tuple(int(v) for v in self.config.data.code_shape)
    self.rqvae, self.rqvae_variables = rqvae.load_artifact(self.config.data.stage1_dir)
    if self.rqvae.code_shape != self.code_shape:
      raise ValueError(f"stage-1 artifact {self.config.data.stage1_dir} makes codes {self.rqvae.code_shape}, "
                       f"the stage-2 run was trained on {self.code_shape}")
    self._decode_images = jax.jit(lambda v, c: jnp.clip(
        self.rqvae.apply(v, c, method=rqvae.RQVAE.decode_codes), -1.0, 1.0))

  def images(self, codes: np.ndarray, *, batch_size: int = 100, uint8: bool = False,
             out: np.ndarray | None = None) -> np.ndarray:
    """codes int [B, N, D] (or [B, h, w, D]) -> images [B, R, R, C]: float32 in [-1, 1], or uint8 with `uint8`.

    Decodes `batch_size` stacks at a time (one compiled shape: the last chunk is padded), so any number of samples
    fits in device memory; with `out` (e.g. a memmap [B, R, R, C] uint8) the images go straight there.
    """
    codes = np.asarray(codes).reshape((-1, *self.code_shape))
    rqvae.check_code_range(codes, int(self.config.data.vocab_size))
    chunks = []
    for i, x in rqvae.decode_in_batches(self._decode_images, self.rqvae_variables, codes, batch_size):
      x = grids.to_uint8(x) if (uint8 or out is not None) else x
      if out is not None:
        out[i:i + len(x)] = x if out.shape[-1] == x.shape[-1] else np.repeat(x, out.shape[-1], axis=-1)
      else:
        chunks.append(x)
    if out is not None:
      return out
    if not chunks:
      raise ValueError("no codes to decode")
    return np.concatenate(chunks)


def phase_settings(phase_cfg: ml_collections.ConfigDict) -> decode.PhaseSettings:
  return decode.PhaseSettings(temperature=float(phase_cfg.temperature), top_k=int(phase_cfg.top_k),
                              top_p=float(phase_cfg.top_p), guidance_scale=float(phase_cfg.guidance))


def parse_classes(spec: str, num_classes: int) -> list[int]:
  """'all' or a comma list of class ids -> ids, each checked to lie in [0, num_classes)."""
  if spec.strip() == "all":
    return list(range(num_classes))
  try:
    ids = [int(s) for s in spec.split(",") if s.strip()]
  except ValueError as e:
    raise ValueError(f"--classes must be 'all' or comma-separated integers, got {spec!r}") from e
  bad = [c for c in ids if not 0 <= c < num_classes]
  if bad or not ids:
    raise ValueError(f"class ids {bad or spec!r} are outside [0, {num_classes}) for this model")
  return ids


class _Progress:
  """A one-line text progress bar with samples/s and ETA (stderr)."""

  def __init__(self, total: int, what: str):
    self.total, self.what, self.start, self.done = total, what, time.time(), 0

  def update(self, n: int) -> None:
    self.done += n
    elapsed = time.time() - self.start
    rate = self.done / max(elapsed, 1e-9)
    eta = (self.total - self.done) / max(rate, 1e-9)
    filled = int(30 * self.done / max(self.total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {self.what} "
                     f"{rate:.2f}/s ETA {eta:.0f}s")
    sys.stderr.flush()
    if self.done >= self.total:
      sys.stderr.write("\n")


def sample_codes(loaded: Stage2Model, labels: Sequence[int], rng: jax.Array, *, batch_size: int, t_draft: int,
                 t_revise: int, num_revisions: int, draft: decode.PhaseSettings, revise: decode.PhaseSettings,
                 draft_mode: str = "random") -> np.ndarray:
  """Draft-and-Revise codes for each label -> history int32 [M+1, len(labels), N, D] (draft, then revisions).

  Batches are padded to `batch_size` (one compilation) and split over the devices along the batch axis.
  """
  labels = np.asarray(labels, np.int32)
  n_dev = loaded.mesh.shape["data"]
  if batch_size % n_dev:
    raise ValueError(f"batch_size {batch_size} is not divisible by the {n_dev} devices")
  batch_sharding = sharding.batch_sharding(loaded.mesh)
  progress = _Progress(len(labels), "samples")
  out = []
  for i in range(0, len(labels), batch_size):
    chunk = labels[i:i + batch_size]
    padded = np.concatenate([chunk, np.zeros(batch_size - len(chunk), np.int32)])
    cond = jax.device_put(padded[:, None], batch_sharding)
    _, history = decode.draft_and_revise(
        loaded.model, loaded.params, loaded.codebook, cond, jax.random.fold_in(rng, i), t_draft=t_draft,
        t_revise=t_revise, num_revisions=num_revisions, draft=draft, revise=revise, draft_mode=draft_mode,
        return_history=True)
    out.append(np.asarray(history)[:, :len(chunk)])
    progress.update(len(chunk))
  return np.concatenate(out, axis=1)


def preview_indices(labels: np.ndarray, *, per_class: int, max_classes: int) -> np.ndarray:
  """Indices of at most `per_class` samples of each of the first `max_classes` classes (in order of appearance)."""
  labels = np.asarray(labels)
  classes = list(dict.fromkeys(labels.tolist()))[:max_classes]
  return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes]).astype(np.int64)


def write_outputs(loaded: Stage2Model, history: np.ndarray, labels: np.ndarray, out_dir: str, ncols: int, *,
                  batch_size: int = 100, preview_per_class: int = 10, preview_classes: int = 16) -> dict[str, str]:
  """Writes samples.npz (every final sample) and the preview grids samples.png / phases.png; returns their paths.

  Args:
    history: int [M+1, S, N, D] codes of the draft and each revision; labels: int [S].
    ncols: samples per row of the grids (at most `preview_per_class`).
    batch_size: images decoded per RQ-VAE call.
    preview_per_class / preview_classes: the grids show at most this many samples of this many classes, so that
      50,000 samples for FID still make a PNG one can open; the npz always holds all of them.

  The npz images are decoded chunk by chunk into a uint8 memory-mapped file, so host memory stays at a chunk of
  float images plus the uint8 array's page cache, whatever the number of samples.
  """
  os.makedirs(out_dir, exist_ok=True)
  labels = np.asarray(labels, np.int32)
  preview = preview_indices(labels, per_class=preview_per_class, max_classes=preview_classes)
  phases = [loaded.images(h[preview], batch_size=batch_size, uint8=True) for h in history]  # each [P, R, R, C]
  ncols = max(1, min(ncols, preview_per_class))
  scale = max(1, 128 // phases[0].shape[1])
  paths = {"samples_png": grids.save_grid(os.path.join(out_dir, "samples.png"), phases[-1], ncols, scale)}
  panels = [grids.make_grid(p, ncols) for p in phases]
  sep = np.full((panels[0].shape[0], 8, panels[0].shape[2]), 128, np.uint8)
  side_by_side = np.concatenate([x for p in panels for x in (p, sep)][:-1], axis=1)
  paths["phases_png"] = grids.save_grid(os.path.join(out_dir, "phases.png"), side_by_side[None], 1, scale)

  res, channels = phases[-1].shape[1], 3  # FID evaluators expect RGB
  npz = os.path.join(out_dir, "samples.npz")
  scratch = os.path.join(out_dir, ".samples.uint8.npy")
  final = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(len(labels), res, res, channels))
  try:
    loaded.images(history[-1], batch_size=batch_size, out=final)
    final.flush()
    np.savez(npz + ".tmp.npz", arr_0=final, labels=labels,
             codes=history[-1].reshape((-1, *loaded.code_shape)).astype(np.int32))
    os.replace(npz + ".tmp.npz", npz)  # atomic: an earlier samples.npz stays whole until the new one is
  finally:
    del final
    os.remove(scratch)
  paths["samples_npz"] = npz
  return paths


def sample_all_classes(workdir: str, out_dir: str, *, samples_per_class: int, seed: int = 0,
                       classes: str = "all") -> dict[str, str]:
  """Samples `samples_per_class` images for each class with the run's `config.sample` settings."""
  if samples_per_class < 1:
    raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
  loaded = Stage2Model(workdir)
  s = loaded.config.sample
  ids = parse_classes(classes, int(loaded.config.model.num_classes))
  labels = np.repeat(np.asarray(ids, np.int32), samples_per_class)
  history = sample_codes(loaded, labels, jax.random.key(seed), batch_size=int(s.batch_size),
                         t_draft=int(s.T_draft), t_revise=int(s.T_revise), num_revisions=int(s.M),
                         draft=phase_settings(s.draft), revise=phase_settings(s.revise))
  return write_outputs(loaded, history, labels, out_dir, ncols=samples_per_class, batch_size=int(s.batch_size))


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; unset phase settings fall back to the run's config.sample."""
  flags.DEFINE_string("workdir", None, "Stage-2 workdir (config.json + checkpoints).")
  flags.DEFINE_string("out", None, "Output directory (default WORKDIR/samples).")
  flags.DEFINE_string("classes", "all", "'all' or comma-separated class ids.")
  flags.DEFINE_integer("num_per_class", 10, "Samples per class.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("batch_size", None, "Samples per jitted call (default config.sample.batch_size).")
  flags.DEFINE_integer("t_draft", None, "T_draft.")
  flags.DEFINE_integer("t_revise", None, "T_revise.")
  flags.DEFINE_integer("num_revisions", None, "M, the number of revisions.")
  flags.DEFINE_enum("draft_mode", "random", ["random", "confidence"], "Draft UPDATE: random partitions (paper) or "
                    "MaskGIT-style confidence.")
  for phase in ("draft", "revise"):
    flags.DEFINE_float(f"{phase}_temperature", None, f"{phase} temperature (0 = argmax).")
    flags.DEFINE_float(f"{phase}_guidance", None, f"{phase} classifier-free guidance scale s.")
    flags.DEFINE_integer(f"{phase}_top_k", None, f"{phase} top-k (0 = off).")
    flags.DEFINE_float(f"{phase}_top_p", None, f"{phase} top-p (1 = off).")
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.")
  flags.DEFINE_integer("preview_per_class", 10, "At most this many samples per class in the PNG grids.")
  flags.DEFINE_integer("preview_classes", 16, "At most this many classes in the PNG grids (the npz has all).")


def _phase_from_flags(phase: str, default: ml_collections.ConfigDict) -> decode.PhaseSettings:
  pick = lambda name, d: d if getattr(FLAGS, f"{phase}_{name}") is None else getattr(FLAGS, f"{phase}_{name}")
  return decode.PhaseSettings(temperature=float(pick("temperature", default.temperature)),
                              top_k=int(pick("top_k", default.top_k)), top_p=float(pick("top_p", default.top_p)),
                              guidance_scale=float(pick("guidance", default.guidance)))


def main(argv: Any) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.num_per_class < 1:
    raise app.UsageError(f"--num_per_class must be >= 1, got {FLAGS.num_per_class}")
  runtime.setup_host()
  loaded = Stage2Model(FLAGS.workdir, use_ema=FLAGS.use_ema)
  s = loaded.config.sample
  ids = parse_classes(FLAGS.classes, int(loaded.config.model.num_classes))
  labels = np.repeat(np.asarray(ids, np.int32), FLAGS.num_per_class)
  pick = lambda v, d: d if v is None else v
  logging.info("Sampling %d images of %d classes from %s (step %d)", len(labels), len(ids), FLAGS.workdir,
               loaded.step)
  history = sample_codes(
      loaded, labels, jax.random.key(FLAGS.seed), batch_size=int(pick(FLAGS.batch_size, s.batch_size)),
      t_draft=int(pick(FLAGS.t_draft, s.T_draft)), t_revise=int(pick(FLAGS.t_revise, s.T_revise)),
      num_revisions=int(pick(FLAGS.num_revisions, s.M)), draft=_phase_from_flags("draft", s.draft),
      revise=_phase_from_flags("revise", s.revise), draft_mode=FLAGS.draft_mode)
  paths = write_outputs(loaded, history, labels, FLAGS.out or os.path.join(FLAGS.workdir, "samples"),
                        ncols=FLAGS.num_per_class, batch_size=int(pick(FLAGS.batch_size, s.batch_size)),
                        preview_per_class=FLAGS.preview_per_class, preview_classes=FLAGS.preview_classes)
  for name, path in paths.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
