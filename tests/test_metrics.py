"""Tests for alignjax.metrics: JSONL, TensorBoard events, image grids, progress, plots."""

import glob
import io
import re
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from alignjax import metrics


def read_events(path):
  """Parses a TFRecord event file by hand, checking both masked CRCs of every record."""

  def masked(data):
    x = crc32c(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  events = []
  with open(path, "rb") as f:
    raw = f.read()
  pos = 0
  while pos < len(raw):
    header = raw[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", raw[pos + 8 : pos + 12])
    assert header_crc == masked(header)
    data = raw[pos + 12 : pos + 12 + length]
    (data_crc,) = struct.unpack("<I", raw[pos + 12 + length : pos + 16 + length])
    assert data_crc == masked(data)
    events.append(event_pb2.Event.FromString(data))
    pos += 16 + length
  return events


# --------------------------------------------------------------------------- JSONL
def test_jsonl_content_exact_and_append(tmp_path):
  with metrics.MetricWriter(tmp_path, enabled=True) as w:
    w.write_scalars(
        1,
        {
            "loss": jnp.float32(0.5),
            "acc": np.float64(0.25),
            "n": 3,
            "arr": np.array([2.0]),
            "flag": np.bool_(True),
        },
    )
    w.write_scalars(np.int64(2), {"loss": jnp.array(0.125)})
  text = (tmp_path / "metrics.jsonl").read_text()
  assert text == (
      '{"step": 1, "loss": 0.5, "acc": 0.25, "n": 3.0, "arr": 2.0, "flag": 1.0}\n'
      '{"step": 2, "loss": 0.125}\n'
  )
  with metrics.MetricWriter(tmp_path, enabled=True) as w:  # reopen: append
    w.write_scalars(3, {"loss": float("nan")})
  records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3]
  assert (tmp_path / "metrics.jsonl").read_text().startswith(text)
  assert np.isnan(records[2]["loss"])


def test_jsonl_recovers_a_line_cut_by_a_crash(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
  with metrics.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    w.write_scalars(2, {"loss": 0.25})  # resumed from step 1
  with pytest.raises(ValueError, match="metrics.jsonl:3: malformed"):
    metrics.read_jsonl(path)
  with pytest.warns(UserWarning, match=":3: malformed"):
    records = metrics.read_jsonl(path, skip_invalid=True)
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (2, 0.25)]
  with pytest.warns(UserWarning):
    latest = metrics.read_jsonl(path, skip_invalid=True, last_per_step=True)
  assert [(r["step"], r["loss"]) for r in latest] == [(1, 1.0), (2, 0.25)]


def test_bad_scalars_raise(tmp_path):
  with metrics.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    with pytest.raises(TypeError, match="'vec'.*shape \\(3,\\)"):
      w.write_scalars(0, {"vec": np.ones(3)})
    with pytest.raises(TypeError, match="'name'"):
      w.write_scalars(0, {"name": "abc"})
    with pytest.raises(ValueError, match="'step' is reserved"):
      w.write_scalars(0, {"step": 1})
  assert (tmp_path / "metrics.jsonl").read_text() == ""
  with pytest.raises(RuntimeError, match="closed"):
    w.write_scalars(1, {"x": 1.0})


# --------------------------------------------------------------------------- TensorBoard
def test_tensorboard_events_readable(tmp_path):
  images = np.zeros((2, 4, 4, 1), np.float32)
  images[1] = 1.0
  with metrics.MetricWriter(tmp_path, enabled=True) as w:
    w.write_scalars(1, {"loss": 0.5, "reward": 2.0})
    w.write_scalars(2, {"loss": 0.25})
    w.write_images(2, "samples", images, ncols=2)
  files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert len(files) == 1
  events = read_events(files[0])
  scalars = [
      (e.step, v.tag, v.simple_value)
      for e in events
      for v in e.summary.value
      if v.HasField("simple_value")
  ]
  assert scalars == [(1, "loss", 0.5), (1, "reward", 2.0), (2, "loss", 0.25)]
  imgs = [(e.step, v.tag, v.image) for e in events for v in e.summary.value if v.HasField("image")]
  assert len(imgs) == 1 and imgs[0][:2] == (2, "samples")
  decoded = np.asarray(Image.open(io.BytesIO(imgs[0][2].encoded_image_string)))
  grid = metrics.image_grid(images, 2)
  np.testing.assert_array_equal(decoded, np.repeat(grid, 3, axis=-1))


# --------------------------------------------------------------------------- images
def test_image_grid_exact_pixel_placement():
  n, h, w = 5, 2, 3
  values = np.arange(n * h * w).reshape(n, h, w, 1)  # every pixel distinct
  grid = metrics.image_grid(values / 255.0, pad=1, pad_value=0.5)
  ncols, rows = 3, 2  # ceil(sqrt(5)) = 3
  assert grid.dtype == np.uint8 and grid.shape == (rows * 3 + 1, ncols * 4 + 1, 1)
  expected = np.full(grid.shape, 128, np.uint8)
  for i in range(n):
    top, left = 1 + (i // ncols) * (h + 1), 1 + (i % ncols) * (w + 1)
    for y in range(h):
      for x in range(w):
        expected[top + y, left + x, 0] = values[i, y, x, 0]
  np.testing.assert_array_equal(grid, expected)
  assert grid[4, 9, 0] == 128  # empty 6th cell
  assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 6 and grid[4, 1, 0] == 18


def test_image_grid_options_and_errors():
  rgb = np.stack([np.full((2, 2, 3), v) for v in (0.0, 0.2, 1.5, -1.0)])
  grid = metrics.image_grid(rgb, ncols=4, pad=0)
  assert grid.shape == (2, 8, 3)
  np.testing.assert_array_equal(grid[0, ::2, 0], [0, 51, 255, 0])  # clipped to [0, 1]
  assert metrics.image_grid(rgb, ncols=1, pad=0).shape == (8, 2, 3)
  with pytest.raises(ValueError, match="\\[N, H, W, C\\]"):
    metrics.image_grid(np.zeros((4, 4, 1)))
  with pytest.raises(ValueError, match="ncols=0"):
    metrics.image_grid(rgb, ncols=0)
  with pytest.raises(TypeError, match="dtype int64"):
    metrics.image_grid(np.zeros((1, 2, 2, 1), np.int64))


def test_write_images_png_and_save_png(tmp_path):
  images = np.random.default_rng(0).uniform(size=(3, 8, 8, 1)).astype(np.float32)
  with metrics.MetricWriter(tmp_path, enabled=True) as w:
    path = w.write_images(7, "samples", images)
    big = w.write_images(8, "samples", images, scale=3)
    with pytest.raises(ValueError, match="image name"):
      w.write_images(7, "a/b", images)
    with pytest.raises(ValueError, match="scale=0"):
      w.write_images(7, "samples", images, scale=0)
  grid = metrics.image_grid(images)[..., 0]
  np.testing.assert_array_equal(
      np.asarray(Image.open(big)), np.kron(grid, np.ones((3, 3), np.uint8))
  )
  assert path == str(tmp_path / "images" / "samples_000007.png")
  np.testing.assert_array_equal(np.asarray(Image.open(path)), metrics.image_grid(images)[..., 0])
  rgba = (np.arange(2 * 3 * 4) % 256).astype(np.uint8).reshape(2, 3, 4)
  out = metrics.save_png(tmp_path / "sub" / "x.png", rgba)
  np.testing.assert_array_equal(np.asarray(Image.open(out)), rgba)
  with pytest.raises(ValueError, match="shape \\(2, 3, 2\\)"):
    metrics.save_png(tmp_path / "y.png", np.zeros((2, 3, 2), np.uint8))


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricWriter(workdir, enabled=False) as w:
    w.write_scalars(1, {"loss": 1.0})
    assert w.write_images(1, "samples", np.zeros((1, 2, 2, 1))) is None
    w.flush()
  assert not workdir.exists()
  with metrics.MetricWriter(workdir) as w:  # enabled=None: process 0
    w.write_scalars(1, {"loss": 1.0})
  assert metrics.read_jsonl(workdir / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]


# --------------------------------------------------------------------------- progress, plots
def test_progress_bar_shows_eta_and_is_silent_when_disabled(capsys):
  assert list(metrics.progress(range(5), desc="sampling", enabled=True, mininterval=0)) == list(
      range(5)
  )
  err = capsys.readouterr().err
  assert "sampling" in err and "5/5" in err and "<" in err  # elapsed<remaining (ETA)
  with metrics.progress(total=3, enabled=False) as bar:
    bar.update(3)
  assert list(metrics.progress(range(3), enabled=False)) == [0, 1, 2]
  assert capsys.readouterr().err == ""


def test_plot_curves_png(tmp_path):
  records = [{"step": s, "loss": 1.0 / (s + 1), "reward": s / 10} for s in range(10)]
  curves = metrics.curves_from_records(records, ["loss", "reward"])
  np.testing.assert_array_equal(curves["loss"][0], np.arange(10))
  path = metrics.plot_curves(
      tmp_path / "plots" / "curves.png", curves, title="t", figsize=(5, 3), dpi=80
  )
  img = np.asarray(Image.open(path).convert("RGB")).astype(int)
  assert img.shape == (240, 400, 3)
  for color in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # matplotlib C0 and C1
    assert (np.abs(img - color).sum(-1) < 30).sum() > 50
  with pytest.raises(ValueError, match="'bad'"):
    metrics.plot_curves(tmp_path / "x.png", {"bad": ([0, 1], [1.0])})
  with pytest.raises(ValueError, match="at least one"):
    metrics.plot_curves(tmp_path / "x.png", {})
  with pytest.raises(KeyError, match="'acc'"):
    metrics.curves_from_records(records, ["acc"])


# --------------------------------------------------------------------------- diversity
def test_within_class_diversity_matches_scipy_pdist_per_class():
  from scipy.spatial.distance import pdist

  rng = np.random.default_rng(0)
  x = rng.normal(size=(13, 3, 2, 1)).astype(np.float32)
  y = np.array([0, 1, 1, 2, 0, 1, 0, 5, 1, 2, 3, 3, 0])  # class 5 has one sample: ignored
  flat = x.reshape(13, -1).astype(np.float64)
  want = np.mean([pdist(flat[y == c]).mean() for c in (0, 1, 2, 3)])
  assert metrics.within_class_diversity(x, y) == pytest.approx(want, rel=1e-10)
  assert metrics.within_class_diversity(x) == pytest.approx(pdist(flat).mean(), rel=1e-10)
  # two points at distance 5 (3-4-5), a collapsed class (distance 0)
  pts = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
  assert metrics.within_class_diversity(pts, np.array([7, 7, 2, 2])) == pytest.approx(2.5)
  assert np.isnan(metrics.within_class_diversity(pts, np.arange(4)))
  with pytest.raises(ValueError, match="labels must be integers"):
    metrics.within_class_diversity(pts, np.zeros(3, int))
  with pytest.raises(ValueError, match="labels must be integers"):
    metrics.within_class_diversity(pts, np.zeros(4))


class _Clock:
  """Stands in for tqdm's clock: time moves only when the test says so."""

  def __init__(self):
    import time

    self.t = time.time()

  def __call__(self):
    return self.t


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def _progress_counts(lines):
  return [int(re.search(r"(\d+)/1000", line).group(1)) for line in lines]


def test_progress_bar_in_a_log_writes_a_line_at_most_every_log_interval(monkeypatch):
  import tqdm.std

  clock = _Clock()
  monkeypatch.setattr(tqdm.std, "time", clock)
  log = io.StringIO()  # not a terminal, like a CI or nohup log
  for _ in metrics.progress(range(1000), desc="rounds", enabled=True, file=log):
    clock.t += 0.05  # 50 s in all: tqdm's default (0.1 s) would redraw ~500 times
  text = log.getvalue()
  assert "\r" not in text and "\x1b" not in text and text.isascii()
  assert text.endswith("\n") and "\n\n" not in text
  lines = text.splitlines()
  assert 3 <= len(lines) <= 7, lines  # first, one per 10 s of the 50, last
  assert all(line.startswith("rounds: ") for line in lines)
  counts = _progress_counts(lines)
  assert counts[0] == 0 and counts[-1] == 1000 and counts == sorted(counts)
  assert all(b - a >= 200 for a, b in zip(counts[:-1], counts[1:-1]))  # >= 10 s apart
  # a shorter interval, and a caller's own tqdm option, still as lines
  log = io.StringIO()
  for _ in metrics.progress(range(1000), enabled=True, file=log, log_interval=1.0):
    clock.t += 0.05
  assert "\r" not in log.getvalue() and 40 <= len(log.getvalue().splitlines()) <= 60
  log = io.StringIO()
  for _ in metrics.progress(range(1000), enabled=True, file=log, mininterval=0, miniters=100):
    clock.t += 0.05
  counts = _progress_counts(log.getvalue().splitlines())
  assert counts == list(range(0, 1001, 100))  # the closing redraw of 1000/1000 not repeated


def test_progress_bar_on_a_terminal_redraws_in_place_as_tqdm_does(monkeypatch):
  import tqdm.auto
  import tqdm.std

  clock = _Clock()
  monkeypatch.setattr(tqdm.std, "time", clock)
  outputs = []
  for make in (
      lambda f: metrics.progress(range(1000), desc="rounds", enabled=True, file=f),
      lambda f: tqdm.auto.tqdm(range(1000), desc="rounds", file=f, dynamic_ncols=True),
  ):
    term = _Terminal()
    bar = make(term)
    assert bar.mininterval == 0.1
    start = clock.t
    for _ in bar:
      clock.t += 0.05
    clock.t = start
    outputs.append(term.getvalue())
  ours, plain = outputs
  assert ours == plain  # exactly tqdm's own bar
  assert ours.startswith("\r") and ours.count("\n") == 1 and ours.count("\r") > 100
