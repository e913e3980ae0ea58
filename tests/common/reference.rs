//! Float64 reference of the fused DPO forward and backward, written from the formulas with
//! plain loops. It shares no code with the crate: only the crate's public config types are
//! read, to pick the loss and its parameters.
//!
//! ```text
//! lse[r,t]  = m + ln sum_{v<V} exp(x[r,t,v] - m),   m = max_{v<V} x[r,t,v]
//! lp[r,t]   = (x[r,t,y] - m) - ln sum_{v<V} exp(x[r,t,v] - m)      (valid positions only)
//! s[r]      = sum_t lp[r,t], divided by n[r] = #valid positions when length-normalised
//! z_i       = (s[i] - ref[i]) - (s[B+i] - ref[B+i]),   u_i = beta * z_i
//! loss      = mean_i l(z_i)
//! d loss / d x[r,t,v] = g[r] * (onehot(y)[v] - softmax(x[r,t,0..V])[v])   for v < V, 0 else
//! g[i] = l'(z_i) / (B * k[i]),  g[B+i] = -l'(z_i) / (B * k[B+i]),
//! k[r] = n[r] when length-normalised and n[r] > 0, else 1
//! ```

use dpo_kernels::{DpoConfig, LossKind};

/// The loss family member, with its parameters in f64.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RefLoss {
    /// `-(1 - eps) ln sigmoid(u) - eps ln sigmoid(-u)`.
    Sigmoid { eps: f64 },
    /// `((1 - eps) (-ln sigmoid(u)) + eps ln sigmoid(-u)) / (1 - 2 eps)`.
    Robust { eps: f64 },
    /// `(z - 1 / (2 beta))^2`.
    Ipo,
    /// `max(0, 1 - u)`.
    Hinge,
}

/// Loss settings in f64.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RefParams {
    pub beta: f64,
    pub loss: RefLoss,
    pub ignore_index: i64,
    pub length_normalize: bool,
}

impl RefParams {
    /// Widens a crate config. `beta` and `eps` are the f32 values the crate receives.
    pub fn from_config(config: &DpoConfig) -> Self {
        let loss = match config.loss {
            LossKind::Sigmoid { label_smoothing } => RefLoss::Sigmoid {
                eps: label_smoothing as f64,
            },
            LossKind::Robust { label_smoothing } => RefLoss::Robust {
                eps: label_smoothing as f64,
            },
            LossKind::Ipo => RefLoss::Ipo,
            LossKind::Hinge => RefLoss::Hinge,
            other => panic!("the f64 reference has no formula for loss {other:?}"),
        };
        RefParams {
            beta: config.beta as f64,
            loss,
            ignore_index: config.ignore_index,
            length_normalize: config.length_normalize,
        }
    }
}

/// A batch in f64: logits `[2B, T, W]` with `V` real columns, labels `[2B, T]`, optional
/// reference log-probs `[2B]`.
#[derive(Clone, Copy, Debug)]
pub struct RefBatch<'a> {
    pub pairs: usize,
    pub seq_len: usize,
    pub vocab: usize,
    pub row_stride: usize,
    pub logits: &'a [f64],
    pub labels: &'a [i64],
    pub reference: Option<&'a [f64]>,
}

impl RefBatch<'_> {
    fn sequences(&self) -> usize {
        2 * self.pairs
    }

    fn positions(&self) -> usize {
        self.sequences() * self.seq_len
    }

    /// Returns the target column of position `p`, or `None` when it is masked.
    fn target(&self, p: usize, ignore_index: i64) -> Option<usize> {
        let y = self.labels[p];
        if y == ignore_index {
            return None;
        }
        assert!(
            (0..self.vocab as i64).contains(&y),
            "reference input has label {y} at position {p}, outside [0, {})",
            self.vocab
        );
        Some(y as usize)
    }

    /// Returns the `V` real logits of position `p`.
    fn real_row(&self, p: usize) -> &[f64] {
        let start = p * self.row_stride;
        &self.logits[start..start + self.vocab]
    }
}

