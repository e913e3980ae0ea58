//! The pair step's outputs in f64, and the rounding rules that every backend applies to turn
//! them into the f32 values of [`crate::DpoOutput`].

use crate::batch::Metrics;
use crate::config::DpoConfig;
use crate::error::{Error, Result};

/// Per-pair values and batch means of the pair step, in f64, before rounding.
pub(crate) struct PairValues {
    /// Mean loss over the pairs.
    pub loss: f64,
    /// `l(z_i)` per pair `[B]`.
    pub losses: Vec<f64>,
    /// `l'(z_i)` per pair `[B]`.
    pub dloss_dmargin: Vec<f64>,
    /// `beta * (logp[i] - ref[i])` `[B]`.
    pub chosen_rewards: Vec<f64>,
    /// `beta * (logp[B+i] - ref[B+i])` `[B]`.
    pub rejected_rewards: Vec<f64>,
    /// Sequence log-probs (length-normalised when configured) `[2B]`, chosen rows first.
    pub seq_logps: Vec<f64>,
    /// The batch metrics in the order of [`Metrics::named`].
    pub metrics: [f64; 8],
}

/// The pair step's outputs as a caller sees them.
pub(crate) struct PairOutputs {
    pub loss: f32,
    pub losses: Vec<f32>,
    pub chosen_logps: Vec<f32>,
    pub rejected_logps: Vec<f32>,
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
    pub dloss_dmargin: Vec<f32>,
    pub metrics: Metrics,
}

/// Rounds the pair step's f64 values to f32.
///
/// Fails with [`Error::NonFiniteOutput`] when an output would be NaN or a finite value beyond
/// the f32 range. NaN comes from log-probs of -inf on both sides of a pair (the margin is
/// undefined), or from margins of +inf and -inf in one mean. Overflow comes from an extreme
/// beta or reference_logps.
pub(crate) fn round_pair_values(values: &PairValues, config: &DpoConfig) -> Result<PairOutputs> {
    let b = values.losses.len();

    // 1. A margin is NaN exactly when its rewards are -inf on both sides.
    for i in 0..b {
        if (values.chosen_rewards[i] - values.rejected_rewards[i]).is_nan() {
            return Err(Error::NonFiniteOutput {
                output: format!("margin of pair {i}"),
                value: f64::NAN,
                detail: "the chosen and the rejected sequence both have log-prob -inf (a \
                         target logit of -inf at a valid position), so their difference is \
                         undefined; mask those positions or fix the model output"
                    .to_string(),
            });
        }
    }

    // 2. Every other output, by name.
    let one = |name: &str, value: f64| output_f32(|| name.to_string(), value, config.beta);
    let many = |name: &str, values: &[f64]| -> Result<Vec<f32>> {
        let named = |i: usize| move || format!("{name}[{i}]");
        (values.iter().enumerate())
            .map(|(i, &value)| output_f32(named(i), value, config.beta))
            .collect()
    };
    let m = &values.metrics;
    let metrics = Metrics {
        rewards_chosen: one("rewards/chosen", m[0])?,
        rewards_rejected: one("rewards/rejected", m[1])?,
        rewards_accuracy: one("rewards/accuracies", m[2])?,
        rewards_margin: one("rewards/margins", m[3])?,
        logps_chosen: one("logps/chosen", m[4])?,
        logps_rejected: one("logps/rejected", m[5])?,
        logits_chosen: one("logits/chosen", m[6])?,
        logits_rejected: one("logits/rejected", m[7])?,
    };
    Ok(PairOutputs {
        loss: one("loss", values.loss)?,
        losses: many("losses", &values.losses)?,
        chosen_logps: many("chosen_logps", &values.seq_logps[..b])?,
        rejected_logps: many("rejected_logps", &values.seq_logps[b..])?,
        chosen_rewards: many("chosen_rewards", &values.chosen_rewards)?,
        rejected_rewards: many("rejected_rewards", &values.rejected_rewards)?,
        dloss_dmargin: many("dloss_dmargin", &values.dloss_dmargin)?,
        metrics,
    })
}

/// Rounds the f64 value of the output `name` to f32.
///
/// An infinite value passes unchanged: only a sequence log-prob of -inf (or a logit of -inf,
/// for the mean-logit metrics) produces one, and then it is the exact value. NaN, left only
/// by a mean over pairs whose margins are +inf and -inf, and a finite value beyond the f32
/// range fail with [`Error::NonFiniteOutput`].
fn output_f32(name: impl FnOnce() -> String, value: f64, beta: f32) -> Result<f32> {
    let rounded = value as f32;
    if value.is_nan() {
        return Err(Error::NonFiniteOutput {
            output: name(),
            value,
            detail: "it averages pairs whose margins are +inf and -inf (sequence log-probs of \
                     -inf from target logits of -inf), so it is undefined; mask those positions \
                     or fix the model output"
                .to_string(),
        });
    }
    if value.is_finite() && !rounded.is_finite() {
        return Err(Error::NonFiniteOutput {
            output: name(),
            value,
            detail: format!(
                "it is beyond the f32 range (max {:e}); reduce beta = {beta:?} or check \
                 reference_logps and the logits for extreme values",
                f32::MAX
            ),
        });
    }
    Ok(rounded)
}
