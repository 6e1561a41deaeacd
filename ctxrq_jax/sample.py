"""Draft-and-Revise samples from a trained stage-2 run: PNG grids and an FID-ready .npz (library: ctxrq_jax/sampling/).

  python -m ctxrq_jax.sample --workdir=runs/demo/stage2 --classes=all --num_per_class=10
  python -m ctxrq_jax.sample --workdir=runs/imagenet --classes=1,207,980 --num_per_class=8 \
      --t_draft=64 --t_revise=2 --num_revisions=2 --revise_guidance=1.8 --revise_temperature=0.8
  python -m ctxrq_jax.sample --workdir=runs/cc3m --prompts="a red bus on a city street;a painting of a dog" \
      --num_per_prompt=8      (or --prompts_file=FILE, one prompt per line; text-to-image runs)

Phase settings default to the run's `config.sample` section (the paper's Table 3 setting: no guidance and
temperature 1 in the draft, temperature 0.8 and guidance 1.8 in the revisions). Guidance follows Ho & Salimans:
logits = cond + s (cond - uncond), s = 0 is the conditional model alone. Only the parameters are restored (EMA when
the run kept them), never the optimizer state.

Writes to --out (default WORKDIR/samples): samples.png (final samples, a preview of at most --preview_per_class x
--preview_classes), phases.png (the draft and each revision side by side), samples.npz (arr_0 uint8 [M, H, W, 3],
labels, codes; every sample) and samples.json (the run, step, parameters and every setting that drew them). For a
text-to-image run each grid row is one prompt, written under every image, and the npz adds `prompts` and `cond` (the
caption tokens). An existing OUT/samples.npz (a 50k-sample FID set took hours) is replaced only with --overwrite,
which also removes the files that described it (its samples.json and `evaluate`'s samples.fid.json / .clip.json).
A flag the chosen mode does not read (`MODE_FLAGS`: --class without `inpaint`, --classes with it, ...) is an error.
Sample i is drawn with random numbers that depend on the seed, its index and the settings only, whatever the batch
size or device count (its codes are bit-identical when each device draws as many rows; other per-device batch shapes
round the logits differently in the last bits, which can flip a rare code: such sets agree in distribution, not bit
for bit). On a multi-host slice every host draws its block of the (class-conditional) sample indices into
OUT/shards/ and host 0 merges them into OUT/samples.npz (`--merge` redoes that merge alone).

Inpainting and outpainting from pixels (library: ctxrq_jax/sampling/editing.py, whose doc has the details):

  python -m ctxrq_jax.sample inpaint --workdir=runs/demo/stage2 --image=digit.png --mask=mask.png --class=3 \
      --out=runs/demo/inpaint [--num_samples=4] [--resize=crop|pad] [--composite]
  python -m ctxrq_jax.sample inpaint --workdir=runs/cc3m --image=photo.jpg --mask=mask.png \
      --prompt="a red bus on a city street"      (text-to-image runs)

The image is fitted to the RQ-VAE's resolution (--resize), the mask (same size as the image in pixels, white =
regenerate) marks the code cells to redraw: a code position is regenerated when its f x f pixel cell (f = the
downsampling factor) overlaps the mask; every other code is kept exactly. A mask on a border outpaints. Writes
OUT/inpainted.png (each sample's result), OUT/strip.png (per sample: input, mask, draft, each revision) and
OUT/inpaint.npz (default OUT: WORKDIR/inpaint); an existing OUT/inpaint.npz (an earlier edit) is replaced only with
--overwrite. T_draft and T_revise default to the run's, capped at the number of regenerated positions.
"""

