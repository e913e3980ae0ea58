//! The pair step on the CPU: sequence sums to losses, rewards, metrics and the per-sequence
//! gradient coefficient `c[r]`, all in f64 and rounded to f32 at the end.

use crate::batch::{BatchShape, Metrics};
use crate::config::{pair_loss, DpoConfig};
use crate::error::{Error, Result};

/// Per-sequence masked sums `[2B]`, in f64.
pub(crate) struct SequenceSums {
    pub logp: Vec<f64>,
    pub logit_sum: Vec<f64>,
    pub valid: Vec<u64>,
}

/// Everything the pair step produces.
pub(crate) struct PairStep {
    pub loss: f32,
    pub losses: Vec<f32>,
    pub chosen_logps: Vec<f32>,
    pub rejected_logps: Vec<f32>,
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
    pub dloss_dmargin: Vec<f32>,
    pub metrics: Metrics,
    pub seq_coef: Vec<f32>,
}

/// Computes losses, rewards, metrics and `c[r]` from the sequence sums. Sums run in index
/// order, so the result does not depend on thread count.
///
/// Fails with [`Error::NonFiniteOutput`] when an output would be NaN or a finite value beyond
/// the f32 range. NaN comes from log-probs of -inf on both sides of a pair, or from margins of
/// +inf and -inf in one mean. Overflow comes from an extreme beta or reference_logps.
pub(crate) fn pair_step(
    shape: &BatchShape,
    config: &DpoConfig,
    sums: &SequenceSums,
    reference: Option<&[f32]>,
) -> Result<PairStep> {
    let b = shape.pairs;
    let beta = config.beta as f64;
    let reference_of = |r: usize| reference.map_or(0.0, |v| v[r] as f64);

    // 1. Sequence log-prob, optionally divided by the valid-position count.
    let seq_logp: Vec<f64> = (0..2 * b)
        .map(|r| {
            if config.length_normalize && sums.valid[r] > 0 {
                sums.logp[r] / sums.valid[r] as f64
            } else {
                sums.logp[r]
            }
        })
        .collect();

    // 2. Per pair: margin z, loss and d loss / d z.
    let mut losses = Vec::with_capacity(b);
    let mut dloss_dmargin = Vec::with_capacity(b);
    let mut chosen_rewards = Vec::with_capacity(b);
    let mut rejected_rewards = Vec::with_capacity(b);
    let mut seq_coef = vec![0.0f32; 2 * b];
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    for i in 0..b {
        let chosen = seq_logp[i] - reference_of(i);
        let rejected = seq_logp[b + i] - reference_of(b + i);
        let margin = chosen - rejected;
        if margin.is_nan() {
            return Err(Error::NonFiniteOutput {
                output: format!("margin of pair {i}"),
                value: margin,
                detail: "the chosen and the rejected sequence both have log-prob -inf (a \
                         target logit of -inf at a valid position), so their difference is \
                         undefined; mask those positions or fix the model output"
                    .to_string(),
            });
        }
        let (loss, dz) = pair_loss(config, margin);
        loss_sum += loss;
        losses.push(loss);
        dloss_dmargin.push(dz);
        chosen_rewards.push(beta * chosen);
        rejected_rewards.push(beta * rejected);
        if beta * chosen > beta * rejected {
            correct += 1;
        }

        // 3. c[r]: z grows with the chosen log-prob and falls with the rejected one.
        for (r, sign) in [(i, 1.0), (b + i, -1.0)] {
            let norm = if config.length_normalize && sums.valid[r] > 0 {
                sums.valid[r] as f64
            } else {
                1.0
            };
            seq_coef[r] = (sign * dz / (b as f64 * norm)) as f32;
        }
    }

    // 4. Metrics, averaged over pairs (logits over valid positions of each half).
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let logits_mean = |rows: std::ops::Range<usize>| {
        let total: f64 = sums.logit_sum[rows.clone()].iter().sum();
        let count: u64 = sums.valid[rows].iter().sum();
        if count == 0 {
            0.0
        } else {
            total / (count as f64 * shape.vocab as f64)
        }
    };
    let rewards_chosen = mean(&chosen_rewards);
    let rewards_rejected = mean(&rejected_rewards);
    let margins: Vec<f64> = chosen_rewards
        .iter()
        .zip(&rejected_rewards)
        .map(|(c, r)| c - r)
        .collect();
    let output = |name: &str, value: f64| output_f32(|| name.to_string(), value, config.beta);
    let metrics = Metrics {
        rewards_chosen: output("rewards/chosen", rewards_chosen)?,
        rewards_rejected: output("rewards/rejected", rewards_rejected)?,
        rewards_accuracy: (correct as f64 / b as f64) as f32,
        rewards_margin: output("rewards/margins", mean(&margins))?,
        logps_chosen: output("logps/chosen", mean(&seq_logp[..b]))?,
        logps_rejected: output("logps/rejected", mean(&seq_logp[b..]))?,
        logits_chosen: output("logits/chosen", logits_mean(0..b))?,
        logits_rejected: output("logits/rejected", logits_mean(b..2 * b))?,
    };

    let outputs = |name: &str, values: &[f64]| -> Result<Vec<f32>> {
        let named = |i: usize| move || format!("{name}[{i}]");
        (values.iter().enumerate())
            .map(|(i, &value)| output_f32(named(i), value, config.beta))
            .collect()
    };
    Ok(PairStep {
        loss: output("loss", loss_sum / b as f64)?,
        losses: outputs("losses", &losses)?,
        chosen_logps: outputs("chosen_logps", &seq_logp[..b])?,
        rejected_logps: outputs("rejected_logps", &seq_logp[b..])?,
        chosen_rewards: outputs("chosen_rewards", &chosen_rewards)?,
        rejected_rewards: outputs("rejected_rewards", &rejected_rewards)?,
        dloss_dmargin: outputs("dloss_dmargin", &dloss_dmargin)?,
        metrics,
        seq_coef,
    })
}

/// Rounds the f64 value of the output `name` to f32.
///
/// An infinite value passes unchanged: only a sequence log-prob of -inf produces one, and then
/// it is the exact answer. NaN, left only by a mean over pairs whose margins are +inf and
/// -inf, and a finite value beyond the f32 range fail with [`Error::NonFiniteOutput`].
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
