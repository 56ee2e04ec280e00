"""data.preprocess.resize is Pillow's bilinear resize, bit for bit (what an exported model's
ViTImageProcessor does), for down- and upscaling, wide and tall images, odd sizes."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vlm_jax.data import preprocess

# (height, width, size): both axes down, both up, one each way, tall enough for Pillow's
# height-first order, 1-pixel axes, already the right size.
CASES = [(45, 37, 32), (37, 45, 32), (20, 24, 64), (300, 40, 64), (40, 300, 64), (120, 30, 17),
         (97, 64, 64), (64, 97, 64), (1, 9, 5), (9, 1, 5), (64, 64, 64), (224, 161, 224), (481, 640, 224)]


@pytest.mark.parametrize("h,w,size", CASES)
def test_resize_equals_pillow_bilinear(h, w, size):
  rng = np.random.default_rng(h * 1000 + w)
  noise = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  smooth = np.asarray(Image.fromarray(noise[: max(h // 5, 1), : max(w // 5, 1)]).resize((w, h)))
  for img in (noise, smooth):
    want = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    got = preprocess.resize(tf.constant(img), size).numpy()
    assert got.dtype == np.uint8 and got.shape == (size, size, 3)
    np.testing.assert_array_equal(got, want)


def test_resize_runs_in_a_tf_function_with_unknown_shape():
  f = tf.function(lambda x: preprocess.resize(x, 16), input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
  img = np.random.default_rng(0).integers(0, 256, size=(50, 21, 3), dtype=np.uint8)
  np.testing.assert_array_equal(f(img).numpy(), np.asarray(Image.fromarray(img).resize((16, 16), Image.BILINEAR)))


@pytest.mark.parametrize("h,w", [(32, 32), (32, 40), (20, 32)])
def test_train_image_skips_resampling_only_when_already_the_size(h, w):
  """The skip (the shapes recipes' input cost fell from ~3300 to ~8300 img/s) changes no pixel."""
  img = np.random.default_rng(h + w).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  png = tf.io.encode_png(img)
  got = preprocess.train_image(png, tf.constant([1, 2], tf.int64), 32, (1.0, 1.0), False, (0.0,) * 3, (1.0,) * 3)
  want = tf.image.resize(img, (32, 32), method="bilinear", antialias=True) / 255.0
  np.testing.assert_array_equal(got.numpy(), want.numpy())
  assert got.shape == (32, 32, 3)
