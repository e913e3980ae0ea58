//! Loss settings and the per-pair math that every backend shares.
//!
//! Each member of the DPO family is a function `l(z)` of the pair margin
//! `z_i = (logp[i] - ref[i]) - (logp[B+i] - ref[B+i])`; the batch loss is `mean_i l(z_i)` and
//! every logit gradient is `c[r] * (onehot - softmax)` with
//! `c[i] = l'(z_i) / B` on chosen rows and `c[B+i] = -l'(z_i) / B` on rejected rows (times
//! `1 / n_valid[r]` when sequence log-probs are length-normalised).

use crate::error::{Error, Result};

/// Member of the DPO loss family. `u = beta * z` below.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum LossKind {
    /// DPO (Rafailov et al., 2023) with conservative label smoothing `eps` (cDPO):
    /// `l = -(1 - eps) * log sigmoid(u) - eps * log sigmoid(-u)`. `eps = 0` is plain DPO.
    Sigmoid {
        /// Probability that a preference label is flipped, in `[0, 0.5]`.
        label_smoothing: f32,
    },
    /// Robust DPO (Chowdhury et al., 2024), unbiased under label noise `eps`:
    /// `l = ((1 - eps) * -log sigmoid(u) + eps * log sigmoid(-u)) / (1 - 2 * eps)`.
    Robust {
        /// Label noise rate, in `[0, 0.5)`.
        label_smoothing: f32,
    },
    /// IPO (Azar et al., 2023): `l = (z - 1 / (2 * beta))^2`. TRL averages log-probs over
    /// tokens for IPO; set [`DpoConfig::length_normalize`] to match it.
    Ipo,
    /// SLiC-style hinge: `l = max(0, 1 - u)`.
    Hinge,
}

impl LossKind {
    /// Returns the name used on the command line and in batch metadata.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Sigmoid { .. } => "sigmoid",
            LossKind::Robust { .. } => "robust",
            LossKind::Ipo => "ipo",
            LossKind::Hinge => "hinge",
        }
    }

    /// Returns the label-smoothing rate, 0 for losses without one.
    pub fn label_smoothing(self) -> f32 {
        match self {
            LossKind::Sigmoid { label_smoothing } | LossKind::Robust { label_smoothing } => {
                label_smoothing
            }
            LossKind::Ipo | LossKind::Hinge => 0.0,
        }
    }

    /// Returns the code passed to the CUDA pair kernel (`DPO_LOSS_*` in `kernels/common.cuh`).
    pub(crate) fn kernel_code(self) -> i32 {
        match self {
            LossKind::Sigmoid { .. } => 0,
            LossKind::Robust { .. } => 1,
            LossKind::Ipo => 2,
            LossKind::Hinge => 3,
        }
    }
}

/// Settings of one DPO loss. Build with [`DpoConfig::new`] and adjust the public fields.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpoConfig {
    /// Inverse temperature `beta > 0` of the implicit reward `beta * (logp - ref)`.
    pub beta: f32,
    /// Loss family member.
    pub loss: LossKind,
    /// Label value that masks a position out (PyTorch and TRL use -100).
    pub ignore_index: i64,
    /// Divide each sequence log-prob by its number of valid positions (IPO as TRL runs it,
    /// SimPO-style objectives). A sequence with no valid position keeps log-prob 0. The
    /// reference log-probs must then be normalised the same way, since the crate uses them as
    /// given.
    pub length_normalize: bool,
}

impl DpoConfig {
    /// Returns plain sigmoid DPO with the given `beta`, ignore_index -100, summed log-probs.
    pub fn new(beta: f32) -> Self {
        DpoConfig {
            beta,
            loss: LossKind::Sigmoid {
                label_smoothing: 0.0,
            },
            ignore_index: -100,
            length_normalize: false,
        }
    }

    /// Checks `beta` and the label-smoothing rate.
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(Error::InvalidParameter {
                name: "beta",
                value: as_written(self.beta),
                expected: "a finite number > 0 (0.1 is the usual DPO value)",
            });
        }
        match self.loss {
            LossKind::Sigmoid { label_smoothing } => {
                if !(0.0..=0.5).contains(&label_smoothing) {
                    return Err(Error::InvalidParameter {
                        name: "label_smoothing",
                        value: as_written(label_smoothing),
                        expected: "a number in [0, 0.5] for sigmoid DPO",
                    });
                }
            }
            LossKind::Robust { label_smoothing } => {
                if !(0.0..0.5).contains(&label_smoothing) {
                    return Err(Error::InvalidParameter {
                        name: "label_smoothing",
                        value: as_written(label_smoothing),
                        expected: "a number in [0, 0.5) for robust DPO",
                    });
                }
            }
            LossKind::Ipo | LossKind::Hinge => {}
        }
        Ok(())
    }
}

/// Widens an f32 parameter for an error message through its shortest decimal form, so that
/// 0.01f32 reads `0.01` and not `0.009999999776482582`.
pub(crate) fn as_written(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(value as f64)
}

/// `log(1 + exp(x))` without overflow for any finite or infinite `x`.
pub(crate) fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `1 / (1 + exp(-x))` without overflow.
pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Returns `weight * term`, with a zero weight giving 0 even when `term` is infinite.
fn weighted(weight: f64, term: f64) -> f64 {
    if weight == 0.0 {
        0.0
    } else {
        weight * term
    }
}

/// Returns `(l(z), l'(z))` for one pair margin `z`, in f64. An infinite `z` (a sequence
/// log-prob of -inf) gives the limit of `l`. A term whose weight is 0, such as the
/// label-smoothing term at `eps = 0`, stays 0 there instead of becoming `0 * inf = NaN`.
pub(crate) fn pair_loss(config: &DpoConfig, z: f64) -> (f64, f64) {
    let beta = config.beta as f64;
    let u = beta * z;
    match config.loss {
        LossKind::Sigmoid { label_smoothing } => {
            let eps = label_smoothing as f64;
            let loss = weighted(1.0 - eps, softplus(-u)) + weighted(eps, softplus(u));
            let grad = beta * (-(1.0 - eps) * sigmoid(-u) + eps * sigmoid(u));
            (loss, grad)
        }
        LossKind::Robust { label_smoothing } => {
            let eps = label_smoothing as f64;
            let norm = 1.0 - 2.0 * eps;
            let loss = (weighted(1.0 - eps, softplus(-u)) - weighted(eps, softplus(u))) / norm;
            let grad = beta * (-(1.0 - eps) * sigmoid(-u) - eps * sigmoid(u)) / norm;
            (loss, grad)
        }
        LossKind::Ipo => {
            let d = z - 1.0 / (2.0 * beta);
            (d * d, 2.0 * d)
        }
        LossKind::Hinge => {
            if u < 1.0 {
                (1.0 - u, -beta)
            } else {
                (0.0, 0.0)
            }
        }
    }
}
