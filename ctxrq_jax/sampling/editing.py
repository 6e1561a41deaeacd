"""Image-level editing: inpainting and outpainting from pixels (the paper's Figure 1 and §4.3). The command is
`python -m ctxrq_jax.sample inpaint --workdir=STAGE2 --image=in.png --mask=mask.png --class=3 --out=DIR`.

An edit reads an image and a mask drawn on it, encodes the image with the run's RQ-VAE, regenerates the code stacks
the mask touches with Draft-and-Revise (`decoder.inpaint`: every other stack is kept bit for bit as context), and
decodes the draft and every revision.

* Files. Any image PIL reads (PNG, JPEG, ...). The mask must have the image's size in pixels; white marks what to
  regenerate: a mask pixel is set when its brightest channel is >= MASK_THRESHOLD (128) and it is not transparent
  (alpha >= 128), so a black-and-white PNG, a bright stroke of any colour on black or on a transparent layer, or a
  greyscale drawing all work. A photo's EXIF orientation is applied (both files are read upright, as shown). An empty mask, a mask of another size and
  a file that is not an image are errors that name the file.
* Size. The result has the RQ-VAE's resolution R (32 for the demo, 256 for ImageNet). `resize='crop'` (the default)
  scales the shorter side to R (bilinear, as the stage-1 evaluation preprocessing `data.images.preprocess_image`)
  and crops the centre square; `resize='pad'` centres a square image no larger than R on a black canvas (the demo's
  28x28 digits, as stage 1 saw them). An R x R image is used as it is either way. The mask follows the same
  geometry, and a fitted mask pixel is set when any input mask pixel it covers is set (a box filter > 0), so
  shrinking never loses a thin stroke. A mask that lies wholly outside the centre crop is an error.
* Mask -> code positions (`mask_to_region`). The RQ-VAE downsamples by f = R / h (4 for the demo, 32 for ImageNet's
  8x8 map): code position (i, j) stands for the f x f pixel cell [f i, f (i + 1)) x [f j, f (j + 1)), and it is
  regenerated when its cell overlaps the mask in at least one pixel. The other positions keep the input's codes.
* Outpainting (extending an image) is the same operation with the mask on a border: mask the right third, say, and
  the model draws it from the kept left two thirds; the region is whatever cells the mask covers.
* Receptive fields. The encoder and the decoder are convolutional and see beyond one cell: the kept codes next to the
  region were computed with the masked pixels in view, and decoded pixels just outside the regenerated cells can
  change a little. `composite=True` pastes the input's own pixels back wherever the mask is not set.

Outputs (`write_edit`): inpainted.png (the final result of each sample), strip.png (one row per sample: the input,
the mask as the model sees it, i.e. the regenerated cells in grey, the draft and every revision) and inpaint.npz
(images uint8 [S, R, R, C], codes int32 [S, h, w, D], history int32 [M+1, S, h, w, D], input uint8 [R, R, C],
input_codes int32 [h, w, D], mask bool [R, R], region bool [h, w]).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ctxrq_jax.core import grids
from ctxrq_jax.core import paths as fs
from ctxrq_jax.data import captions as captions_lib
from ctxrq_jax.data import images as image_data
from ctxrq_jax.models import rqvae
from ctxrq_jax.sampling import decoder
from ctxrq_jax.sampling import logits
from ctxrq_jax.sampling import runner

MASK_THRESHOLD = 128  # a mask pixel is set when its brightest channel reaches this (white = regenerate)
RESIZE_MODES = ("crop", "pad")  # the image modes whose geometry `fit_mask` follows (not 'squash')
REGION_GREY = 128  # the regenerated cells in the strip's mask panel


# ------------------------------------------------------------------------------------------------ files and geometry
def read_image(path: str, what: str = "image", mode: str = "RGB") -> np.ndarray:
  """uint8 [H, W, 3] (mode 'RGBA': [H, W, 4]) of an image file, upright as its EXIF orientation says (as viewers show
  it, and as a mask drawn on it is drawn); FileNotFoundError / ValueError naming the file."""
  source = fs.path(path)
  if not source.is_file():
    raise FileNotFoundError(f"{what} file {path} does not exist")
  data = source.read_bytes()
  try:
    return captions_lib.decode_image(data, mode=mode, orient=True)
  except ValueError as e:
    raise ValueError(f"{what} file {path} is {e}" if str(e).startswith("not ") else f"{what} file {path}: {e}") from e


def read_mask(path: str) -> np.ndarray:
  """bool [H, W] of a mask file: set where the brightest channel is >= MASK_THRESHOLD and the pixel is not
  transparent (alpha >= MASK_THRESHOLD: an editor's transparent background is unset whatever colour it stores)."""
  rgba = read_image(path, "mask", mode="RGBA")
  return (rgba[..., :3].max(axis=-1) >= MASK_THRESHOLD) & (rgba[..., 3] >= MASK_THRESHOLD)


def _check_pad(h: int, w: int, size: int) -> None:
  if h != w or h > size:
    raise ValueError(f"resize='pad' needs a square image no larger than {size}x{size}, got {h}x{w}; "
                     "use resize='crop' (--resize=crop) for other sizes")


def fit_image(image: np.ndarray, *, resolution: int, channels: int, resize: str = "crop") -> np.ndarray:
  """uint8 [H, W, C] -> float32 [R, R, channels] in [-1, 1] by `resize` (module doc); greyscale by ITU-R 601 luma."""
  if resize not in RESIZE_MODES:
    raise ValueError(f"unknown resize mode {resize!r}; expected one of {RESIZE_MODES}")
  if resize == "pad":
    _check_pad(image.shape[0], image.shape[1], resolution)
  return image_data.preprocess_image(image, image_size=resolution, channels=channels, resize=resize)


def fit_mask(mask: np.ndarray, *, resolution: int, resize: str = "crop") -> np.ndarray:
  """bool [H, W] -> bool [R, R] with `fit_image`'s geometry; a fitted pixel is set when any input pixel it covers is."""
  mask = np.asarray(mask, bool)
  chex.assert_rank(mask, 2)
  h, w = mask.shape
  if resize == "pad":
    _check_pad(h, w, resolution)
    top = (resolution - h) // 2
    out = np.zeros((resolution, resolution), bool)
    out[top:top + h, top:top + w] = mask
    return out
  if resize != "crop":
    raise ValueError(f"unknown resize mode {resize!r}; expected one of {RESIZE_MODES}")
  new_h, new_w, top, left = image_data.crop_geometry(h, w, resolution)
  if (new_h, new_w) != (h, w):  # box weights are >= 0, so > 0 means "overlaps a set pixel"
    mask = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((new_w, new_h), Image.Resampling.BOX)) > 0
  return mask[top:top + resolution, left:left + resolution]