/// Everything the forward pass produces, in f64, plus the magnitudes the tests scale their
/// tolerances by.
#[derive(Clone, Debug)]
pub struct RefForward {
    /// Target log-prob per position `[2B * T]`, 0 at masked positions.
    pub token_logp: Vec<f64>,
    /// Max logit per position `[2B * T]` (over real columns), 0 at masked positions.
    pub row_max: Vec<f64>,
    /// `ln sum_v exp(x_v - m)` per position `[2B * T]`, 0 at masked positions.
    pub row_log_sum: Vec<f64>,
    /// Valid positions per sequence `[2B]`.
    pub valid: Vec<usize>,
    /// Sequence log-prob `[2B]`, length-normalised when requested.
    pub seq_logp: Vec<f64>,
    /// `sum_t |lp[r,t]|` per sequence `[2B]`, normalised like `seq_logp`.
    pub seq_abs_logp: Vec<f64>,
    /// Pair margins `z_i` `[B]`.
    pub margins: Vec<f64>,
    /// Pair losses `l(z_i)` `[B]`.
    pub losses: Vec<f64>,
    /// `l'(z_i)` `[B]`.
    pub dloss_dz: Vec<f64>,
    /// Mean loss.
    pub loss: f64,
    /// `beta * (s[i] - ref[i])` `[B]`.
    pub chosen_rewards: Vec<f64>,
    /// `beta * (s[B+i] - ref[B+i])` `[B]`.
    pub rejected_rewards: Vec<f64>,
    /// The eight metrics in TRL's order: rewards/chosen, rewards/rejected,
    /// rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, logits/chosen,
    /// logits/rejected.
    pub metrics: [f64; 8],
    /// Mean of `|x|` over the same elements as logits/chosen and logits/rejected.
    pub logits_abs_mean: [f64; 2],
    /// `g[r] = d loss / d lp[r,t]` for every valid position of sequence `r` `[2B]`.
    pub seq_coef: Vec<f64>,
}

/// Returns `ln sigmoid(x)` without overflow.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// Returns `1 / (1 + exp(-x))` without overflow.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Returns `(l(z), l'(z))` for one pair. The hinge takes derivative 0 at its kink `u = 1`.
pub fn pair_loss(params: &RefParams, z: f64) -> (f64, f64) {
    let beta = params.beta;
    let u = beta * z;
    match params.loss {
        RefLoss::Sigmoid { eps } => {
            // d/du [-ln sigmoid(u)] = -sigmoid(-u) and d/du [-ln sigmoid(-u)] = sigmoid(u).
            let loss = -(1.0 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u);
            let dloss_du = -(1.0 - eps) * sigmoid(-u) + eps * sigmoid(u);
            (loss, beta * dloss_du)
        }
        RefLoss::Robust { eps } => {
            let loss = ((1.0 - eps) * -log_sigmoid(u) + eps * log_sigmoid(-u)) / (1.0 - 2.0 * eps);
            let dloss_du = (-(1.0 - eps) * sigmoid(-u) - eps * sigmoid(u)) / (1.0 - 2.0 * eps);
            (loss, beta * dloss_du)
        }
        RefLoss::Ipo => {
            let d = z - 1.0 / (2.0 * beta);
            (d * d, 2.0 * d)
        }
        RefLoss::Hinge => {
            if u < 1.0 {
                (1.0 - u, -beta)
            } else {
                (0.0, 0.0)
            }
        }
    }
}

/// Returns an upper bound of `|l''(z)|` over all `z`. Sigmoid-type losses reach
/// `beta^2 / 4` at `u = 0`; IPO is a parabola; the hinge is piecewise linear.
pub fn curvature_bound(params: &RefParams) -> f64 {
    let beta = params.beta;
    match params.loss {
        RefLoss::Sigmoid { .. } => beta * beta / 4.0,
        RefLoss::Robust { eps } => beta * beta / (4.0 * (1.0 - 2.0 * eps)),
        RefLoss::Ipo => 2.0,
        RefLoss::Hinge => 0.0,
    }
}

/// Returns whether `z` lies within `z_tol` of a point where `l'` jumps (the hinge at
/// `u = 1`), so that either one-sided
/// derivative is correct.
pub fn near_kink(params: &RefParams, z: f64, z_tol: f64) -> bool {
    match params.loss {
        RefLoss::Hinge => (params.beta * z - 1.0).abs() <= params.beta * z_tol,
        _ => false,
    }
}

