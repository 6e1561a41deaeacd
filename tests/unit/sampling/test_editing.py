"""Image-level editing (ctxrq_jax/sampling/editing.py): the pixel mask -> code positions map, the fitting geometry,
bad inputs, and inpainting / outpainting that keep every code outside the region bit for bit."""

import types

import jax
import numpy as np
import pytest
from PIL import Image

from ctxrq_jax import sample as sample_command
from ctxrq_jax.models import artifact
from ctxrq_jax.sampling import editing
from ctxrq_jax.sampling.logits import PhaseSettings
from tests import helpers


def test_mask_to_region_known_values():
  mask = np.zeros((8, 8), bool)  # R = 8, a 2 x 2 code map: cells of 4 x 4 pixels
  mask[5, 2] = True  # row cell 1, column cell 0
  np.testing.assert_array_equal(editing.mask_to_region(mask, 2), [False, False, True, False])
  mask[3, 3] = True  # the last pixel of cell (0, 0), not its neighbours'
  np.testing.assert_array_equal(editing.mask_to_region(mask, 2), [True, False, True, False])
  mask = np.zeros((2, 8, 8), bool)  # batched; a stroke across a cell border touches both cells
  mask[1, 7, 3:5] = True
  np.testing.assert_array_equal(editing.mask_to_region(mask, 2), [[0, 0, 0, 0], [0, 0, 1, 1]])
  # The 32 x 32 demo (f = 4): the bottom half of a 28 x 28 digit padded by 2 is rows 16 ... 29 -> code rows 4 ... 7.
  digit = np.zeros((28, 28), bool)
  digit[14:] = True
  region = editing.mask_to_region(editing.fit_mask(digit, resolution=32, resize="pad"), 8).reshape(8, 8)
  np.testing.assert_array_equal(region.any(axis=1), [0, 0, 0, 0, 1, 1, 1, 1])
  assert region[4:].all()
  # Cells back to pixels: the inverse on cell-aligned masks.
  cells = editing.region_to_pixels(np.array([True, False, False, True]), 2, 8)
  assert cells[:4, :4].all() and cells[4:, 4:].all() and not cells[:4, 4:].any() and not cells[4:, :4].any()
  np.testing.assert_array_equal(editing.mask_to_region(cells, 2), [True, False, False, True])
  with pytest.raises(ValueError, match="divisible"):
    editing.mask_to_region(np.zeros((6, 6), bool), 4)


def test_fit_mask_follows_the_image_geometry():
  # crop, shrinking: 32 x 48 -> shorter side 16 (scale 1/2) -> 16 x 24 -> centre columns 4 ... 19.
  mask = np.zeros((32, 48), bool)
  mask[10, 20] = True  # a single pixel survives the shrink (box filter > 0)
  fitted = editing.fit_mask(mask, resolution=16, resize="crop")
  assert fitted.shape == (16, 16) and np.argwhere(fitted).tolist() == [[5, 6]]
  # The image goes through the same geometry: a white block lands where its mask does.
  block = np.zeros((32, 48), bool)
  block[8:12, 20:24] = True
  image = np.repeat((block * 255).astype(np.uint8)[..., None], 3, axis=-1)
  x, m = editing.fit_inputs(image, block, resolution=16, channels=1, resize="crop")
  assert x.shape == (16, 16, 1) and m.sum() == 4
  np.testing.assert_array_equal(x[..., 0] > 0, m)
  # An odd margin: 64 x 94 -> 32 x 47, 15 columns to crop; torchvision's CenterCrop rounds 7.5 to 8 (not 15 // 2):
  # image and mask take the same offset (one geometry, `data.images.crop_geometry`).
  wide = np.zeros((64, 94), bool)
  wide[16:24, 40:48] = True  # resized columns 20 ... 23 -> cropped 12 ... 15
  x, m = editing.fit_inputs(np.repeat((wide * 255).astype(np.uint8)[..., None], 3, axis=-1), wide, resolution=32,
                            channels=1, resize="crop")
  assert sorted({int(c) for c in np.argwhere(m)[:, 1]}) == [12, 13, 14, 15]
  np.testing.assert_array_equal(x[..., 0] > 0, m)
  # crop, enlarging: 8 x 8 -> 16 x 16, a pixel becomes its 2 x 2 block.
  small = np.zeros((8, 8), bool)
  small[3, 3] = True
  assert np.argwhere(editing.fit_mask(small, resolution=16)).tolist() == [[6, 6], [6, 7], [7, 6], [7, 7]]
  # pad: centred on the canvas.
  digit = np.zeros((28, 28), bool)
  digit[0, 0] = True
  assert np.argwhere(editing.fit_mask(digit, resolution=32, resize="pad")).tolist() == [[2, 2]]
  with pytest.raises(ValueError, match="needs a square image no larger than 16x16"):
    editing.fit_mask(np.ones((20, 20), bool), resolution=16, resize="pad")
  edge = np.zeros((32, 48), bool)
  edge[:, :4] = True  # cropped away
  with pytest.raises(ValueError, match="outside the centre 16x16 crop"):
    editing.fit_inputs(image, edge, resolution=16, channels=1)
  assert set(sample_command.EDIT_RESIZE) == set(editing.RESIZE_MODES)


