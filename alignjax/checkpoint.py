"""Checkpoints: save every N steps and at the end, keep the last K, resume, survive SIGTERM.

A thin wrapper around Orbax's `CheckpointManager`. Each step directory holds three items:

    <directory>/<step>/train_state/   arrays of the train state (params, opt_state, step, key),
                                      possibly sharded; Orbax writes them from every process
    <directory>/<step>/host_state/    JSON: host-side state (e.g. DDPO per-prompt reward
                                      statistics, the data position)
    <directory>/<step>/metadata/      JSON: what the run is (e.g. the frozen base model's path
                                      and content hash, the config) + how PRNG keys were saved

Frozen weights (base model, reference policy, reward models) are never saved here: the
metadata refers to them by path and `content_hash` (a full sha256, cached per file by size,
mtime, ctime and inode so that a start or resume does not re-read gigabytes of unchanged
weights: alignjax.run_identity eq. 1). JSON items are written by process 0
only (Orbax's JsonCheckpointHandler writes on the primary host); arrays by all processes.

When a save happens (`maybe_save`): `force=True`, or `step % save_every == 0`, or a
preemption was requested (SIGTERM after `install_preemption_handler`). With several
processes the preemption flag is OR-ed across them (one small all-gather per call) so all
processes save the same step. A step that this object already saved or restored is not
saved again (returns False); a step that exists on disk from elsewhere raises
CheckpointError rather than being overwritten.

Atomicity and what restore does with damage (the behaviour we chose):
  * Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>` and renames it when
    complete. A save that dies half-way (preemption, crash, full disk) leaves only such a
    temporary directory, which is not a step: `latest_step()` and `restore()` use the
    previous complete step, and the temporary directory is left alone.
  * Every saved step is verified on restore. Orbax's array format carries no checksum over
    the data, so the metadata item of each step records, for every array of the train
    state, two 32-bit sums of its raw bits (eq. 1), and the sha256 of the host state's JSON;
    restore recomputes both over what it read and compares. The sums are computed on the
    device when the step is saved (one small program, exact integer arithmetic, so any
    sharding gives the same sums) and are written in the same atomic step directory as the
    arrays: there is no moment at which a step exists without its checksums.

        (1)  s₁ = Σᵢ bᵢ  mod 2³²,   s₂ = Σᵢ bᵢ · (2654435761 · i + 1)  mod 2³²

    where bᵢ are the array's elements reinterpreted as unsigned integers (of their own width,
    widened to 32 bits; 64-bit elements as two 32-bit words) and i is the element's
    row-major position. Any single flipped bit changes s₁; s₂ also catches permutations.
  * A *finalised* step that cannot be read (truncated or missing files, garbage in a step
    directory) or whose checksums do not match raises CheckpointDamagedError naming the
    directory, the step, the damaged arrays and the other available steps. Nothing is
    deleted and there is no silent fresh start. With `on_damage="fallback"` restore instead
    takes the newest intact step, warns naming the damaged ones, and moves each damaged step
    newer than it aside to `<step>.damaged` (kept for inspection; the run will save that step
    number again).
  * Non-finite state is never saved: `maybe_save` raises CheckpointError naming the leaves
    with NaN or infinite values (`check_finite=True`, the default); the same device program
    computes the sums and this check.
  * An *incompatible* checkpoint raises CheckpointError listing what differs: leaves
    missing or unexpected, shapes, dtypes (Orbax would otherwise cast silently), PRNG key
    implementations, or metadata.
  * Run identity. The metadata names the run: the script that wrote it (`run_metadata`:
    "script", e.g. "experiments.ddpo"), the frozen models' identity and the full config.
    Metadata is compared key by key and any difference is refused, listing the differing
    keys, except config fields that only change how the run is operated, not what it
    computes: `OPERATIONAL_CONFIG_KEYS` (the number of rounds/updates, checkpoint, logging
    and evaluation-image intervals, the mesh shape and multi-host settings, compiler options,
    the finite-check policy), which log a warning.

Typical use in a training script:

    ckpt = Checkpointer(workdir / "checkpoints", save_every=cfg.ckpt_every, keep=3,
                        metadata=run_metadata("experiments.x", cfg,
                                              base_model=frozen_model_metadata(path)))
    ckpt.install_preemption_handler()
    restored = ckpt.maybe_restore(abstract_state)        # None on a fresh start
    ...
    for step in range(first_step, num_steps + 1):
        state, host = update(state, ...), {...}
        ckpt.maybe_save(step, state, host, force=step == num_steps)
        if ckpt.preemption_requested:                    # saved above: leave cleanly
            break
    ckpt.close()

With several processes every process must call `maybe_save` at the same steps (it holds
a collective). Restoring uses the shardings of the abstract template (leaves that are jax arrays or
`jax.ShapeDtypeStruct(shape, dtype, sharding=...)`), so a state saved on one mesh restores
onto another; template leaves without a sharding are restored onto the default device.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from alignjax import checksums, run_identity
from alignjax.checkpoint_tree import CheckpointError, _abstract_leaf, _flat, _flatten_nested
from alignjax.checkpoint_tree import _is_key, _nest
from alignjax.checkpoint_tree import abstract_like  # noqa: F401  (public here)
from alignjax.run_identity import content_hash, frozen_model_metadata, run_metadata  # noqa: F401

log = logging.getLogger(__name__)

STATE, HOST, META = "train_state", "host_state", "metadata"
ON_DAMAGE = ("error", "fallback")


class CheckpointDamagedError(CheckpointError):
  """A finalised step cannot be read or does not match its checksums."""


# --------------------------------------------------------------------------- JSON helpers
def _jsonable(obj: Any, where: str, strict: bool) -> Any:
  """JSON-ready copy: numpy -> python, tuples -> lists; other objects -> str or error."""
  if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    out = {}
    for k, v in obj.items():
      if not isinstance(k, str):
        if strict:
          raise CheckpointError(
              f"{where}: key {k!r} ({type(k).__name__}) must be "
              "a str; JSON would turn it into a string"
          )
        k = str(k)
      out[k] = _jsonable(v, f"{where}/{k}", strict)
    return out
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v, f"{where}/{i}", strict) for i, v in enumerate(obj)]
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(obj).tolist()
  if strict:
    raise CheckpointError(
        f"{where}: {type(obj).__name__} is not JSON-serialisable "
        "(use dicts, lists, str, int, float, bool, None)"
    )
  return str(obj)


def _json_sha256(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _verify(meta: dict, names: list[str], leaves: list, host: Any) -> str | None:
  """What does not match the step's recorded checksums (None: everything matches)."""
  stored = meta.get("checksums")
  if not isinstance(stored, dict):
    return "records no checksums (written by an older alignjax?), so it cannot be verified"
  sums, _ = checksums.tree_checksums_and_finite(leaves)
  bad = [name for name, got in zip(names, sums) if stored.get(name) != got]
  if bad:
    return (
        f"is corrupt: {len(bad)} array(s) do not match the checksums recorded when the step "
        f"was saved ({', '.join(bad[:5])})"
    )
  if meta.get("host_state_sha256") != _json_sha256(host):
    return "is corrupt: its host_state does not match the sha256 recorded when it was saved"
  return None


