//! Tolerance checks that report the worst element on failure, and the error summaries the
//! emulated tests print.

use half::{bf16, f16};

/// Compares `got[i]` with `want[i]` under `|got - want| <= tol(i)`; a `want` of exactly 0
/// requires an exact 0 (masked positions and padded columns). Panics with the failure count,
/// the worst index, got, want and err/tol. Returns the largest `|got - want|`.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: impl Fn(usize) -> f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut failures = 0usize;
    let mut worst: Option<(usize, f64)> = None;
    let mut max_err = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let limit = if w == 0.0 { 0.0 } else { tol(i) };
        let ok = err <= limit;
        if !ok {
            failures += 1;
        }
        if err.is_finite() {
            max_err = max_err.max(err);
        }
        let ratio = if ok {
            0.0
        } else if limit > 0.0 {
            err / limit
        } else {
            f64::INFINITY
        };
        let replace = match worst {
            None => true,
            Some((_, r)) => ratio > r,
        };
        if !ok && replace {
            worst = Some((i, ratio));
        }
    }
    if let Some((i, ratio)) = worst {
        panic!(
            "{what}: {failures} of {} elements out of tolerance; worst at index {i}: got {}, \
             want {}, err/tol {ratio:.3e}",
            got.len(),
            got[i],
            want[i]
        );
    }
    max_err
}

/// How far two backends' outputs are apart.
pub struct Diff {
    /// Largest `|a - b|` over pairs that are both finite or both infinite.
    pub max_abs: f64,
    /// Largest `|a - b| / max(|a|, |b|)` over the same pairs (0 where both are 0).
    pub max_rel: f64,
    /// Pairs where exactly one value is NaN.
    pub nan_mismatch: usize,
}

/// Compares two output vectors element by element.
pub fn max_diff(a: &[f32], b: &[f32]) -> Diff {
    let mut diff = Diff {
        max_abs: 0.0,
        max_rel: 0.0,
        nan_mismatch: 0,
    };
    for (&x, &y) in a.iter().zip(b) {
        if x.is_nan() != y.is_nan() {
            diff.nan_mismatch += 1;
        } else if x.is_finite() && y.is_finite() {
            let (x, y) = (x as f64, y as f64);
            let abs = (x - y).abs();
            diff.max_abs = diff.max_abs.max(abs);
            if abs > 0.0 {
                diff.max_rel = diff.max_rel.max(abs / x.abs().max(y.abs()));
            }
        }
    }
    diff
}

/// Test-side view of the logits and gradient dtypes: the relative tolerance of a gradient
/// stored in the type (two units in the last place).
pub trait GradTolerance {
    /// Relative tolerance of a value rounded to this type.
    const RTOL: f64;
}

impl GradTolerance for f32 {
    const RTOL: f64 = 1e-5;
}

impl GradTolerance for f16 {
    const RTOL: f64 = 1e-3;
}

impl GradTolerance for bf16 {
    const RTOL: f64 = 8e-3;
}
