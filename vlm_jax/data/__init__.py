"""Input: tensorflow-datasets sources, tf.data preprocessing, numpy batches per host. Never imports jax."""
