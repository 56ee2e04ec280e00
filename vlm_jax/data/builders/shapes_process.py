"""The build subprocess of a large `shapes` config: `python -m vlm_jax.data.builders.shapes_process
NAME DATA_DIR FORMAT`, started by `shapes_build.build_in_subprocess`. It forks its render workers
before TensorFlow is imported, then builds the dataset with them and reports a failure as one line
on its stdout."""

import os
import sys

from vlm_jax.data.builders import prepared, shapes_build


def main(argv) -> int:
  name, data_dir, file_format = argv
  result = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # tfds prints its progress to stdout: show it on stderr
  count = max(1, int(shapes_build.setting("VLM_JAX_SHAPES_WORKERS", len(os.sched_getaffinity(0)))))
  renderers = shapes_build.Renderers(count, shapes_build.setting("VLM_JAX_SHAPES_WORKER_TIMEOUT_S", 300))
  shapes_build.exit_with_parent()
  try:
    # Imported after the workers are forked: TensorFlow starts threads.
    from vlm_jax.data.builders import shapes
    print(f"Building dataset {name} with {count} render processes", file=sys.stderr, flush=True)
    shapes.download(shapes.builder(name, data_dir), file_format or None, render=renderers.render)
  except Exception as e:  # noqa: BLE001  (reported to the parent as one line)
    failed = shapes_build.find_cause(e, shapes_build.RenderError)
    err = prepared.write_error(e, f"dataset '{name}'", data_dir)
    if failed is None and err is None:
      raise
    print(err or f"building dataset '{name}' failed: {failed}. Run again; nothing partial is kept "
          f"(VLM_JAX_SHAPES_WORKERS=1 renders in one process).", file=result, flush=True)
    return 2
  finally:
    renderers.close()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