def mask_to_region(mask: np.ndarray, latent_size: int) -> np.ndarray:
  """Pixel mask bool [..., R, R] -> code positions bool [..., h * h] (h = latent_size), row-major as the stage-2
  sequence: position i h + j is regenerated when its f x f cell (f = R / h) holds a set pixel."""
  mask = np.asarray(mask, bool)
  r = mask.shape[-1]
  if mask.ndim < 2 or mask.shape[-2] != r or r % latent_size:
    raise ValueError(f"mask must be [..., R, R] with R divisible by the code map's {latent_size}, got {mask.shape}")
  f = r // latent_size
  cells = mask.reshape(*mask.shape[:-2], latent_size, f, latent_size, f).any(axis=(-3, -1))
  return cells.reshape(*mask.shape[:-2], latent_size * latent_size)


def region_to_pixels(region: np.ndarray, latent_size: int, resolution: int) -> np.ndarray:
  """Code positions bool [..., h * h] -> the pixels of their cells bool [..., R, R] (the inverse map of cells)."""
  region = np.asarray(region, bool)
  f = resolution // latent_size
  cells = region.reshape(*region.shape[:-1], latent_size, latent_size)
  return np.repeat(np.repeat(cells, f, axis=-2), f, axis=-1)


def read_inputs(image_path: str, mask_path: str) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 [H, W, 3], mask bool [H, W]) from the two files: both images, the same size, the mask not empty."""
  image, mask = read_image(image_path), read_mask(mask_path)
  if mask.shape != image.shape[:2]:
    raise ValueError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} pixels but image {image_path} is "
                     f"{image.shape[1]}x{image.shape[0]}; draw the mask on the image's pixels")
  if not mask.any():
    raise ValueError(f"mask {mask_path} is empty: no pixel reaches {MASK_THRESHOLD} (white marks what to regenerate)")
  return image, mask


def fit_inputs(image: np.ndarray, mask: np.ndarray, *, resolution: int, channels: int,
               resize: str = "crop") -> tuple[np.ndarray, np.ndarray]:
  """`fit_image` and `fit_mask` of one pair (image uint8 [H, W, C], mask bool [H, W]) -> (float32 [R, R, channels],
  bool [R, R]); an error when the mask lies wholly outside the part of the image that is kept."""
  if np.asarray(mask).shape != np.asarray(image).shape[:2]:
    raise ValueError(f"mask {np.asarray(mask).shape} and image {np.asarray(image).shape[:2]} differ in size")
  fitted = fit_mask(mask, resolution=resolution, resize=resize)
  if not fitted.any():
    raise ValueError(f"the mask lies outside the centre {resolution}x{resolution} crop of the image")
  return fit_image(np.asarray(image), resolution=resolution, channels=channels, resize=resize), fitted


def load_inputs(image_path: str, mask_path: str, *, resolution: int, channels: int,
                resize: str = "crop") -> tuple[np.ndarray, np.ndarray]:
  """(image float32 [R, R, C] in [-1, 1], mask bool [R, R]) from the two files, checked (`read_inputs`,
  `fit_inputs`)."""
  image, mask = read_inputs(image_path, mask_path)
  return fit_inputs(image, mask, resolution=resolution, channels=channels, resize=resize)


# ------------------------------------------------------------------------------------------------ the edit
@functools.partial(jax.jit, static_argnums=0)
def _encode(model: rqvae.RQVAE, variables: Any, images: jax.Array) -> jax.Array:
  return model.apply(variables, model.apply(variables, images, method=rqvae.RQVAE.encode),
                     method=rqvae.RQVAE.quantize)[1]


def encode_images(model: rqvae.RQVAE, variables: Any, images: np.ndarray) -> np.ndarray:
  """Images float [B, R, R, C] in [-1, 1] -> their codes int32 [B, h, w, D] (the RQ-VAE's encoder and quantizer)."""
  return np.asarray(_encode(model, variables, jnp.asarray(images, jnp.float32)))


def condition(loaded: Any, *, class_id: int | None = None, prompt: str | None = None) -> np.ndarray:
  """The condition int32 [L] of an edit: a class id for a class-conditional run, a caption for a text run (ValueError
  when the prompt has no tokens, a warning when it is cut to L: `CaptionTokenizer.encode_prompts`)."""
  if loaded.model.is_text:
    if class_id is not None:
      raise ValueError(f"{loaded.workdir} is a text-to-image run: describe the image with a prompt, not a class")
    if not prompt or not prompt.strip():
      raise ValueError(f"{loaded.workdir} is a text-to-image run: give a prompt (--prompt='a red bus')")
    return np.asarray(loaded.tokenizer().encode_prompts([prompt.strip()])[0], np.int32)
  if prompt:
    raise ValueError(f"{loaded.workdir} is a class-conditional run: give a class id (--class=3), not a prompt")
  if class_id is None:
    raise ValueError(f"{loaded.workdir} is class-conditional: give the class to paint (--class=ID, "
                     f"0 <= ID < {int(loaded.model.num_classes)})")
  _check_class_ids(loaded, [class_id])
  return np.asarray([int(class_id)], np.int32)


def _check_class_ids(loaded: Any, ids: Any) -> None:
  """ValueError naming the first of `ids` outside [0, num_classes) of a class-conditional run (the null id,
  num_classes, would paint unconditioned)."""
  num_classes = int(loaded.model.num_classes)
  bad = [int(i) for i in np.ravel(ids) if not 0 <= int(i) < num_classes]
  if bad:
    raise ValueError(f"class id {bad[0]} is outside [0, {num_classes}) for this model")


@dataclasses.dataclass
class Edit:
  """One image and S Draft-and-Revise completions of its masked cells.

  Attributes:
    image: float32 [R, R, C] in [-1, 1], the input as fitted.
    mask: bool [R, R], the pixel mask as fitted.
    region: bool [N], the regenerated code positions (`mask_to_region`).
    codes: int32 [N, D], the input's codes.
    history: int32 [M+1, S, N, D], the draft and each revision of every sample (history[-1]: the results).
  """
  image: np.ndarray
  mask: np.ndarray
  region: np.ndarray
  codes: np.ndarray
  history: np.ndarray


def inpaint(loaded: Any, image: np.ndarray, mask: np.ndarray, cond: np.ndarray, rng: jax.Array, *, num_samples: int,
            t_draft: int, t_revise: int, num_revisions: int, draft: logits.PhaseSettings,
            revise: logits.PhaseSettings, draft_mode: str = "random", confidence_noise: float = 0.0) -> Edit:
  """Encodes `image`, regenerates the cells `mask` touches with Draft-and-Revise, `num_samples` times.

  Args:
    loaded: a `loader.Stage2Model` (or anything with its `model`, `params`, `codebook` and `decoder`).
    image: float [R, R, C] in [-1, 1] (`load_inputs` / `fit_image`); mask: bool [R, R] (`fit_mask`).
    cond: int [L] (`condition`).
    rng: the edit's key; sample s is drawn with fold_in(rng, s), so it does not depend on num_samples.
    t_draft, t_revise: at most the number of regenerated positions (`decoder.inpaint` says so otherwise).

  Returns:
    the `Edit`; outside the region every sample's codes equal the input's bit for bit.
  """
  return inpaint_many(loaded, np.asarray(image)[None], np.asarray(mask)[None], np.asarray(cond).reshape(1, -1), rng,
                      num_samples=num_samples, t_draft=t_draft, t_revise=t_revise, num_revisions=num_revisions,
                      draft=draft, revise=revise, draft_mode=draft_mode, confidence_noise=confidence_noise)[0]


def inpaint_many(loaded: Any, images: np.ndarray, masks: np.ndarray, conds: np.ndarray, rng: jax.Array, *,
                 num_samples: int, t_draft: int, t_revise: int, num_revisions: int, draft: logits.PhaseSettings,
                 revise: logits.PhaseSettings, draft_mode: str = "random",
                 confidence_noise: float = 0.0) -> list[Edit]:
  """`inpaint` of E edits in one batch of E x num_samples (one compiled program, whatever the regions' sizes).

  Args:
    images: float [E, R, R, C] in [-1, 1]; masks: bool [E, R, R]; conds: int [E, L].
    rng: sample s of edit e is drawn with fold_in(rng, e num_samples + s).
    t_draft, t_revise: at most the smallest region's number of positions.

  Returns:
    E `Edit`s, in order.
  """
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
  stage1 = loaded.decoder.model
  h, w, depth = stage1.code_shape
  images, masks, conds = np.asarray(images, np.float32), np.asarray(masks, bool), np.asarray(conds, np.int32)
  edits = images.shape[0]
  chex.assert_shape(images, (edits, stage1.resolution, stage1.resolution, stage1.in_channels))
  chex.assert_shape(masks, (edits, stage1.resolution, stage1.resolution))
  chex.assert_rank(conds, 2)
  chex.assert_axis_dimension(conds, 0, edits)
  if not loaded.model.is_text:
    _check_class_ids(loaded, conds)
  regions = mask_to_region(masks, h)  # [E, N]
  codes = encode_images(stage1, loaded.decoder.variables, images).reshape(edits, h * w, depth)
  keys = runner.sample_keys(rng, np.arange(edits * num_samples))
  _, history = decoder.inpaint(
      loaded.model, loaded.params, loaded.codebook, np.repeat(codes, num_samples, 0),
      np.repeat(regions, num_samples, 0), np.repeat(conds, num_samples, 0), keys, t_draft=t_draft,
      t_revise=t_revise, num_revisions=num_revisions, draft=draft, revise=revise, draft_mode=draft_mode,
      confidence_noise=confidence_noise, return_history=True)
  history = np.asarray(history).reshape(num_revisions + 1, edits, num_samples, h * w, depth)
  return [Edit(image=images[e], mask=masks[e], region=regions[e], codes=codes[e], history=history[:, e])
          for e in range(edits)]


# ------------------------------------------------------------------------------------------------ pictures and files
def _channels(x: np.ndarray, c: int) -> np.ndarray:
  return x if x.shape[-1] == c else np.repeat(x, c // x.shape[-1], axis=-1)


def phase_images(loaded: Any, edit: Edit, *, composite: bool = False) -> np.ndarray:
  """uint8 [M+1, S, R, R, C]: the decoded draft and revisions; with `composite`, the input's pixels outside the mask."""
  phases, samples = edit.history.shape[:2]
  images = loaded.images(edit.history.reshape(phases * samples, *edit.history.shape[2:]), uint8=True)
  images = images.reshape(phases, samples, *images.shape[1:])
  if composite:
    source = _channels(grids.to_uint8(edit.image), images.shape[-1])
    images = np.where(edit.mask[..., None], images, source)
  return images


def strip(loaded: Any, edit: Edit, images: np.ndarray | None = None) -> np.ndarray:
  """uint8 [S, 2 + M + 1, R, R, C]: per sample the input, the mask panel (the regenerated cells grey), the draft and
  each revision (`images` from `phase_images`, decoded when not given)."""
  images = phase_images(loaded, edit) if images is None else images
  c = images.shape[-1]
  source = _channels(grids.to_uint8(edit.image), c)
  cells = region_to_pixels(edit.region, loaded.decoder.model.latent_size, source.shape[0])
  panel = np.where(cells[..., None], np.uint8(REGION_GREY), source)
  samples = images.shape[1]
  lead = np.broadcast_to(np.stack([source, panel]), (samples, 2, *source.shape))
  return np.concatenate([lead, np.swapaxes(images, 0, 1)], axis=1)


def write_edit(loaded: Any, edit: Edit, out_dir: str, *, composite: bool = False) -> dict[str, str]:
  """Writes inpainted.png, strip.png and inpaint.npz (module doc) into `out_dir`; returns their paths."""
  images = phase_images(loaded, edit, composite=composite)
  rows = strip(loaded, edit, images)
  samples, cols = rows.shape[:2]
  res = images.shape[-2]
  scale = max(1, 128 // res)
  h, w, depth = loaded.decoder.model.code_shape
  out = fs.path(out_dir)
  paths = {"inpainted_png": grids.save_grid(str(out / "inpainted.png"), images[-1], samples, scale),
           "strip_png": grids.save_grid(str(out / "strip.png"), rows.reshape(samples * cols, *rows.shape[2:]), cols,
                                        scale)}
  path = str(out / "inpaint.npz")
  with fs.local_file(path, suffix=".npz") as tmp:  # atomic, local or a bucket
    np.savez(tmp, images=images[-1], codes=edit.history[-1].reshape(samples, h, w, depth),
             history=edit.history.reshape(*edit.history.shape[:2], h, w, depth), input=grids.to_uint8(edit.image),
             input_codes=edit.codes.reshape(h, w, depth), mask=edit.mask, region=edit.region.reshape(h, w))
  paths["inpaint_npz"] = path
  return paths


def default_steps(requested: int | None, configured: int, region_size: int) -> int:
  """T for an edit: the requested value as given (checked by the decoder), else the run's, capped at the region size
  (an UPDATE step must regenerate at least one position)."""
  return int(requested) if requested is not None else max(1, min(int(configured), int(region_size)))


__all__ = ["Edit", "MASK_THRESHOLD", "condition", "default_steps", "encode_images", "fit_image", "fit_inputs",
           "fit_mask", "inpaint", "inpaint_many", "load_inputs", "mask_to_region", "phase_images", "read_image",
           "read_inputs", "read_mask", "region_to_pixels", "strip", "write_edit"]
