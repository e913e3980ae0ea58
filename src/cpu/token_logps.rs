//! Per-row log-softmax statistics and gradient rows on the CPU.
//!
//! Forward: one pass over the `V` real columns of a valid row keeps a running max `m` and a
//! running sum `s = sum_v exp(x_v - m)` (rescaled when `m` grows), gathers the target logit and
//! sums the logits. The row's target log-prob is formed as `(x_y - m) - log(s)`, never as
//! `x_y - lse`, so a logit of 1e4 loses no digits to the subtraction.
//!
//! Backward: `grad_v = coef * (onehot(y)_v - exp((x_v - m) - log(s)))` over the real columns,
//! 0 over padded columns.

use crate::dtype::Element;

/// Elements converted to f32 and reduced together. 64 keeps the buffer in registers or L1
/// and lets the max and sum loops vectorize.
const CHUNK: usize = 64;

/// What the forward pass keeps of one valid row.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RowStats {
    /// `(x_y - m) - log(s)`: the target token's log-prob.
    pub logp: f64,
    /// Sum of the V real logits (for the mean-logit metric).
    pub logit_sum: f64,
    /// Row max `m` over the real columns.
    pub max: f32,
    /// `log(sum_v exp(x_v - m))`.
    pub log_sum: f32,
}

/// Why a valid row has no log-softmax.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RowFault {
    /// A NaN at this column.
    NaN(usize),
    /// A +inf at this column.
    PosInf(usize),
    /// Every real logit is -inf.
    AllNegInf,
}

impl RowFault {
    pub(crate) fn describe(self) -> String {
        match self {
            RowFault::NaN(col) => format!("holds NaN at vocabulary column {col}"),
            RowFault::PosInf(col) => format!("holds +inf at vocabulary column {col}"),
            RowFault::AllNegInf => "is -inf in every vocabulary column".to_string(),
        }
    }
}

/// Computes the log-softmax statistics of one valid row (`row.len() == V`) and its target's
/// log-prob, in one pass.
pub(crate) fn row_forward<T: Element>(row: &[T], target: usize) -> Result<RowStats, RowFault> {
    let mut max = f32::NEG_INFINITY;
    let mut sum = 0.0f64;
    let mut logit_sum = 0.0f64;
    let mut buf = [0.0f32; CHUNK];
    for (chunk_index, chunk) in row.chunks(CHUNK).enumerate() {
        let xs = &mut buf[..chunk.len()];
        for (dst, src) in xs.iter_mut().zip(chunk) {
            *dst = src.to_f32();
        }

        // 1. NaN and +inf fail `x < inf`; find the column only on that rare path.
        let finite_or_neg_inf = xs.iter().fold(true, |ok, &x| ok & (x < f32::INFINITY));
        if !finite_or_neg_inf {
            let col = xs
                .iter()
                .position(|&x| x.is_nan() || x == f32::INFINITY)
                .unwrap_or(0);
            let col_in_row = chunk_index * CHUNK + col;
            return Err(if xs[col].is_nan() {
                RowFault::NaN(col_in_row)
            } else {
                RowFault::PosInf(col_in_row)
            });
        }

        // 2. Rescale the running sum when the chunk raises the max.
        let chunk_max = xs.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        if chunk_max > max {
            sum *= ((max - chunk_max) as f64).exp();
            max = chunk_max;
        }

        // 3. Accumulate exp(x - m) and the raw logits. An all -inf chunk before any finite
        //    value adds nothing (m is still -inf and exp is skipped).
        if max > f32::NEG_INFINITY {
            let chunk_sum: f32 = xs.iter().map(|&x| (x - max).exp()).sum();
            sum += chunk_sum as f64;
        }
        let chunk_logits: f32 = xs.iter().sum();
        logit_sum += chunk_logits as f64;
    }
    if max == f32::NEG_INFINITY {
        return Err(RowFault::AllNegInf);
    }
    let log_sum = sum.ln();
    let target_logit = row[target].to_f32();
    let logp = (target_logit - max) as f64 - log_sum;
    Ok(RowStats {
        logp,
        logit_sum,
        max,
        log_sum: log_sum as f32,
    })
}

/// Writes `coef * (onehot(target) - softmax(x))` for one valid row into `grad`
/// (`grad.len() == W`), zeros in the padded columns `x.len()..W`.
pub(crate) fn row_backward<T: Element, G: Element>(
    x: &[T],
    grad: &mut [G],
    target: usize,
    stats: (f32, f32),
    coef: f32,
) {
    let (max, log_sum) = stats;
    let vocab = x.len();
    let (real, padded) = grad.split_at_mut(vocab);
    for (g, &xv) in real.iter_mut().zip(x) {
        let p = ((xv.to_f32() - max) - log_sum).exp();
        *g = G::from_f32(-coef * p);
    }
    let p_target = ((x[target].to_f32() - max) - log_sum).exp();
    real[target] = G::from_f32(coef * (1.0 - p_target));
    padded.fill(G::default());
}

/// Same as [`row_backward`], with the gradient written over the logits row (`row.len() == W`).
pub(crate) fn row_backward_in_place<T: Element>(
    row: &mut [T],
    vocab: usize,
    target: usize,
    stats: (f32, f32),
    coef: f32,
) {
    let (max, log_sum) = stats;
    let p_target = ((row[target].to_f32() - max) - log_sum).exp();
    let (real, padded) = row.split_at_mut(vocab);
    for v in real.iter_mut() {
        let p = ((v.to_f32() - max) - log_sum).exp();
        *v = T::from_f32(-coef * p);
    }
    real[target] = T::from_f32(coef * (1.0 - p_target));
    padded.fill(T::default());
}
