//! Float64 reference of the DPO forward and backward, from the formulas with plain loops.
//!
//! ```text
//! lp[r,t] = (x[r,t,y] - m) - ln sum_{v<V} exp(x[r,t,v] - m),  m = max_{v<V} x[r,t,v]
//! s[r]    = sum_t lp[r,t] over valid positions (divided by their count n[r] when
//!           length-normalised and n[r] > 0)
//! z_i     = (s[i] - ref[i]) - (s[B+i] - ref[B+i]),  u_i = beta * z_i,  loss = mean_i l(z_i)
//! d loss / d x[r,t,v] = c[r] * (onehot(y)[v] - softmax(x[r,t,0..V])[v]) for v < V, else 0
//! c[i] = l'(z_i) / (B k[i]),  c[B+i] = -l'(z_i) / (B k[B+i]),  k[r] = n[r] or 1
//! ```

use dpo_kernels::{BatchShape, DpoConfig, LossKind};

/// Reference outputs of one batch. Per-row vectors have length 2B, per-pair vectors B.
pub struct Reference {
    /// `s[r]`.
    pub seq_logp: Vec<f64>,
    /// `sum_t |lp[r,t]|` (divided by `k[r]` like `s[r]`): the scale of `s[r]`'s rounding.
    pub seq_scale: Vec<f64>,
    pub losses: Vec<f64>,
    pub loss: f64,
    /// `l'(z_i)`.
    pub dloss_dz: Vec<f64>,
    /// Bound on `|l''|`, which turns an error in `z` into an error in `l'`.
    pub curvature: f64,
    pub chosen_rewards: Vec<f64>,
    pub rejected_rewards: Vec<f64>,
    /// `[rewards_chosen, rewards_rejected, accuracy, margin, logps_chosen, logps_rejected,
    /// logits_chosen, logits_rejected]`, as in `Metrics`.
    pub metrics: [f64; 8],
    /// Mean `|x|` over the real columns of the valid positions of each half, the scale of the
    /// two mean-logit metrics.
    pub logits_scale: [f64; 2],
    /// `d loss / d x` for an upstream gradient of 1, `[2B, T, W]`.
    pub grad: Vec<f64>,
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        x.exp() / (1.0 + x.exp())
    }
}

/// Returns `(l(z), l'(z), bound on |l''|)`.
fn pair_loss(config: &DpoConfig, z: f64) -> (f64, f64, f64) {
    let beta = config.beta as f64;
    let u = beta * z;
    match config.loss {
        LossKind::Sigmoid { label_smoothing } => {
            let eps = label_smoothing as f64;
            let loss = (1.0 - eps) * softplus(-u) + eps * softplus(u);
            let grad = beta * (-(1.0 - eps) * sigmoid(-u) + eps * sigmoid(u));
            (loss, grad, beta * beta / 4.0)
        }
        LossKind::Robust { label_smoothing } => {
            let eps = label_smoothing as f64;
            let norm = 1.0 - 2.0 * eps;
            let loss = ((1.0 - eps) * softplus(-u) - eps * softplus(u)) / norm;
            let grad = beta * (-(1.0 - eps) * sigmoid(-u) - eps * sigmoid(u)) / norm;
            (loss, grad, beta * beta / (4.0 * norm))
        }
        LossKind::Ipo => {
            let d = z - 1.0 / (2.0 * beta);
            (d * d, 2.0 * d, 2.0)
        }
        LossKind::Hinge => {
            if u < 1.0 {
                (1.0 - u, -beta, 0.0)
            } else {
                (0.0, 0.0, 0.0)
            }
        }
        other => panic!("the reference has no formula for {other:?}"),
    }
}

