"""Metrics out of a training run: JSONL + TensorBoard scalars, PNG image grids, progress bars.

Layout of a workdir written by `MetricWriter`:

    workdir/metrics.jsonl                  one {"step": s, "name": value, ...} line per call
    workdir/tensorboard/events.out.tfevents.*   (tensorboardX; no TensorFlow needed)
    workdir/images/{name}_{step:06d}.png   image grids

Behaviour that matters when runs are resumed or spread over hosts:
  * Only process 0 writes (`enabled=None` means `parallel.is_main_process()`); a disabled
    writer creates no file and no directory.
  * metrics.jsonl is opened in append mode and never truncated. Each record is written and
    flushed as one line, so a crash loses at most the line being written; if a previous run
    died mid-line the fragment is closed with a newline and `read_jsonl` reports it.
    After resuming from a checkpoint the file can hold records for steps past that
    checkpoint twice (once from the lost run); `read_jsonl(..., last_per_step=True)` keeps
    the newest record of each step.
  * Values are converted to Python floats (jax/numpy scalars and size-1 arrays included);
    non-scalars raise TypeError naming the key. NaN/inf are written as JSON's NaN/Infinity
    (Python's json reads them back).

Image grid (eq. 1): N images of H x W go into rows = ceil(N / ncols) rows; image i sits at
row r = i // ncols, column c = i % ncols, with its top-left pixel at

    (pad + r * (H + pad),  pad + c * (W + pad))

in a canvas of (rows * (H + pad) + pad) x (ncols * (W + pad) + pad) filled with pad_value.
Float pixels are clipped to [0, 1] and mapped to uint8 by round(255 * x); ncols defaults
to ceil(sqrt(N)).

Diversity of samples x_i with labels y_i (eq. 2), the mean pairwise L2 distance within a
class, averaged over the classes C that hold at least two samples (n_c of them):

    D = (1/|C|) Σ_{c ∈ C} (2 / (n_c (n_c − 1))) Σ_{i < j, y_i = y_j = c} ‖x_i − x_j‖₂

(the norm over all non-batch dimensions). A fine-tuned generator that hacks its reward by
collapsing each class onto a few images shows D falling toward 0. D is NaN when no class
has two samples.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from alignjax import parallel

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


# --------------------------------------------------------------------------- images
def to_uint8(images: Any) -> np.ndarray:
  """uint8 copy of float images in [0, 1] (clipped; NaN -> 0); uint8 input is kept."""
  arr = np.asarray(images)
  if arr.dtype == np.uint8:
    return arr.copy()
  if not np.issubdtype(arr.dtype, np.floating):
    raise TypeError(f"images must be float in [0, 1] or uint8, got dtype {arr.dtype}")
  arr = np.nan_to_num(arr.astype(np.float64), nan=0.0)
  return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def image_grid(
    images: Any, ncols: int | None = None, *, pad: int = 1, pad_value: float = 0.5
) -> np.ndarray:
  """uint8 grid [rows*(H+pad)+pad, ncols*(W+pad)+pad, C] of images [N, H, W, C] (eq. 1)."""
  arr = to_uint8(images)
  if arr.ndim != 4 or arr.shape[0] == 0:
    raise ValueError(f"images must have shape [N, H, W, C] with N >= 1, got {arr.shape}")
  n, h, w, c = arr.shape
  ncols = math.ceil(math.sqrt(n)) if ncols is None else int(ncols)
  if ncols < 1:
    raise ValueError(f"ncols={ncols}: must be >= 1")
  if pad < 0:
    raise ValueError(f"pad={pad}: must be >= 0")
  ncols = min(ncols, n)
  rows = math.ceil(n / ncols)
  fill = to_uint8(np.float64(pad_value))
  grid = np.full((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), fill, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top : top + h, left : left + w] = arr[i]
  return grid


def save_png(path: str | os.PathLike, array: Any) -> str:
  """Writes an image [H, W], [H, W, 1|3|4] (uint8, or float in [0, 1]) as PNG."""
  from PIL import Image

  arr = to_uint8(array)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
    raise ValueError(
        f"cannot save an image of shape {np.shape(array)} as PNG; "
        "expected [H, W] or [H, W, C] with C in 1, 3, 4"
    )
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(arr).save(path, format="PNG")
  return path


# --------------------------------------------------------------------------- diversity
def within_class_diversity(samples: Any, labels: Any = None) -> float:
  """D of eq. 2 for samples [N, ...] and int labels [N] (None: one class); float64."""
  x = np.asarray(samples, np.float64)
  if x.ndim < 1 or x.shape[0] == 0:
    raise ValueError(f"samples must have shape [N, ...] with N >= 1, got {x.shape}")
  x = x.reshape(x.shape[0], -1)
  y = np.zeros(x.shape[0], np.int64) if labels is None else np.asarray(labels)
  if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(
        f"labels must be integers of shape ({x.shape[0]},) (one per sample), "
        f"got {y.dtype} {y.shape}"
    )
  per_class = []
  for c in np.unique(y):
    xc = x[y == c]
    n = xc.shape[0]
    if n < 2:
      continue
    gram = xc @ xc.T
    sq = np.diag(gram)[:, None] + np.diag(gram)[None, :] - 2.0 * gram
    upper = np.triu_indices(n, k=1)
    per_class.append(np.mean(np.sqrt(np.maximum(sq[upper], 0.0))))  # eq. 2, class c
  return float(np.mean(per_class)) if per_class else float("nan")


# --------------------------------------------------------------------------- scalars
def _to_float(key: str, value: Any) -> float:
  try:
    arr = np.asarray(value)
  except Exception as e:  # e.g. a jax array that cannot be fetched
    raise TypeError(f"metric {key!r}: cannot convert {type(value).__name__}: {e}") from e
  if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
    raise TypeError(
        f"metric {key!r} must be a number or a size-1 array, got "
        f"{type(value).__name__} with shape {arr.shape} dtype {arr.dtype}"
    )
  return float(arr.reshape(()))


def read_jsonl(
    path: str | os.PathLike, *, skip_invalid: bool = False, last_per_step: bool = False
) -> list[dict]:
  """Records of a metrics.jsonl file, in file order.

  A malformed line raises ValueError naming file and line (or, with `skip_invalid`, is
  skipped with a warning). `last_per_step=True` keeps only the newest record of each step
  (sorted by step), which is what a resumed run's duplicates call for.
  """
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError("not a JSON object")
      except ValueError as e:
        message = f"{path}:{lineno}: malformed metrics line ({e}): {line[:80]!r}"
        if not skip_invalid:
          raise ValueError(message) from None
        warnings.warn(message, stacklevel=2)
        continue
      records.append(record)
  if last_per_step:
    by_step = {}
    for record in records:
      by_step[record.get("step")] = record
    records = [by_step[s] for s in sorted(by_step, key=lambda s: (s is None, s))]
  return records


def curves_from_records(records: Iterable[Mapping], keys: Iterable[str]) -> dict:
  """{key: (steps, values)} for `plot_curves` from JSONL records holding `key`."""
  curves = {}
  for key in keys:
    pairs = [(r["step"], r[key]) for r in records if key in r]
    if not pairs:
      raise KeyError(f"no record holds metric {key!r}")
    curves[key] = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
  return curves


def plot_curves(
    path: str | os.PathLike,
    curves: Mapping[str, tuple],
    *,
    title: str | None = None,
    xlabel: str = "step",
    ylabel: str | None = None,
    logy: bool = False,
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
) -> str:
  """Line plot of {name: (steps, values)} saved as a PNG (matplotlib Agg, no pyplot)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not curves:
    raise ValueError("plot_curves needs at least one curve")
  fig = Figure(figsize=figsize, dpi=dpi)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for name, (steps, values) in curves.items():
    steps, values = np.asarray(steps), np.asarray(values)
    if steps.shape != values.shape or steps.ndim != 1:
      raise ValueError(
          f"curve {name!r}: steps {steps.shape} and values "
          f"{values.shape} must be 1-D of the same length"
      )
    ax.plot(steps, values, label=str(name))
  ax.set_xlabel(xlabel)
  if ylabel:
    ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, format="png")
  return path