def _png(path, array):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)
  return str(path)


def test_bad_inputs_are_clear_errors(tmp_path):
  image = _png(tmp_path / "in.png", np.full((16, 16), 200))
  mask = np.zeros((16, 16), np.uint8)
  mask[4:8, 4:8] = 255
  good = _png(tmp_path / "mask.png", mask)
  x, m = editing.read_inputs(image, good)
  assert x.shape == (16, 16, 3) and m.sum() == 16
  red = np.zeros((16, 16, 3), np.uint8)
  red[0, 0, 0] = 255  # a bright stroke of any colour counts; dim grey does not
  red[1, 1] = 100
  assert np.argwhere(editing.read_mask(_png(tmp_path / "red.png", red))).tolist() == [[0, 0]]
  # A stroke on a transparent layer: transparent pixels are unset whatever colour they store (here white).
  layer = np.zeros((16, 16, 4), np.uint8)
  layer[..., :3] = 255
  layer[2, 3, 3] = 255
  assert np.argwhere(editing.read_mask(_png(tmp_path / "layer.png", layer))).tolist() == [[2, 3]]
  # A photo stored sideways with an EXIF orientation is read upright, as it is shown and as its mask is drawn.
  stored = np.zeros((8, 16, 3), np.uint8)
  stored[0, 0] = 255
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
  upright = editing.read_image(str(tmp_path / "phone.png"))
  assert upright.shape == (16, 8, 3) and upright[0, 7].min() == 255
  (tmp_path / "empty_file.png").write_bytes(b"")
  (tmp_path / "zeros.png").write_bytes(bytes(64))
  cases = [
      (image, _png(tmp_path / "small.png", mask[:8]), "mask .*small.png is 16x8 pixels but image .*in.png is 16x16"),
      (image, _png(tmp_path / "black.png", np.full((16, 16), 127)), "mask .*black.png is empty"),
      (str(tmp_path / "zeros.png"), good, "image file .*zeros.png is not a decodable image"),
      (image, str(tmp_path / "empty_file.png"), "mask file .*empty_file.png: empty image file"),
  ]
  for img, msk, message in cases:
    with pytest.raises(ValueError, match=message):
      editing.read_inputs(img, msk)
  with pytest.raises(FileNotFoundError, match="image file .*missing.png does not exist"):
    editing.read_inputs(str(tmp_path / "missing.png"), good)
  classes = types.SimpleNamespace(model=types.SimpleNamespace(is_text=False, num_classes=10), workdir="run")
  np.testing.assert_array_equal(editing.condition(classes, class_id=3), [3])
  with pytest.raises(ValueError, match=r"class id 10 is outside \[0, 10\)"):
    editing.condition(classes, class_id=10)
  with pytest.raises(ValueError, match="give a class id"):
    editing.condition(classes, class_id=3, prompt="a seven")
  with pytest.raises(ValueError, match="give the class to paint"):
    editing.condition(classes)
  text = types.SimpleNamespace(model=types.SimpleNamespace(is_text=True), workdir="run")
  with pytest.raises(ValueError, match="not a class"):
    editing.condition(text, class_id=3)