/// Computes the reference for logits `x` (already rounded to the tested dtype, widened).
pub fn reference(
    shape: BatchShape,
    x: &[f64],
    labels: &[i64],
    reference_logps: Option<&[f32]>,
    config: &DpoConfig,
) -> Reference {
    let (b, t, v, w) = (shape.pairs, shape.seq_len, shape.vocab, shape.row_stride);
    let rows = 2 * b;
    let mut sum = vec![0.0; rows];
    let mut abs_sum = vec![0.0; rows];
    let mut valid = vec![0usize; rows];
    let mut logit_sum = [0.0f64; 2];
    let mut logit_abs_sum = [0.0f64; 2];
    let mut logit_count = [0usize; 2];
    let mut softmax = vec![0.0; shape.logits_len()];

    // 1. Per position: log-softmax of the real columns, the target's log-prob, logit sums.
    for p in 0..rows * t {
        let r = p / t;
        if labels[p] == config.ignore_index {
            continue;
        }
        let row = &x[p * w..p * w + v];
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|&xv| (xv - m).exp()).sum();
        let lp = (row[labels[p] as usize] - m) - s.ln();
        sum[r] += lp;
        abs_sum[r] += lp.abs();
        valid[r] += 1;
        let half = usize::from(r >= b);
        logit_sum[half] += row.iter().sum::<f64>();
        logit_abs_sum[half] += row.iter().map(|xv| xv.abs()).sum::<f64>();
        logit_count[half] += v;
        for (col, &xv) in row.iter().enumerate() {
            softmax[p * w + col] = ((xv - m) - s.ln()).exp();
        }
    }
    let k: Vec<f64> = valid
        .iter()
        .map(|&n| {
            if config.length_normalize && n > 0 {
                n as f64
            } else {
                1.0
            }
        })
        .collect();
    let seq_logp: Vec<f64> = (0..rows).map(|r| sum[r] / k[r]).collect();
    let seq_scale: Vec<f64> = (0..rows).map(|r| abs_sum[r] / k[r]).collect();

    // 2. Pairs: margin, loss, derivative, rewards, c[r].
    let beta = config.beta as f64;
    let ref_of = |r: usize| reference_logps.map_or(0.0, |v| v[r] as f64);
    let mut losses = Vec::with_capacity(b);
    let mut dloss_dz = Vec::with_capacity(b);
    let mut chosen_rewards = Vec::with_capacity(b);
    let mut rejected_rewards = Vec::with_capacity(b);
    let mut coef = vec![0.0; rows];
    let mut curvature: f64 = 0.0;
    for i in 0..b {
        let chosen = seq_logp[i] - ref_of(i);
        let rejected = seq_logp[b + i] - ref_of(b + i);
        let (loss, dz, curve) = pair_loss(config, chosen - rejected);
        losses.push(loss);
        dloss_dz.push(dz);
        curvature = curvature.max(curve);
        chosen_rewards.push(beta * chosen);
        rejected_rewards.push(beta * rejected);
        coef[i] = dz / (b as f64 * k[i]);
        coef[b + i] = -dz / (b as f64 * k[b + i]);
    }
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
    let correct = (0..b)
        .filter(|&i| chosen_rewards[i] > rejected_rewards[i])
        .count();
    let margins: Vec<f64> = (0..b)
        .map(|i| chosen_rewards[i] - rejected_rewards[i])
        .collect();
    let logits_mean = |half: usize| {
        if logit_count[half] == 0 {
            0.0
        } else {
            logit_sum[half] / logit_count[half] as f64
        }
    };
    let logits_scale = [0, 1].map(|half| {
        if logit_count[half] == 0 {
            0.0
        } else {
            logit_abs_sum[half] / logit_count[half] as f64
        }
    });
    let metrics = [
        mean(&chosen_rewards),
        mean(&rejected_rewards),
        correct as f64 / b as f64,
        mean(&margins),
        mean(&seq_logp[..b]),
        mean(&seq_logp[b..]),
        logits_mean(0),
        logits_mean(1),
    ];

    // 3. Gradient: c[r] * (onehot - softmax) on valid positions' real columns.
    let mut grad = vec![0.0; shape.logits_len()];
    for p in 0..rows * t {
        if labels[p] == config.ignore_index {
            continue;
        }
        let c = coef[p / t];
        for col in 0..v {
            let onehot = if col as i64 == labels[p] { 1.0 } else { 0.0 };
            grad[p * w + col] = c * (onehot - softmax[p * w + col]);
        }
    }

    Reference {
        loss: mean(&losses),
        seq_logp,
        seq_scale,
        losses,
        dloss_dz,
        curvature,
        chosen_rewards,
        rejected_rewards,
        metrics,
        logits_scale,
        grad,
    }
}