# --------------------------------------------------------------------------- progress
class _LogLines:
  """Stream for tqdm that writes each bar update as one line ending in a newline.

  tqdm redraws a bar in place: '\\r' + bar + spaces (to cover a longer previous bar), plus
  cursor moves for nested bars. In a log file that is one ever-growing line of carriage
  returns; here every redraw becomes `bar + '\\n'`, and a redraw repeating the previous
  line or holding nothing but whitespace and control characters (the final '\\n', a
  cleared bar) is dropped.
  """

  _CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\r")

  def __init__(self, stream: Any):
    self._stream = stream
    self._last = None

  def write(self, text: str) -> int:
    line = self._CONTROL.sub("", str(text)).strip()
    if line and line != self._last:  # the closing redraw often repeats the last update
      self._stream.write(line + "\n")
      self._last = line
    return len(text)

  def flush(self) -> None:
    getattr(self._stream, "flush", lambda: None)()

  def isatty(self) -> bool:
    return False


def _isatty(stream: Any) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
    return False


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool | None = None,
    log_interval: float = 10.0,
    **kwargs: Any,
):
  """tqdm progress bar (rate and ETA); silent on processes other than 0.

  On a terminal the bar is redrawn in place (tqdm's defaults, width following the
  terminal). When its stream (`file`, default sys.stderr) is not a terminal, as in CI, under
  nohup or in a cluster job's log, it is written as plain ASCII lines, one per update,
  at most one every `log_interval` seconds (plus the first and the last). Any tqdm
  argument passed in `kwargs` (e.g. `mininterval`, `ascii`) overrides these choices.
  """
  from tqdm.asyncio import tqdm as console_tqdm
  from tqdm.auto import tqdm

  enabled = parallel.is_main_process() if enabled is None else enabled
  stream = kwargs.pop("file", None) or sys.stderr
  if tqdm is not console_tqdm or _isatty(stream):  # a notebook's widget, or a terminal
    options = {"file": stream, "dynamic_ncols": True}
  else:
    options = {
        "file": _LogLines(stream),
        "mininterval": log_interval,
        "maxinterval": log_interval,  # tqdm's monitor thread: no forced redraw sooner
        "ascii": True,
    }
  options.update(kwargs)
  return tqdm(iterable, total=total, desc=desc, disable=not enabled, **options)


