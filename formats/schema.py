"""The target store's schema, one owner for every name in it: the target formats and codecs a store may use,
the compact format's knobs and the values they accept, and the one table of the store's arrays (name, the
targets field each holds, shape and dtype, per target format).

The store (`formats.store`) lays out, writes and reads arrays from the table; the coding (`formats.targets`)
puts its fields into arrays and takes them out by it. Importable without torch or zarr, so that the command
lines' --help answers at once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TARGET_FORMATS = ("float16", "int8", "compact")
CODECS = ("lz4", "zstd")  # lossless Blosc codecs of a store
DEFAULT_CALIBRATION_IMAGES = 256  # images whose first view set calibrates the shape mask
# The bits a compact store's values may take, and the size a view set is held to when the token rank is not
# given (the largest multiple of TOKEN_RANK_STEP that fits).
TOKEN_BITS = (8, 16)
RELATION_BITS = (4, 8, 16)
DEFAULT_VIEW_SET_BYTES = 64 << 10
TOKEN_RANK_STEP = 32

VIEW_PARAMS_ARRAY = "view_params"  # the view records, stored beside the targets
# compact stores with k below the crowd token count: the kept entries' columns and the mass of the others.
RELATION_INDEX_ARRAY, RELATION_REST_ARRAY = "relation_index", "relation_rest"


@dataclass(frozen=True)
class CompactKnobs:
    """What a compact store keeps: `token_rank` basis coefficients per local token in `token_bits` (8: int8
    with a scale per token, 16: float16); of each relation row its `relation_k` largest entries (all, in
    column order, when k is the crowd token count; else their columns and the mass of the others) in
    `relation_bits` (4 or 8: log-domain codes with a scale per row, 16: float16 probabilities). At rank =
    width, k = crowd tokens and 16 bits nothing is dropped (float16 rounding only)."""

    token_rank: int
    token_bits: int
    relation_k: int
    relation_bits: int

    def problem(self, *, width: int, crowd_tokens: int) -> str | None:
        """None, or one line naming the knob out of range and the range accepted for this teacher."""
        if not 1 <= self.token_rank <= width:
            return f"token rank {self.token_rank} is out of range: must be 1..{width} (the teacher's token width)"
        if not 1 <= self.relation_k <= crowd_tokens:
            return (f"relation k {self.relation_k} is out of range: must be 1..{crowd_tokens} (the crowd view's "
                    f"token count)")
        if self.token_bits not in TOKEN_BITS:
            return f"token bits {self.token_bits} is not accepted: choose one of {', '.join(map(str, TOKEN_BITS))}"
        if self.relation_bits not in RELATION_BITS:
            return (f"relation bits {self.relation_bits} is not accepted: choose one of "
                    f"{', '.join(map(str, RELATION_BITS))}")
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StoreArray:
    """One array of a store: its name, the field of the targets it holds (`formats.targets.Targets` in float16
    and int8 stores, `CompactTargets` in compact ones; None for the view records), its shape after
    [image, view set] and its dtype."""

    name: str
    field: str | None
    shape: tuple[int, ...]
    dtype: str


def store_arrays(target_format: str, *, view_fields: int, width: int, tokens: int, crowd_tokens: int,
                 compact: CompactKnobs | None = None) -> dict[str, StoreArray]:
    """The schema's table: the arrays of a `target_format` store by name, in the order the store lists them,
    for a teacher of token `width`, `tokens` patch tokens in the global view and `crowd_tokens` in the crowd
    view (a compact store's coded arrays follow from its knobs `compact`).

    float16: every target in float16. int8: local tokens and relation rows coded per row, each with a float32
    scale per row. compact: local tokens as `token_rank` coefficients (int8 with a scale per token, or
    float16), relation rows as k entries per row (4-bit codes two per byte, 8-bit codes, each with a scale
    per row, or float16), with their columns and the mass of the others when k is below the crowd tokens."""
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"unknown target format {target_format!r}; choose one of {', '.join(TARGET_FORMATS)}")
    view_params = StoreArray(VIEW_PARAMS_ARRAY, None, (view_fields,), "float32")
    global_ = StoreArray("global", "global_target", (width,), "float16")
    mask = StoreArray("mask", "local_mask", (tokens,), "float16")
    if target_format != "compact":
        coded = "int8" if target_format == "int8" else "float16"
        arrays = [view_params, global_, StoreArray("local", "local_target", (tokens, width), coded), mask,
                  StoreArray("relation", "relation_target", (crowd_tokens, crowd_tokens), coded)]
        if target_format == "int8":
            arrays += [StoreArray("local_scale", "local_scale", (tokens,), "float32"),
                       StoreArray("relation_scale", "relation_scale", (crowd_tokens,), "float32")]
        return {array.name: array for array in arrays}
    arrays = [view_params, global_, mask, StoreArray("local", "local_codes", (tokens, compact.token_rank),
                                                     "int8" if compact.token_bits == 8 else "float16")]
    if compact.token_bits == 8:
        arrays.append(StoreArray("local_scale", "local_scale", (tokens,), "float32"))
    kept = -(-compact.relation_k // 2) if compact.relation_bits == 4 else compact.relation_k  # 4 bits: two a byte
    arrays.append(StoreArray("relation", "relation_values", (crowd_tokens, kept),
                             {4: "uint8", 8: "int8", 16: "float16"}[compact.relation_bits]))
    if compact.relation_bits < 16:
        arrays.append(StoreArray("relation_scale", "relation_scale", (crowd_tokens,), "float32"))
    if compact.relation_k < crowd_tokens:
        arrays += [StoreArray(RELATION_INDEX_ARRAY, "relation_index", (crowd_tokens, compact.relation_k), "int16"),
                   StoreArray(RELATION_REST_ARRAY, "relation_rest", (crowd_tokens,), "float32")]
    return {array.name: array for array in arrays}


def array_fields(target_format: str) -> dict[str, str]:
    """Store array -> the targets field it holds, for every array a `target_format` store may hold (read from
    the table at knobs that hold them all: int8 tokens, 4-bit codes of one entry of two)."""
    every = store_arrays(target_format, view_fields=1, width=1, tokens=1, crowd_tokens=2,
                         compact=CompactKnobs(1, 8, 1, 4) if target_format == "compact" else None)
    return {name: array.field for name, array in every.items() if array.field is not None}
