"""python tools/convert_to_hf.py --workdir DIR [--step N] --out HF_DIR [--overwrite] [--encoder_only]

Writes a training run as a Hugging Face folder (safetensors, config.json, preprocessor_config.json,
and for runs with text the tokenizer and generation_config.json) that
`transformers` loads offline with `from_pretrained(HF_DIR)`:
  classification, pool 'cls'   -> ViTForImageClassification (ViTModel with --encoder_only)
  classification, pool 'gap'   -> SiglipForImageClassification (SiglipVisionModel with --encoder_only)
  captioning / VQA             -> VisionEncoderDecoderModel (ViT or SigLIP encoder + GPT-2 decoder)
  contrastive                  -> SiglipModel (siglip_shapes layout) or CLIPModel (clip_shapes layout),
                                  with tokenizer: pipeline("zero-shot-image-classification") works
The mapping lives in vlm_jax/hf/ (one module per model family).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from vlm_jax import config as config_lib  # noqa: E402
from vlm_jax.errors import run_cli  # noqa: E402

FLAGS = flags.FLAGS


def main(argv=None):
  argv = sys.argv if argv is None else argv
  flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_string("out", None, "The Hugging Face folder to write (must be new or empty).")
  flags.DEFINE_bool("overwrite", False, "Replace the contents of a non-empty --out folder.")
  flags.DEFINE_bool("encoder_only", False, "Classification runs: export the ViT without its head.")
  flags.DEFINE_string("mesh", None, "Mesh to restore onto (default: the run's where it fits, else FSDP over the devices).")
  flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
  flags.mark_flags_as_required(["workdir", "out"])

  def run():
    config_lib.parse_argv(FLAGS, argv)
    from vlm_jax.hf.export import export_workdir
    r = export_workdir(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.overwrite, FLAGS.encoder_only, FLAGS.mesh)
    if r["class"]:
      print(f"Wrote {r['class']} (step {r['step']}) to {r['out']}", flush=True)
  sys.exit(run_cli(run, argv))


if __name__ == "__main__":
  main()
