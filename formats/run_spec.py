"""Run specs as they are recorded, and the one comparison of a recorded spec with the current run's.

Each stage records what defines its run as a JSON object: the cache stage in its store's attributes (a rerun
must match them to resume), the trainer in RUN_DIR/run.json (a --resume must match it, and it holds the
store's identity). `spec_differences` is how both decide whether two such records describe the same run.
"""
from __future__ import annotations

import dataclasses
import json


def spec_dict(spec) -> dict:
    """A spec (a frozen config dataclass, or a dict that may hold them) as it reads back from its JSON record:
    tuples become lists, nested dataclasses dicts, so a fresh spec compares equal to its recorded copy."""
    return json.loads(json.dumps(spec, default=_dataclass_fields))


def _dataclass_fields(value) -> dict:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"a run spec holds {type(value).__name__}, which has no JSON form")


def spec_differences(recorded: dict, current: dict, keys) -> list[tuple[str, object, object]]:
    """(key, recorded value, current value) for each of `keys` that differs, in key order; where both values
    are objects, down to each differing leaf, named by its dotted path (`store_identity.seed`). A key absent
    on one side reads as None."""
    recorded, current = spec_dict(recorded), spec_dict(current)
    found = []
    for key in sorted(keys):
        have, want = recorded.get(key), current.get(key)
        if have == want:
            continue
        if isinstance(have, dict) and isinstance(want, dict):
            found += [(f"{key}.{path}", a, b) for path, a, b in spec_differences(have, want, set(have) | set(want))]
        else:
            found.append((key, have, want))
    return found