# --------------------------------------------------------------------------- checkpointer
class Checkpointer:
  """Saves/restores (train_state, host_state) with metadata checks; see module docstring.

  Args:
    directory: where step directories live (created if missing).
    save_every: save when step % save_every == 0 (None: only forced/preemption saves).
    keep: number of most recent checkpoints to keep (None: keep all).
    metadata: JSON-able dict describing the run (`run_metadata(script, config,
      base_model=frozen_model_metadata(path))`); checked on restore (None: the check is
      skipped).
    operational_config_keys: config fields that may differ on resume (a warning); every
      other metadata difference is refused (alignjax.run_identity).
    on_damage: "error" (a damaged step raises CheckpointDamagedError) or "fallback" (the
      newest intact step is restored, the damaged newer ones are moved aside).
    check_finite: refuse to save a train state with NaN or infinite values.
    async_save: write in a background thread (arrays are copied before `maybe_save`
      returns, so the caller may donate or delete them right away).
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      save_every: int | None,
      keep: int | None,
      metadata: Mapping | None = None,
      operational_config_keys: tuple[str, ...] = run_identity.OPERATIONAL_CONFIG_KEYS,
      on_damage: str = "error",
      check_finite: bool = True,
      async_save: bool = True,
  ):
    for name, value in (("save_every", save_every), ("keep", keep)):
      if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise CheckpointError(f"Checkpointer {name}={value!r}: must be an int >= 1 " "or None")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = save_every
    self.keep = keep
    self.metadata = None if metadata is None else _jsonable(metadata, "metadata", False)
    if on_damage not in ON_DAMAGE:
      raise CheckpointError(f"Checkpointer on_damage={on_damage!r}: valid choices are {ON_DAMAGE}")
    self.operational_config_keys = tuple(operational_config_keys)
    self.on_damage = on_damage
    self.check_finite = check_finite
    self._preempted = False
    self._previous_handlers: dict[int, Any] = {}
    self._known_steps: set[int] = set()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=False,
    )
    handlers = {
        STATE: ocp.StandardCheckpointHandler(),
        HOST: ocp.JsonCheckpointHandler(),
        META: ocp.JsonCheckpointHandler(),
    }
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    except Exception as e:
      raise CheckpointError(
          f"cannot open checkpoint directory {self.directory}: " f"{type(e).__name__}: {e}"
      ) from e

  # ----------------------------------------------------------------- queries
  def all_steps(self) -> list[int]:
    """Finalised steps on disk, ascending (Orbax's temporary directories excluded).

    Waits for a background save first, then re-lists the directory.
    """
    self.wait_until_finished()
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Newest finalised step, or None if the directory holds no checkpoint."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def last_good(self) -> str:
    """The newest saved step directory (saved steps are finite by construction), or 'none'."""
    step = self.latest_step()
    if step is None:
      return f"none (no step saved yet in {self.directory})"
    return f"step {step} in {os.path.join(self.directory, str(step))}"

  # ----------------------------------------------------------------- preemption
  def install_preemption_handler(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """On these signals set `preemption_requested` (the next `maybe_save` saves).

    Call from the main thread; `close()` or `uninstall_preemption_handler()` restores
    the previous handlers.
    """

    def handler(signum, frame):
      self._preempted = True
      log.warning("signal %d received: will checkpoint at the next maybe_save", signum)

    for sig in signals:
      try:
        previous = signal.signal(sig, handler)
      except ValueError as e:
        raise CheckpointError(
            "install_preemption_handler must be called from the " f"main thread ({e})"
        ) from e
      self._previous_handlers.setdefault(sig, previous)

  def uninstall_preemption_handler(self) -> None:
    """Puts back the signal handlers that were there before."""
    for sig, previous in self._previous_handlers.items():
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous_handlers.clear()

  @property
  def preemption_requested(self) -> bool:
    """True once a preemption signal arrived (this process)."""
    return self._preempted

  def _preemption_agreed(self) -> bool:
    if jax.process_count() == 1:
      return self._preempted
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(self._preempted))
    self._preempted = bool(np.any(flags))
    return self._preempted

  # ----------------------------------------------------------------- save
  def maybe_save(
      self, step: int, train_state: Any, host_state: Any, *, force: bool = False
  ) -> bool:
    """Saves if forced, due (step % save_every == 0) or preempted; returns whether it did."""
    step = int(step)
    preempted = self._preemption_agreed()
    due = force or preempted or (self.save_every is not None and step % self.save_every == 0)
    if not due or step in self._known_steps:
      return False
    if step in self._manager.all_steps():  # as listed at start-up plus our own saves
      raise CheckpointError(
          f"step {step} already exists in {self.directory} (from "
          "another run?); refusing to overwrite it"
      )
    pairs, _ = _flat(train_state)
    key_impls, saveable = {}, []
    for parts, leaf in pairs:
      if _is_key(leaf):
        key_impls["/".join(parts)] = str(jax.random.key_impl(leaf))
        leaf = jax.random.key_data(leaf)
      saveable.append((parts, leaf))
    sums, finite = checksums.tree_checksums_and_finite([leaf for _, leaf in saveable])
    names = ["/".join(parts) for parts, _ in saveable]
    bad = [name for name, ok in zip(names, finite) if not ok]
    if self.check_finite and bad:
      raise CheckpointError(
          f"refusing to save step {step} to {self.directory}: non-finite values in "
          f"{len(bad)} leaves of the train state ({', '.join(bad[:5])})"
      )
    host = _jsonable(host_state, "host_state", True)
    meta = {
        "metadata": self.metadata,
        "prng_keys": key_impls,
        "checksums": dict(zip(names, sums)),  # eqs. 1-2 of alignjax.checksums
        "host_state_sha256": _json_sha256(host),
    }
    args = ocp.args.Composite(
        **{
            STATE: ocp.args.StandardSave(_nest(saveable)),
            HOST: ocp.args.JsonSave(host),
            META: ocp.args.JsonSave(meta),
        }
    )
    try:
      self._manager.save(step, args=args, force=True)
    except Exception as e:
      raise CheckpointError(
          f"saving step {step} to {self.directory} failed: " f"{type(e).__name__}: {e}"
      ) from e
    self._known_steps.add(step)
    log.info(
        "checkpoint step %d -> %s%s", step, self.directory, " (preemption)" if preempted else ""
    )
    return True

  def wait_until_finished(self) -> None:
    """Blocks until background writes are committed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(
          f"background checkpoint write to {self.directory} " f"failed: {type(e).__name__}: {e}"
      ) from e

  def close(self) -> None:
    """Waits for writes, closes the manager, restores signal handlers."""
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()
      self.uninstall_preemption_handler()

  # ----------------------------------------------------------------- restore
  def _fail(self, step: int, what: str, error=CheckpointError) -> CheckpointError:
    others = [s for s in self.all_steps() if s != step]
    return error(
        f"checkpoint {os.path.join(self.directory, str(step))} (step {step}) {what}. "
        f"Other steps in {self.directory}: {others or 'none'}. Nothing was deleted; "
        "restore another step with restore(..., step=N) or move this one aside."
    )

  def _check_metadata(self, step: int, stored: Any) -> None:
    """Run identity (alignjax.run_identity): refuses another run's checkpoint, listing keys."""
    if self.metadata is None:
      return
    stored = stored if isinstance(stored, dict) else {}
    was, now = stored.get("script"), self.metadata.get("script")
    if was != now:
      raise self._fail(
          step,
          f"was written by {was or 'an unnamed script'}, but this run is "
          f"{now or 'an unnamed script'}: it is another run's checkpoint. Use another "
          "workdir (nothing was changed)",
      )
    refused, allowed = run_identity.compare(stored, self.metadata, self.operational_config_keys)
    if allowed:
      log.warning(
          "resuming step %d of %s with different operational settings: %s",
          step,
          self.directory,
          "; ".join(allowed[:10]),
      )
    if refused:
      raise self._fail(
          step,
          f"belongs to another run: {len(refused)} setting(s) that change what the run computes "
          f"differ: {'; '.join(refused[:10])}. Use another workdir, or resume with the "
          "checkpoint's settings (nothing was changed)",
      )

  def _check_structure(self, step: int, target: dict, tree_meta: Any) -> None:
    saved = {k: v for k, v in _flatten_nested(tree_meta).items()}
    wanted = _flatten_nested(target)
    problems = []
    missing = sorted("/".join(k) for k in wanted if k not in saved)
    extra = sorted("/".join(k) for k in saved if k not in wanted)
    if missing:
      problems.append(f"missing in checkpoint: {missing[:10]}")
    if extra:
      problems.append(f"in checkpoint but not in the train state: {extra[:10]}")
    for k in sorted(set(saved) & set(wanted)):
      s, w = saved[k], wanted[k]
      if tuple(s.shape) != tuple(w.shape):
        problems.append(
            f"{'/'.join(k)} shape {tuple(s.shape)} in checkpoint, "
            f"{tuple(w.shape)} in the train state"
        )
      elif np.dtype(s.dtype) != np.dtype(w.dtype):
        problems.append(
            f"{'/'.join(k)} dtype {np.dtype(s.dtype)} in checkpoint, "
            f"{np.dtype(w.dtype)} in the train state"
        )
    if problems:
      raise self._fail(step, "is incompatible with the train state: " + "; ".join(problems[:12]))

  def restore(self, abstract_train_state: Any, step: int | None = None) -> tuple[Any, Any]:
    """(train_state, host_state) of `step` (default: the latest), on the template's shardings.

    `abstract_train_state` has the structure of the train state, with arrays or
    ShapeDtypeStructs (shape, dtype, sharding) as leaves. Raises CheckpointError when
    there is no such checkpoint or it is incompatible, CheckpointDamagedError when it is
    damaged (unless `on_damage="fallback"` and no `step` is given: then the newest intact
    step is restored, see the module docstring).
    """
    self.wait_until_finished()
    steps = self.all_steps()
    if step is not None or self.on_damage == "error":
      if step is None and not steps:
        raise CheckpointError(f"no checkpoint in {self.directory}")
      return self._restore_step(abstract_train_state, steps[-1] if step is None else step)
    damaged = []
    for candidate in reversed(steps):
      try:
        restored = self._restore_step(abstract_train_state, candidate)
      except CheckpointDamagedError as e:
        log.warning("checkpoint step %d is damaged, trying an older one: %s", candidate, e)
        damaged.append(candidate)
        continue
      self._move_aside(damaged)
      if damaged:
        log.warning(
            "restored step %d of %s: the newer step(s) %s are damaged and were moved aside to "
            "<step>.damaged",
            candidate,
            self.directory,
            damaged,
        )
      return restored
    raise CheckpointDamagedError(
        f"no intact checkpoint in {self.directory}: steps {damaged or 'none'} are damaged; "
        "nothing was deleted"
    )

  def _move_aside(self, steps: list[int]) -> None:
    """Renames damaged step directories to <step>.damaged (process 0), keeping them."""
    if steps and jax.process_index() == 0:
      for step in steps:
        source = os.path.join(self.directory, str(step))
        target, n = source + ".damaged", 1
        while os.path.exists(target):
          target, n = f"{source}.damaged-{n}", n + 1
        shutil.move(source, target)
    if steps and jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("alignjax.checkpoint.move_aside")
    if steps:
      self._manager.reload()

  def _restore_step(self, abstract_train_state: Any, step: int) -> tuple[Any, Any]:
    steps = self.all_steps()
    step = int(step)
    if step not in steps:
      raise CheckpointError(
          f"no checkpoint for step {step} in {self.directory}; "
          f"available steps: {steps or 'none'}"
      )
    damaged = lambda what: self._fail(step, what, CheckpointDamagedError)
    unreadable = lambda e: damaged(
        f"cannot be read ({type(e).__name__}: {str(e)[:400]}); it may be truncated or corrupt"
    )
    step_dir = os.path.join(self.directory, str(step))
    missing = [i for i in (STATE, HOST, META) if not os.path.isdir(os.path.join(step_dir, i))]
    if missing:
      raise damaged(f"is incomplete: item(s) {', '.join(missing)} missing")
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
      meta = meta[META]
      tree_meta = self._manager.item_metadata(step)[STATE]
    except Exception as e:
      raise unreadable(e) from e
    if not isinstance(meta, dict) or tree_meta is None:
      raise damaged("is incomplete: its metadata or train_state metadata is missing or unreadable")
    self._check_metadata(step, meta.get("metadata"))

    pairs, treedef = _flat(abstract_train_state)
    key_paths = {"/".join(parts) for parts, leaf in pairs if _is_key(leaf)}
    saved_keys = meta.get("prng_keys", {})
    if key_paths != set(saved_keys):
      raise self._fail(
          step,
          f"stores typed PRNG keys at {sorted(saved_keys)} but the "
          f"train state has them at {sorted(key_paths)}",
      )
    target = _nest([(parts, _abstract_leaf(leaf)) for parts, leaf in pairs])
    self._check_structure(step, target, getattr(tree_meta, "tree", tree_meta))
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              **{STATE: ocp.args.StandardRestore(target), HOST: ocp.args.JsonRestore()}
          ),
      )
    except Exception as e:
      raise unreadable(e) from e
    flat = _flatten_nested(restored[STATE])
    names = ["/".join(parts) for parts, _ in pairs]
    problem = _verify(meta, names, [flat[parts] for parts, _ in pairs], restored[HOST])
    if problem:
      raise damaged(problem)
    leaves = []
    for parts, name in zip((p for p, _ in pairs), names):
      value = flat[parts]
      if name in saved_keys:
        value = jax.random.wrap_key_data(value, impl=saved_keys[name])
      leaves.append(value)
    self._known_steps.add(step)
    log.info("restored step %d from %s (checksums verified)", step, self.directory)
    return jax.tree_util.tree_unflatten(treedef, leaves), restored[HOST]

  def maybe_restore(self, abstract_train_state: Any) -> tuple[Any, Any] | None:
    """`restore` of the latest step if the directory holds one, else None."""
    if self.latest_step() is None:
      return None
    return self.restore(abstract_train_state)
