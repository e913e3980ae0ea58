//! The pair step on the CPU: sequence sums to losses, rewards, metrics and the per-sequence
//! gradient coefficient `c[r]`, all in f64; `crate::pairs` rounds them to f32.

use crate::batch::BatchShape;
use crate::config::{pair_loss, DpoConfig};
use crate::pairs::PairValues;

/// Per-sequence masked sums `[2B]`, in f64.
pub(crate) struct SequenceSums {
    pub logp: Vec<f64>,
    pub logit_sum: Vec<f64>,
    pub valid: Vec<u64>,
}

/// Computes losses, rewards, metrics and `c[r]` from the sequence sums, in f64. Sums run in
/// index order, so the result does not depend on thread count. Returns the values and
/// `c[r]` `[2B]` rounded to f32.
pub(crate) fn pair_step(
    shape: &BatchShape,
    config: &DpoConfig,
    sums: &SequenceSums,
    reference: Option<&[f32]>,
) -> (PairValues, Vec<f32>) {
    let b = shape.pairs;
    let beta = config.beta as f64;
    let reference_of = |r: usize| reference.map_or(0.0, |v| v[r] as f64);

    // 1. Sequence log-prob, optionally divided by the valid-position count.
    let seq_logps: Vec<f64> = (0..2 * b)
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
    let mut correct = 0usize;
    for i in 0..b {
        let chosen = seq_logps[i] - reference_of(i);
        let rejected = seq_logps[b + i] - reference_of(b + i);
        let (loss, dz) = pair_loss(config, chosen - rejected);
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
    let margins: Vec<f64> = chosen_rewards
        .iter()
        .zip(&rejected_rewards)
        .map(|(c, r)| c - r)
        .collect();
    let metrics = [
        mean(&chosen_rewards),
        mean(&rejected_rewards),
        correct as f64 / b as f64,
        mean(&margins),
        mean(&seq_logps[..b]),
        mean(&seq_logps[b..]),
        logits_mean(0..b),
        logits_mean(b..2 * b),
    ];
    let values = PairValues {
        loss: mean(&losses),
        losses,
        dloss_dmargin,
        chosen_rewards,
        rejected_rewards,
        seq_logps,
        metrics,
    };
    (values, seq_coef)
}
