"""Scripts that reproduce paper tables at toy scale; shared argument checks below."""


def check_rows(kind: str, chosen, valid, seeds: int) -> tuple[str, ...]:
  """The table's rows: `chosen` names (all of `valid` when None), checked, as a tuple; and a
  check that `seeds` >= 1. Errors name the bad value and the valid choices."""
  if seeds < 1:
    raise ValueError(f"seeds={seeds}: must be >= 1")
  chosen = tuple(valid) if chosen is None else tuple(chosen)
  unknown = [name for name in chosen if name not in valid]
  if unknown:
    raise ValueError(f"unknown {kind} {unknown[0]!r}: valid choices are {list(valid)}")
  return chosen
