"""Per-example tf ops: decode, resize, augment, normalise. Pure functions of (example, seed)."""

import tensorflow as tf


def decode_image(encoded) -> tf.Tensor:
  img = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  img.set_shape([None, None, 3])
  return img


def inception_crop(img, seed, scale=(0.08, 1.0)):
  """Random crop of a fraction `scale` of the area, aspect ratio in [3/4, 4/3] (stateless)."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(img), tf.zeros([0, 0, 4], tf.float32), seed=seed, area_range=scale,
      aspect_ratio_range=(0.75, 1.33), min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
  return tf.slice(img, begin, size)


def resize(img, size: int):
  return tf.image.resize(img, (size, size), method="bilinear", antialias=True)


def normalize(img, mean, std):
  img = tf.cast(img, tf.float32) / 255.0
  return (img - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def train_image(encoded, seed, size: int, crop_scale, flip: bool, mean, std):
  img = decode_image(encoded)
  if tuple(crop_scale) != (1.0, 1.0):
    img = inception_crop(img, seed, crop_scale)
  img = resize(img, size)
  if flip:
    img = tf.image.stateless_random_flip_left_right(img, seed=seed + 1)
  return normalize(img, mean, std)


def eval_image(encoded, size: int, mean, std):
  return normalize(resize(decode_image(encoded), size), mean, std)