# --------------------------------------------------------------------------- writer
class MetricWriter:
  """Writes scalars (JSONL + TensorBoard) and image grids (PNG + TensorBoard).

  `enabled=None` means "only on process 0". Use as a context manager or call `close()`.
  """

  def __init__(
      self, workdir: str | os.PathLike, *, enabled: bool | None = None, tensorboard: bool = True
  ):
    self.workdir = os.fspath(workdir)
    self.enabled = parallel.is_main_process() if enabled is None else bool(enabled)
    self.jsonl_path = os.path.join(self.workdir, "metrics.jsonl")
    self.image_dir = os.path.join(self.workdir, "images")
    self.tensorboard_dir = os.path.join(self.workdir, "tensorboard")
    self._jsonl = None
    self._tb = None
    self._closed = False
    if not self.enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    if self._jsonl.tell() > 0:  # close a line left unfinished by a crashed run
      with open(self.jsonl_path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          self._jsonl.write("\n")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(logdir=self.tensorboard_dir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends {"step": step, **scalars} (as floats) to metrics.jsonl and TensorBoard."""
    if "step" in scalars:
      raise ValueError("'step' is reserved in metrics; pass it as the step argument")
    self._check_open()
    values = {str(k): _to_float(str(k), v) for k, v in scalars.items()}
    if not self.enabled:
      return
    step = int(step)
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(key, value, global_step=step)

  def write_images(
      self, step: int, name: str, images: Any, *, ncols: int | None = None, scale: int = 1
  ) -> str | None:
    """Saves images [N, H, W, C] in [0, 1] as a grid PNG; returns its path (or None).

    `scale` enlarges the grid by pixel repetition (nearest neighbour), e.g. 4 for the
    8x8 digits, so small samples stay visible in image viewers and TensorBoard.
    """
    if not _NAME.match(name):
      raise ValueError(f"image name {name!r} must match {_NAME.pattern}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
      raise ValueError(f"scale={scale!r}: must be an int >= 1")
    self._check_open()
    grid = image_grid(images, ncols)
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    if not self.enabled:
      return None
    path = save_png(os.path.join(self.image_dir, f"{name}_{int(step):06d}.png"), grid)
    if self._tb is not None:
      rgb = np.repeat(grid, 3, axis=-1) if grid.shape[-1] == 1 else grid
      self._tb.add_image(name, rgb, global_step=int(step), dataformats="HWC")
    return path

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError(f"MetricWriter({self.workdir!r}) is closed")

  def flush(self) -> None:
    """Flushes the JSONL file and TensorBoard events to disk."""
    if self._jsonl is not None:
      self._jsonl.flush()
      os.fsync(self._jsonl.fileno())
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes; further writes raise."""
    if self._jsonl is not None:
      self.flush()
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._closed = True

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
