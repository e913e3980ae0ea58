//! The pair step on the CPU: sequence sums to losses, rewards, metrics and the per-sequence
//! gradient coefficient `c[r]`, all in f64 and rounded to f32 at the end.

use crate::batch::{BatchShape, Metrics};
use crate::config::{pair_loss, DpoConfig};

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
pub(crate) fn pair_step(
    shape: &BatchShape,
    config: &DpoConfig,
    sums: &SequenceSums,
    reference: Option<&[f32]>,
) -> PairStep {
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
        let (loss, dz) = pair_loss(config, chosen - rejected);
        loss_sum += loss;
        losses.push(loss as f32);
        dloss_dmargin.push(dz as f32);
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
    let metrics = Metrics {
        rewards_chosen: rewards_chosen as f32,
        rewards_rejected: rewards_rejected as f32,
        rewards_accuracy: (correct as f64 / b as f64) as f32,
        rewards_margin: mean(&margins) as f32,
        logps_chosen: mean(&seq_logp[..b]) as f32,
        logps_rejected: mean(&seq_logp[b..]) as f32,
        logits_chosen: logits_mean(0..b) as f32,
        logits_rejected: logits_mean(b..2 * b) as f32,
    };

    let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    PairStep {
        loss: (loss_sum / b as f64) as f32,
        losses,
        chosen_logps: to_f32(&seq_logp[..b]),
        rejected_logps: to_f32(&seq_logp[b..]),
        chosen_rewards: to_f32(&chosen_rewards),
        rejected_rewards: to_f32(&rejected_rewards),
        dloss_dmargin,
        metrics,
        seq_coef,
    }
}