from absl import app
from absl import flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS
DRAFT_MODES = ("random", "confidence")  # ctxrq_jax.sampling.decoder.DRAFT_MODES (a test keeps them equal)
EDIT_RESIZE = ("crop", "pad")  # ctxrq_jax.sampling.editing.RESIZE_MODES (a test keeps them equal)
SUBCOMMANDS = ("inpaint",)
# The command's three modes, as `core.cli.check_flags` names them: drawing a sample set, `sample inpaint`, and
# `sample --merge` (only the merge of a multi-host job's shards).
SAMPLE, INPAINT, MERGE = "", "inpaint", "--merge"
_DRAW = (SAMPLE, INPAINT)  # how samples are drawn: read by both modes that draw
# The modes that read each flag (--workdir and --out: all three); any other is an error naming the flag, e.g.
# `sample --class=3` (a slip for --classes=3) drew every class.
MODE_FLAGS = {
    **{name: (SAMPLE,) for name in ("classes", "num_per_class", "prompts", "prompts_file", "num_per_prompt",
                                    "batch_size", "preview_per_class", "preview_classes")},
    **{name: (INPAINT,) for name in ("image", "mask", "class", "prompt", "num_samples", "resize", "composite")},
    **{name: _DRAW for name in ("tokenizer_dir", "seed", "t_draft", "t_revise", "num_revisions", "draft_mode",
                                "confidence_noise", "use_ema")},
    **{f"{phase}_{name}": _DRAW for phase in ("draft", "revise") for name in ("temperature", "guidance", "top_k",
                                                                             "top_p")},
    "merge": (SAMPLE, MERGE)}


