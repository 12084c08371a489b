"""Non-finite numbers never pass silently: the finiteness test every load and export path runs
on the tensors it reads (`check_finite`), and the range check of every down-cast (`check_cast`):
float32 -> float16 overflows past 65504 and float32 -> bfloat16 past ~3.39e38, and a value that
was finite must not become Inf on the way out.

Both test the bits, a block at a time through one small scratch buffer (cache-resident: no
float32 copy of a 1 GB embedding; numpy's isfinite on bfloat16 runs at a tenth of the speed).
Errors are `NonFiniteError` (a ValueError: one `error:` line, exit 2) naming the tensor.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

# (unsigned view, exponent bits) of each float dtype: |x| >= the all-ones exponent is NaN or Inf.
EXPONENT_MASKS = {"bfloat16": (np.uint16, 0x7F80), "float16": (np.uint16, 0x7C00),
                  "float32": (np.uint32, 0x7F800000), "float64": (np.uint64, 0x7FF0000000000000)}
BLOCK = 1 << 18  # elements: a block's scratch stays in the core's L2 cache between the passes


class NonFiniteError(ValueError):
    """A tensor holding NaN/Inf, or a value a cast would turn into Inf."""


def max_finite(dtype) -> float:
    """The largest finite value of a float dtype (65504 for float16)."""
    return float(ml_dtypes.finfo(np.dtype(dtype)).max)


def narrows(src, dst) -> bool:
    """Whether casting float dtype `src` to `dst` can overflow (dst's range is smaller)."""
    return max_finite(dst) < max_finite(src)


def _nonfinite_blocks(values: np.ndarray, *, only_bad: bool = False):
    """Yield (start, block of `values`' bits with |x| >= Inf's bits) per block (flat order).
    `only_bad`: only the blocks holding one. Each block is tested with two passes (the
    magnitude bits, then their maximum against Inf's) before the third that marks which
    elements are bad, which clean blocks (nearly all) never need."""
    uint, exponent = EXPONENT_MASKS[values.dtype.name]
    magnitude = np.iinfo(uint).max >> 1
    bits = values.reshape(-1).view(uint)
    scratch = np.empty(max(1, min(bits.size, BLOCK)), uint)
    for start in range(0, bits.size, scratch.size):
        block = np.bitwise_and(bits[start:start + scratch.size], magnitude,
                               out=scratch[:min(scratch.size, bits.size - start)])
        if not only_bad or block.max() >= exponent:
            yield start, block >= exponent


def first_nonfinite(values: np.ndarray) -> int | None:
    """The flat index of the first NaN/Inf in `values` (a float array), or None."""
    if values.dtype.name not in EXPONENT_MASKS or values.size == 0:
        return None
    for start, bad in _nonfinite_blocks(values, only_bad=True):
        return start + int(np.argmax(bad))
    return None


def _at(values: np.ndarray, flat: int, first_row: int = 0) -> str:
    index = [int(i) for i in np.unravel_index(flat, values.shape)] if values.ndim else []
    if index:
        index[0] += first_row
    return f"[{', '.join(map(str, index))}]"


def check_finite(values: np.ndarray, what: str, *, hint: str = "pass --allow-nonfinite to "
                 "convert it anyway", first_row: int = 0) -> None:
    """NonFiniteError naming `what` (file and tensor) and the first bad element when `values`
    holds NaN or Inf; `hint` says how to opt out where a command can. `values` may be rows of
    a tensor starting at `first_row` (the index named is the tensor's)."""
    flat = first_nonfinite(values)
    if flat is not None:
        raise NonFiniteError(f"{what} holds NaN or Inf (first at {_at(values, flat, first_row)}: "
                             f"{values.reshape(-1)[flat]})" + (f"; {hint}" if hint else ""))


def count_nonfinite(values: np.ndarray) -> int:
    """How many NaN/Inf `values` holds (0 for a non-float array)."""
    if values.dtype.name not in EXPONENT_MASKS:
        return 0
    return sum(int(np.count_nonzero(bad)) for _, bad in _nonfinite_blocks(values, only_bad=True))


def _largest_magnitude(values: np.ndarray) -> float:
    flat, worst = values.reshape(-1), 0.0
    for start in range(0, flat.size, BLOCK):
        part = np.abs(flat[start:start + BLOCK].astype(np.float64))
        part = part[np.isfinite(part)]
        worst = max(worst, float(part.max(initial=0.0)))
    return worst


def check_cast(src: np.ndarray, out: np.ndarray, what: str, *, wider: str,
               src_finite: bool = False) -> None:
    """After `out` was cast from `src` (any layout: a transpose may sit between them):
    NonFiniteError naming `what` when the cast overflowed, i.e. a finite value of `src` became
    Inf in `out`'s narrower dtype. `wider` is the setting that keeps a wider dtype for this
    tensor, e.g. "--dtype keep or float32", "--gate-dtype float32" (the caller knows which flag
    or config key chose the dtype: the gate has its own). A cast keeps NaN and Inf and can only add Infs, so comparing
    counts is exact whatever the element order. `src_finite`: `src` is known to hold none (it
    was checked), so `out` alone is scanned. Free when the cast cannot overflow."""
    if out.dtype.name not in EXPONENT_MASKS or src.dtype.name not in EXPONENT_MASKS or not narrows(
            src.dtype, out.dtype):
        return
    bad_out = count_nonfinite(out)
    if bad_out and bad_out > (0 if src_finite else count_nonfinite(src)):
        raise NonFiniteError(
            f"{what}: a value beyond {out.dtype.name}'s range (largest finite "
            f"{max_finite(out.dtype):g}; the tensor's largest magnitude is "
            f"{_largest_magnitude(src):g}) would become Inf; keep a wider dtype (e.g. {wider}) "
            "or rescale the weights")


def checked_astype(values: np.ndarray, dtype, what: str, *, wider: str) -> np.ndarray:
    """`values.astype(dtype)`, refusing a cast that overflows (`check_cast`; `wider`: the
    setting that keeps a wider dtype)."""
    with np.errstate(over="ignore"):  # an overflow is refused just below, naming the tensor
        out = values.astype(dtype, copy=False)
    if out is not values:
        check_cast(values, out, what, wider=wider)
    return out


# The device checks below compile on first use: JAX is imported there, not by this module, which
# the converters load (numpy only; JAX's import would be a third of a conversion's time).
@functools.cache
def _overflowed():
    import jax
    import jax.numpy as jnp
    return jax.jit(lambda pairs: [jnp.sum(~jnp.isfinite(out)) > jnp.sum(~jnp.isfinite(src))
                                  for src, out in pairs])


def check_device_casts(casts: list, where: str) -> None:
    """`check_cast` for arrays on devices: (name, source, cast result) of every narrowing cast,
    tested in one compiled reduction (one bool per cast comes back). NonFiniteError names the
    first parameter whose cast turned a finite value into Inf (`casts`: a list of
    (str, jax.Array, jax.Array))."""
    import jax

    casts = [c for c in casts if narrows(c[1].dtype, c[2].dtype)]
    if not casts:
        return
    flags = jax.device_get(_overflowed()([(src, out) for _, src, out in casts]))
    for (name, src, out), bad in zip(casts, flags):
        if bad:
            raise NonFiniteError(
                f"{where}: parameter {name}: a value beyond {np.dtype(out.dtype).name}'s range "
                f"(largest finite {max_finite(out.dtype):g}) would become Inf; keep a wider dtype")


@functools.cache
def _any_nonfinite():
    import jax
    import jax.numpy as jnp
    return jax.jit(lambda leaves: [jnp.any(~jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                                   else jnp.bool_(False) for x in leaves])


def check_tree_finite(tree, where: str, *, hint: str = "") -> None:
    """NonFiniteError naming `where` and the parameter (its dotted path) when a leaf of `tree`
    (numpy arrays, or jax arrays, sharded or not, tested on their devices in one compiled
    reduction: nothing comes back to the host but one bool per leaf) holds NaN or Inf."""
    import jax

    named = [(".".join(str(getattr(k, "key", k)) for k in path), leaf)
             for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
    on_device = [(name, leaf) for name, leaf in named if isinstance(leaf, jax.Array)]
    for name, leaf in named:
        if not isinstance(leaf, jax.Array):
            check_finite(np.asarray(leaf), f"{where}: parameter {name}", hint=hint)
    if on_device:
        flags = jax.device_get(_any_nonfinite()([leaf for _, leaf in on_device]))
        for (name, _), bad in zip(on_device, flags):
            if bad:
                raise NonFiniteError(f"{where}: parameter {name} holds NaN or Inf"
                                     + (f"; {hint}" if hint else ""))