/// Runs the forward pass in f64.
pub fn forward(batch: &RefBatch<'_>, params: &RefParams) -> RefForward {
    let (b, t, v) = (batch.pairs, batch.seq_len, batch.vocab);
    let rows = batch.sequences();
    assert_eq!(batch.logits.len(), batch.positions() * batch.row_stride);
    assert_eq!(batch.labels.len(), batch.positions());

    // 1. Log-softmax of every valid position and the masked per-sequence sums.
    let mut token_logp = vec![0.0; batch.positions()];
    let mut row_max = vec![0.0; batch.positions()];
    let mut row_log_sum = vec![0.0; batch.positions()];
    let mut valid = vec![0usize; rows];
    let mut sum_logp = vec![0.0; rows];
    let mut sum_abs_logp = vec![0.0; rows];
    let mut logit_sum = [0.0f64; 2];
    let mut logit_abs_sum = [0.0f64; 2];
    let mut logit_count = [0usize; 2];
    for p in 0..batch.positions() {
        let Some(y) = batch.target(p, params.ignore_index) else {
            continue;
        };
        let r = p / t;
        let x = batch.real_row(p);
        let mut m = f64::NEG_INFINITY;
        for &xv in x {
            m = m.max(xv);
        }
        assert!(m.is_finite(), "reference row {p} has no finite max");
        let mut s = 0.0;
        for &xv in x {
            s += (xv - m).exp();
        }
        let log_s = s.ln();
        let lp = (x[y] - m) - log_s;
        token_logp[p] = lp;
        row_max[p] = m;
        row_log_sum[p] = log_s;
        valid[r] += 1;
        sum_logp[r] += lp;
        sum_abs_logp[r] += lp.abs();
        let half = usize::from(r >= b);
        logit_count[half] += 1;
        for &xv in x {
            logit_sum[half] += xv;
            logit_abs_sum[half] += xv.abs();
        }
    }

    // 2. Sequence log-probs, optionally divided by the valid-position count.
    let norm: Vec<f64> = valid
        .iter()
        .map(|&n| {
            if params.length_normalize && n > 0 {
                n as f64
            } else {
                1.0
            }
        })
        .collect();
    let seq_logp: Vec<f64> = (0..rows).map(|r| sum_logp[r] / norm[r]).collect();
    let seq_abs_logp: Vec<f64> = (0..rows).map(|r| sum_abs_logp[r] / norm[r]).collect();

    // 3. Pair margins, losses, rewards and the per-sequence gradient coefficient.
    let reference = |r: usize| batch.reference.map_or(0.0, |v| v[r]);
    let mut margins = Vec::with_capacity(b);
    let mut losses = Vec::with_capacity(b);
    let mut dloss_dz = Vec::with_capacity(b);
    let mut chosen_rewards = Vec::with_capacity(b);
    let mut rejected_rewards = Vec::with_capacity(b);
    let mut seq_coef = vec![0.0; rows];
    for i in 0..b {
        let chosen = seq_logp[i] - reference(i);
        let rejected = seq_logp[b + i] - reference(b + i);
        let z = chosen - rejected;
        let (l, dl) = pair_loss(params, z);
        margins.push(z);
        losses.push(l);
        dloss_dz.push(dl);
        chosen_rewards.push(params.beta * chosen);
        rejected_rewards.push(params.beta * rejected);
        seq_coef[i] = dl / (b as f64 * norm[i]);
        seq_coef[b + i] = -dl / (b as f64 * norm[b + i]);
    }
    let loss = losses.iter().sum::<f64>() / b as f64;

    // 4. Metrics as TRL logs them: means over pairs; accuracy counts strict wins.
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
    let wins = (0..b)
        .filter(|&i| chosen_rewards[i] > rejected_rewards[i])
        .count();
    let margin_values: Vec<f64> = (0..b)
        .map(|i| chosen_rewards[i] - rejected_rewards[i])
        .collect();
    let per_element = |total: f64, count: usize| {
        if count == 0 {
            0.0
        } else {
            total / (count as f64 * v as f64)
        }
    };
    let metrics = [
        mean(&chosen_rewards),
        mean(&rejected_rewards),
        wins as f64 / b as f64,
        mean(&margin_values),
        mean(&seq_logp[..b]),
        mean(&seq_logp[b..]),
        per_element(logit_sum[0], logit_count[0]),
        per_element(logit_sum[1], logit_count[1]),
    ];
    let logits_abs_mean = [
        per_element(logit_abs_sum[0], logit_count[0]),
        per_element(logit_abs_sum[1], logit_count[1]),
    ];

    RefForward {
        token_logp,
        row_max,
        row_log_sum,
        valid,
        seq_logp,
        seq_abs_logp,
        margins,
        losses,
        dloss_dz,
        loss,
        chosen_rewards,
        rejected_rewards,
        metrics,
        logits_abs_mean,
        seq_coef,
    }
}

/// Returns `grad_loss * d loss / d logits`, `[2B, T, W]`: zero on masked positions and on the
/// padded columns `V..W`.
pub fn gradient(
    batch: &RefBatch<'_>,
    params: &RefParams,
    fwd: &RefForward,
    grad_loss: f64,
) -> Vec<f64> {
    let (t, v, w) = (batch.seq_len, batch.vocab, batch.row_stride);
    let mut grad = vec![0.0; batch.logits.len()];
    for p in 0..batch.positions() {
        let Some(y) = batch.target(p, params.ignore_index) else {
            continue;
        };
        let coef = grad_loss * fwd.seq_coef[p / t];
        let x = batch.real_row(p);
        let (m, log_s) = (fwd.row_max[p], fwd.row_log_sum[p]);
        let out = &mut grad[p * w..p * w + v];
        for col in 0..v {
            let prob = ((x[col] - m) - log_s).exp();
            out[col] = -coef * prob;
        }
        // 1 - p_y as -expm1(lp) keeps its digits when the row is peaked on its target.
        out[y] = -coef * fwd.token_logp[p].exp_m1();
    }
    grad
}