def define_flags() -> None:
  """Command-line flags; unset phase settings fall back to the run's config.sample."""
  flags.DEFINE_string("workdir", None, "Stage-2 workdir (config.json + checkpoints); required but with --merge --out.")
  flags.DEFINE_string("out", None, "Output directory (default WORKDIR/samples).")
  flags.DEFINE_string("classes", "all", "'all' or comma-separated class ids.")
  flags.DEFINE_integer("num_per_class", 10, "Samples per class (or per prompt).")
  flags.DEFINE_string("prompts", None, "Text-to-image: prompts separated by ';'.")
  flags.DEFINE_string("prompts_file", None, "Text-to-image: a file of prompts, one per line.")
  flags.DEFINE_integer("num_per_prompt", None, "Text-to-image: samples per prompt (default --num_per_class).")
  flags.DEFINE_string("tokenizer_dir", None, "Text-to-image: BPE files (default the run's config.data.tokenizer_dir).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("batch_size", None, "Samples per jitted call (default config.sample.batch_size).")
  flags.DEFINE_integer("t_draft", None, "T_draft.")
  flags.DEFINE_integer("t_revise", None, "T_revise.")
  flags.DEFINE_integer("num_revisions", None, "M, the number of revisions.")
  flags.DEFINE_enum("draft_mode", "random", list(DRAFT_MODES), "Draft UPDATE: random partitions (paper) or "
                    "MaskGIT-style confidence.")
  flags.DEFINE_float("confidence_noise", 0.0, "--draft_mode=confidence: scale of the Gumbel noise added to the "
                     "confidences, annealed to 0 over the draft (MaskGIT uses 4.5; 0 = greedy).", lower_bound=0.0)
  for phase in ("draft", "revise"):
    flags.DEFINE_float(f"{phase}_temperature", None, f"{phase} temperature (0 = argmax).")
    flags.DEFINE_float(f"{phase}_guidance", None, f"{phase} classifier-free guidance scale s.")
    flags.DEFINE_integer(f"{phase}_top_k", None, f"{phase} top-k (0 = off).")
    flags.DEFINE_float(f"{phase}_top_p", None, f"{phase} top-p (1 = off).")
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.")
  flags.DEFINE_integer("preview_per_class", 10, "At most this many samples per class (prompt) in the PNG grids.")
  flags.DEFINE_integer("preview_classes", 16, "At most this many classes (prompts) in the PNG grids (the npz has all).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing OUT/samples.npz (and remove the results that described "
                    "it: samples.json, samples.fid.json, samples.clip.json); inpaint: an existing OUT/inpaint.npz "
                    "and its PNGs.")
  flags.DEFINE_bool("merge", False, "Only merge OUT/shards/samples-*-of-*.npz (one per host of a multi-host run) "
                    "into OUT/samples.npz.")
  flags.DEFINE_string("image", None, "inpaint: the image file to edit.")
  flags.DEFINE_string("mask", None, "inpaint: the mask file, the image's size; white marks what to regenerate.")
  flags.DEFINE_integer("class", None, "inpaint, class-conditional runs: the class id to paint.")
  flags.DEFINE_string("prompt", None, "inpaint, text-to-image runs: the caption to paint.")
  flags.DEFINE_integer("num_samples", 4, "inpaint: completions drawn of the one image.")
  flags.DEFINE_enum("resize", "crop", list(EDIT_RESIZE), "inpaint: fit the image to the RQ-VAE resolution by "
                    "scaling its shorter side and cropping the centre (crop), or centring a smaller square image on "
                    "black (pad, e.g. 28x28 digits).")
  flags.DEFINE_bool("composite", False, "inpaint: paste the input's pixels back outside the mask.")


def _phase(phase: str, default):
  """The run's `config.sample.<phase>` section with the --<phase>_* flags that were given laid over it."""
  from ctxrq_jax.sampling import logits  # pylint: disable=g-import-not-at-top
  values = dict(default)
  for name in ("temperature", "guidance", "top_k", "top_p"):
    flag = getattr(FLAGS, f"{phase}_{name}")
    if flag is not None:
      values[name] = flag
  return logits.PhaseSettings.from_config(values)


def _read_inpaint_inputs():
  """The inpaint flags and files a user can get wrong, checked before the model is loaded: (image, mask) arrays."""
  from ctxrq_jax.sampling import editing  # pylint: disable=g-import-not-at-top
  for name in ("image", "mask"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"inpaint needs --{name}=FILE")
  if FLAGS.num_samples < 1:
    raise app.UsageError(f"--num_samples must be >= 1, got {FLAGS.num_samples}")
  return editing.read_inputs(FLAGS.image, FLAGS.mask)


def _inpaint(loaded, settings: dict, inputs, out_dir: str, write: bool) -> None:
  """`sample inpaint`: one image, its mask, --num_samples completions written to `out_dir`."""
  import jax  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.sampling import editing  # pylint: disable=g-import-not-at-top
  stage1 = loaded.decoder.model
  image, mask = editing.fit_inputs(*inputs, resolution=stage1.resolution, channels=stage1.in_channels,
                                   resize=FLAGS.resize)
  loaded.tokenizer_dir = FLAGS.tokenizer_dir  # text-to-image runs: None keeps the run's config.data.tokenizer_dir
  cond = editing.condition(loaded, class_id=FLAGS["class"].value, prompt=FLAGS.prompt)
  size = int(editing.mask_to_region(mask, stage1.latent_size).sum())
  s = loaded.config.sample
  steps = dict(t_draft=editing.default_steps(FLAGS.t_draft, s.T_draft, size),
               t_revise=editing.default_steps(FLAGS.t_revise, s.T_revise, size))
  kwargs = {k: v for k, v in {**settings, **steps}.items() if k != "batch_size"}  # one batch of num_samples
  edit = editing.inpaint(loaded, image, mask, cond, jax.random.key(FLAGS.seed), num_samples=FLAGS.num_samples,
                         **kwargs)
  if not write:
    return
  paths = editing.write_edit(loaded, edit, out_dir, composite=FLAGS.composite)
  h, w, _ = stage1.code_shape
  print(f"{FLAGS.num_samples} completions of {size} of {h * w} code positions of {FLAGS.image} from {FLAGS.workdir} "
        f"(step {loaded.step}, {loaded.params_name}; T_draft {steps['t_draft']}, T_revise {steps['t_revise']}, "
        f"M {settings['num_revisions']})")
  for name, path in paths.items():
    print(f"{name}: {path}")


def _refuse_existing(npz: str, what: str) -> None:
  """UsageError when `npz` (`what` it holds) exists and --overwrite is off (checked before the run is loaded)."""
  from ctxrq_jax.core import paths  # pylint: disable=g-import-not-at-top
  if paths.path(npz).exists() and not FLAGS.overwrite:
    raise app.UsageError(f"{npz} exists ({what}); pass --overwrite to replace it, or choose another --out")


def main(argv: list[str]) -> None:
  if len(argv) > 2 or (len(argv) == 2 and argv[1] not in SUBCOMMANDS):
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}; usage: python -m ctxrq_jax.sample "
                         "[inpaint] --workdir=DIR ...")
  mode = INPAINT if len(argv) == 2 else MERGE if FLAGS.merge else SAMPLE
  cli.check_flags("sample", mode, MODE_FLAGS)
  if not FLAGS.workdir and not (FLAGS.merge and FLAGS.out):
    raise app.UsageError("--workdir=DIR is required (only --merge with --out=DIR goes without it)")
  edit_inputs = _read_inpaint_inputs() if mode == INPAINT else None
  for name in ("num_per_class", "preview_per_class", "preview_classes", "batch_size", "num_per_prompt"):
    if FLAGS[name].value is not None and FLAGS[name].value < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {FLAGS[name].value}")
  if not 0 <= FLAGS.seed < 2**32:  # JAX keys keep 32 bits of the seed: larger ones would repeat smaller ones' samples
    raise app.UsageError(f"--seed must be in [0, 2**32), got {FLAGS.seed}")
  from ctxrq_jax.core import paths  # pylint: disable=g-import-not-at-top
  out_dir = FLAGS.out or str(paths.path(FLAGS.workdir) / ("inpaint" if mode == INPAINT else "samples"))
  if paths.path(out_dir).exists() and not paths.path(out_dir).is_dir():  # before the samples, not after them
    raise app.UsageError(f"--out={out_dir} is a file; --out names a directory (the outputs are written inside it)")
  if mode == INPAINT:
    _refuse_existing(str(paths.path(out_dir) / "inpaint.npz"), "an earlier edit")
  else:
    _refuse_existing(str(paths.path(out_dir) / "samples.npz"), "an earlier sample set")
  import jax  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.core import host  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.sampling import loader  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.sampling import runner  # pylint: disable=g-import-not-at-top

  host.setup_host()
  if mode == MERGE:
    print(f"samples_npz: {runner.merge_shards(out_dir)}")
    return
  loaded = loader.Stage2Model(FLAGS.workdir, use_ema=FLAGS.use_ema)
  s = loaded.config.sample
  pick = lambda v, d: d if v is None else v  # noqa: E731
  settings = dict(batch_size=int(pick(FLAGS.batch_size, s.batch_size)), t_draft=int(pick(FLAGS.t_draft, s.T_draft)),
                  t_revise=int(pick(FLAGS.t_revise, s.T_revise)), num_revisions=int(pick(FLAGS.num_revisions, s.M)),
                  draft=_phase("draft", s.draft), revise=_phase("revise", s.revise), draft_mode=FLAGS.draft_mode,
                  confidence_noise=FLAGS.confidence_noise)
  if edit_inputs is not None:  # every host runs the same edit on its own devices; process 0 writes it
    _inpaint(loaded, settings, edit_inputs, out_dir, host.is_chief())
    return
  if loaded.model.is_text:
    if FLAGS["classes"].present:
      raise app.UsageError(f"{FLAGS.workdir} is a text-to-image run: use --prompts or --prompts_file, not --classes")
    loaded.tokenizer_dir = FLAGS.tokenizer_dir
    prompts = runner.read_prompts(FLAGS.prompts, FLAGS.prompts_file)
    per_prompt = int(pick(FLAGS.num_per_prompt, FLAGS.num_per_class))
    written = runner.sample_prompts(loaded, prompts, out_dir, per_prompt=per_prompt, rng=jax.random.key(FLAGS.seed),
                                    preview_per_prompt=FLAGS.preview_per_class,
                                    preview_prompts=FLAGS.preview_classes, **settings)
    drawn = dict(prompts=prompts, per_prompt=per_prompt, num_samples=len(prompts) * per_prompt)
    summary = f"{len(prompts) * per_prompt} samples of {len(prompts)} prompts"
  else:
    for name, hint in (("prompts", "use --classes"), ("prompts_file", "use --classes"),
                       ("num_per_prompt", "use --num_per_class"), ("tokenizer_dir", "it reads no captions")):
      if FLAGS[name].present:
        raise app.UsageError(f"{FLAGS.workdir} is a class-conditional run: --{name} does not apply ({hint})")
    ids = runner.parse_classes(FLAGS.classes, int(loaded.config.model.num_classes))
    written = runner.sample_classes(loaded, ids, out_dir, per_class=FLAGS.num_per_class,
                                    rng=jax.random.key(FLAGS.seed), preview_per_class=FLAGS.preview_per_class,
                                    preview_classes=FLAGS.preview_classes, **settings)
    drawn = dict(classes=ids, per_class=FLAGS.num_per_class, num_samples=len(ids) * FLAGS.num_per_class)
    summary = f"{len(ids) * FLAGS.num_per_class} samples of {len(ids)} classes"
  if not written:  # another host: process 0 merged the shards and reports
    return
  # After the npz (whose replacement removed the samples.json of the set before): the settings that drew this one.
  written["settings_json"] = runner.write_settings(out_dir, runner.settings_record(loaded, FLAGS.seed, settings,
                                                                                   **drawn))
  print(f"{summary} from {FLAGS.workdir} (step {loaded.step}, {loaded.params_name})")
  for name, path in written.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  cli.run(main, define_flags)