@pytest.fixture(scope="module")
def loaded(tiny_rqvae):
  """The tiny RQ-VAE (16 x 16 x 1 images, codes 8 x 8 x 3, K = 16) under a tiny stage-2 model on its codebook."""
  rq_model, variables, _ = tiny_rqvae
  codebook = variables["quantizer"]["codebook"]
  model, params, _ = helpers.tiny_sampling_model(code_depth=3, num_positions=64, vocab_size=16, embed_dim=4)
  dec = artifact.CodeDecoder((rq_model, variables), batch_size=8)
  return types.SimpleNamespace(model=model, params=params, codebook=codebook, decoder=dec, images=dec.images,
                               workdir="tiny")


KW = dict(t_draft=2, t_revise=2, num_revisions=1, draft=PhaseSettings(), revise=PhaseSettings(temperature=0.8))


def _digit():
  rng = np.random.default_rng(0)
  return np.clip(rng.normal(-0.5, 0.6, (16, 16, 1)), -1, 1).astype(np.float32)


def test_edits_keep_every_code_outside_their_regions(loaded, tmp_path):
  image = _digit()
  inner = np.zeros((16, 16), bool)
  inner[5:9, 6:11] = True  # code rows 2 ... 4, columns 3 ... 5 of the 8 x 8 map (f = 2): 9 positions
  want_inner = np.zeros((8, 8), bool)
  want_inner[2:5, 3:6] = True
  border = np.zeros((16, 16), bool)  # outpainting: the right quarter, a border band
  border[:, 13:] = True  # pixel columns 13 ... 15 -> code columns 6, 7: 16 positions
  want_border = np.zeros((8, 8), bool)
  want_border[:, 6:] = True
  # Two edits of different region sizes in one batch (one compiled program), two samples each.
  edits = editing.inpaint_many(loaded, np.stack([image, image]), np.stack([inner, border]), np.array([[1], [2]]),
                               jax.random.key(0), num_samples=2, **KW)
  # The input's codes, encoded in a batch of two as inpaint_many encodes it (the same compiled encoder).
  codes = editing.encode_images(loaded.decoder.model, loaded.decoder.variables,
                                np.stack([image, image]))[0].reshape(64, 3)
  for edit, want in zip(edits, (want_inner, want_border)):
    np.testing.assert_array_equal(edit.region, want.reshape(-1))
    np.testing.assert_array_equal(edit.codes, codes)
    assert edit.history.shape == (2, 2, 64, 3)
    kept = edit.codes[~edit.region]
    for phase in edit.history:  # the draft and the revision: the kept positions are the input's codes exactly
      for sample in phase:
        np.testing.assert_array_equal(sample[~edit.region], kept)
    assert not np.array_equal(edit.history[-1][0, edit.region], edit.codes[edit.region])  # the region is redrawn
  # The null class (the id guidance drops to) is not a class to paint: refused, as `condition` refuses it.
  null = int(loaded.model.num_classes)
  with pytest.raises(ValueError, match=f"class id {null} is outside \\[0, {null}\\) for this model"):
    editing.inpaint_many(loaded, image[None], inner[None], np.array([[null]]), jax.random.key(0), num_samples=1,
                         **KW)
  edit, mask, want = edits[0], inner, want_inner
  paths = editing.write_edit(loaded, edit, str(tmp_path / "out"), composite=True)
  with np.load(paths["inpaint_npz"]) as f:
    assert f["codes"].shape == (2, 8, 8, 3) and f["history"].shape == (2, 2, 8, 8, 3)
    for c in f["codes"]:
      np.testing.assert_array_equal(c[~want], f["input_codes"][~want])
    np.testing.assert_array_equal(f["region"], want)
    images, source = f["images"], f["input"]
    assert images.shape == (2, 16, 16, 1) and source.shape == (16, 16, 1)
    for result in images:  # composite: the input's own pixels wherever the mask is not set
      np.testing.assert_array_equal(result[~mask], source[~mask])
  scale = 128 // 16  # 16 px images drawn 8x, 2 px padding around each
  cols = 2 + 2  # input, mask, draft, revision
  assert Image.open(paths["strip_png"]).size == (scale * (cols * 18 + 2), scale * (2 * 18 + 2))
  rows = editing.strip(loaded, edit)
  assert rows.shape == (2, cols, 16, 16, 1)
  panel, source = rows[0, 1, ..., 0], rows[0, 0, ..., 0]
  cells = np.zeros((16, 16), bool)
  cells[4:10, 6:12] = True  # code rows 2 ... 4 and columns 3 ... 5
  assert (panel[cells] == editing.REGION_GREY).all()
  np.testing.assert_array_equal(panel[~cells], source[~cells])
