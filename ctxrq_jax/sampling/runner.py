"""Draft-and-Revise sampling from a loaded stage-2 run: batched, sharded over the devices, written as PNG grids and an
FID-ready .npz. The command is ctxrq_jax/sample.py.

Outputs (`write_outputs`):
  samples.png      the final samples, one row per class (a preview: preview_per_class x preview_classes)
  phases.png       the draft and every revision side by side (one panel per phase, the preview's samples)
  samples.npz      arr_0: uint8 [M, H, W, 3] final images (the layout FID/IS/precision-recall evaluators read),
                   labels: int32 [M], codes: int32 [M, h, w, D]

Text-to-image runs (`sample_prompts`) write the same files with one row per prompt and the prompt written under
each image in both grids; `labels` is then the prompt index of each sample, and the npz adds `prompts` (str [P])
and `cond` (int32 [M, L], the caption tokens).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from ctxrq_jax.core import grids
from ctxrq_jax.core import reporting
from ctxrq_jax.core import sharding
from ctxrq_jax.sampling import decoder
from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import logits


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


def sample_codes(loaded: loader.Stage2Model, labels: Sequence[int] | np.ndarray, rng: jax.Array, *, batch_size: int,
                 t_draft: int, t_revise: int, num_revisions: int, draft: logits.PhaseSettings,
                 revise: logits.PhaseSettings, draft_mode: str = "random") -> np.ndarray:
  """Draft-and-Revise codes for each condition -> history int32 [M+1, S, N, D] (draft, then revisions).

  `labels` are S class ids [S] or S condition token rows [S, L] (captions). Batches are padded to `batch_size`
  (one compilation) and split over the devices along the batch axis.
  """
  labels = np.asarray(labels, np.int32)
  if labels.ndim == 1:
    labels = labels[:, None]
  n_dev = loaded.mesh.shape["data"]
  if batch_size % n_dev:
    raise ValueError(f"batch_size {batch_size} is not divisible by the {n_dev} devices")
  batch_sharding = sharding.batch_sharding(loaded.mesh)
  progress = reporting.Progress("sample", len(labels), unit="samples")
  out = []
  for i in range(0, len(labels), batch_size):
    chunk = labels[i:i + batch_size]
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), np.int32)])
    cond = jax.device_put(padded, batch_sharding)
    _, history = decoder.draft_and_revise(
        loaded.model, loaded.params, loaded.codebook, cond, jax.random.fold_in(rng, i), t_draft=t_draft,
        t_revise=t_revise, num_revisions=num_revisions, draft=draft, revise=revise, draft_mode=draft_mode,
        return_history=True)
    out.append(np.asarray(history)[:, :len(chunk)])
    progress.update(i + len(chunk))
  progress.close()
  return np.concatenate(out, axis=1)


def preview_indices(labels: np.ndarray, *, per_class: int, max_classes: int) -> np.ndarray:
  """Indices of at most `per_class` samples of each of the first `max_classes` classes (in order of appearance)."""
  labels = np.asarray(labels)
  classes = list(dict.fromkeys(labels.tolist()))[:max_classes]
  return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes]).astype(np.int64)


def write_outputs(loaded: loader.Stage2Model, history: np.ndarray, labels: np.ndarray, out_dir: str, ncols: int, *,
                  preview_per_class: int = 10, preview_classes: int = 16, prompts: Sequence[str] | None = None,
                  cond: np.ndarray | None = None) -> dict[str, str]:
  """Writes samples.npz (every final sample) and the preview grids samples.png / phases.png; returns their paths.

  Args:
    history: int [M+1, S, N, D] codes of the draft and each revision; labels: int [S].
    ncols: samples per row of the grids (at most `preview_per_class`).
    preview_per_class / preview_classes: the grids show at most this many samples of this many classes, so that
      50,000 samples for FID still make a PNG one can open; the npz always holds all of them.
    prompts: text-to-image: the P prompts, `labels` [S] indexing them; each grid image gets its prompt under it.
    cond: text-to-image: the caption tokens int [S, L], stored in the npz.

  The npz images are decoded chunk by chunk into a uint8 memory-mapped file, so host memory stays at a chunk of
  float images plus the uint8 array's page cache, whatever the number of samples.
  """
  os.makedirs(out_dir, exist_ok=True)
  labels = np.asarray(labels, np.int32)
  preview = preview_indices(labels, per_class=preview_per_class, max_classes=preview_classes)
  phases = [loaded.images(h[preview], uint8=True) for h in history]  # each [P, R, R, C]
  ncols = max(1, min(ncols, preview_per_class))
  scale = max(1, 128 // phases[0].shape[1])
  if prompts is None:
    paths = {"samples_png": grids.save_grid(os.path.join(out_dir, "samples.png"), phases[-1], ncols, scale)}
    panels = [grids.make_grid(p, ncols) for p in phases]
  else:
    captions = [prompts[i] for i in labels[preview]]
    paths = {"samples_png": grids.save_captioned_grid(os.path.join(out_dir, "samples.png"), phases[-1], captions,
                                                      ncols, scale)}
    panels = [grids.captioned_grid(p, captions, ncols, scale) for p in phases]
    scale = 1
  sep = np.full((panels[0].shape[0], 8, panels[0].shape[2]), 128, np.uint8)  # grey bar between the phases
  side_by_side = np.concatenate([x for p in panels for x in (p, sep)][:-1], axis=1)
  paths["phases_png"] = grids.save_grid(os.path.join(out_dir, "phases.png"), side_by_side[None], 1, scale)

  res, channels = phases[-1].shape[1], 3  # FID evaluators expect RGB
  npz = os.path.join(out_dir, "samples.npz")
  scratch = os.path.join(out_dir, ".samples.uint8.npy")
  final = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(len(labels), res, res, channels))
  try:
    loaded.images(history[-1], out=final)
    final.flush()
    extra = {} if prompts is None else {"prompts": np.asarray(list(prompts), dtype=str),
                                        "cond": np.asarray(cond, np.int32)}
    np.savez(npz + ".tmp.npz", arr_0=final, labels=labels,
             codes=history[-1].reshape((-1, *loaded.code_shape)).astype(np.int32), **extra)
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
  loaded = loader.Stage2Model(workdir)
  s = loaded.config.sample
  ids = parse_classes(classes, int(loaded.config.model.num_classes))
  labels = np.repeat(np.asarray(ids, np.int32), samples_per_class)
  history = sample_codes(loaded, labels, jax.random.key(seed), batch_size=int(s.batch_size),
                         t_draft=int(s.T_draft), t_revise=int(s.T_revise), num_revisions=int(s.M),
                         draft=logits.PhaseSettings.from_config(s.draft), revise=logits.PhaseSettings.from_config(s.revise))
  return write_outputs(loaded, history, labels, out_dir, ncols=samples_per_class)


def read_prompts(spec: str | None = None, path: str | None = None) -> list[str]:
  """Prompts from ';'-separated text and/or a file (one prompt per line, blank lines skipped), in that order."""
  prompts = [p.strip() for p in (spec or "").split(";") if p.strip()]
  if path:
    if not os.path.isfile(path):
      raise ValueError(f"prompts file {path} does not exist")
    with open(path, encoding="utf-8") as f:
      prompts += [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError("no prompts: pass --prompts='a red bus;a dog' or --prompts_file=FILE")
  return prompts


def prompt_conditions(loaded: loader.Stage2Model, prompts: Sequence[str], per_prompt: int) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
  """(labels int32 [P * per_prompt] prompt indices, cond int32 [P * per_prompt, L] deterministic caption tokens)."""
  if per_prompt < 1:
    raise ValueError(f"samples per prompt must be >= 1, got {per_prompt}")
  tokens = loaded.tokenizer().encode(list(prompts))  # deterministic ids: no BPE dropout when sampling
  labels = np.repeat(np.arange(len(prompts), dtype=np.int32), per_prompt)
  return labels, tokens[labels]


def sample_prompts(loaded: loader.Stage2Model, prompts: Sequence[str], out_dir: str, *, per_prompt: int,
                   rng: jax.Array, batch_size: int, t_draft: int, t_revise: int, num_revisions: int,
                   draft: logits.PhaseSettings, revise: logits.PhaseSettings, draft_mode: str = "random",
                   preview_per_prompt: int = 10, preview_prompts: int = 16) -> dict[str, str]:
  """Text-to-image: `per_prompt` Draft-and-Revise samples of each prompt, written by `write_outputs` with the prompt
  under each image."""
  if not loaded.model.is_text:
    raise ValueError(f"{loaded.workdir} is a class-conditional run; sample it with class ids, not prompts")
  labels, cond = prompt_conditions(loaded, prompts, per_prompt)
  history = sample_codes(loaded, cond, rng, batch_size=batch_size, t_draft=t_draft, t_revise=t_revise,
                         num_revisions=num_revisions, draft=draft, revise=revise, draft_mode=draft_mode)
  return write_outputs(loaded, history, labels, out_dir, ncols=per_prompt, preview_per_class=preview_per_prompt,
                       preview_classes=preview_prompts, prompts=list(prompts), cond=cond)
