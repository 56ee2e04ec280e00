"""Classification correctness: which examples have their label in the top k."""

import numpy as np


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> np.ndarray:
  """Returns a bool array [N]: is the label among the k highest logits.

  Args:
    logits: [N, C] scores.
    labels: [N] integer class ids, or [N, C] multi-hot / one-hot targets, in
      which case an example is correct when any positive class is in the top k.
    k: how many of the highest scores count.

  Ties are broken towards the lower class index, as `np.argmax` and a stable
  descending sort do, so `k=1` agrees with `argmax(logits) == label`.
  """
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(f'logits must be [N, C], got shape {logits.shape}')
  n, c = logits.shape
  if labels.shape == (n,):
    positive = np.zeros((n, c), dtype=bool)
    positive[np.arange(n), labels.astype(np.int64)] = True
  elif labels.shape == (n, c):
    positive = labels > 0
  else:
    raise ValueError(
        f'labels must be [N] or [N, C] for logits {logits.shape}, got {labels.shape}')
  # A stable argsort of -logits puts tied classes in index order.
  order = np.argsort(-logits, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(positive, order, axis=1).any(axis=1)
