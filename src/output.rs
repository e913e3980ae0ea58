//! What a forward pass returns, and the O(rows) state a backward pass needs.

use crate::batch::{BatchShape, Metrics};
use crate::config::DpoConfig;
use crate::error::{Error, Result};

/// Loss, per-pair values and metrics of one forward pass, plus the state for the backward.
///
/// Per-pair vectors have length B. `chosen_logps[i]` and `rejected_logps[i]` are the sequence
/// log-probs of rows `i` and `B + i` (length-normalised when the config asks for it).
#[derive(Debug)]
pub struct DpoOutput {
    /// Mean loss over the pairs.
    pub loss: f32,
    /// Loss of each pair.
    pub losses: Vec<f32>,
    /// Sequence log-prob of each chosen response.
    pub chosen_logps: Vec<f32>,
    /// Sequence log-prob of each rejected response.
    pub rejected_logps: Vec<f32>,
    /// `beta * (chosen_logps - ref_chosen)`.
    pub chosen_rewards: Vec<f32>,
    /// `beta * (rejected_logps - ref_rejected)`.
    pub rejected_rewards: Vec<f32>,
    /// `d losses[i] / d z_i` for each pair, with `z = (logp_c - ref_c) - (logp_r - ref_r)`;
    /// the derivative of the mean `loss` with respect to `z_i` is this divided by B.
    pub dloss_dmargin: Vec<f32>,
    /// Batch means a trainer logs.
    pub metrics: Metrics,
    /// What [`crate::DpoLoss::backward`] needs: O(rows), no logits.
    pub state: ForwardState,
}

/// Per-row and per-sequence values the forward keeps for the backward. Its size is
/// O(2B * T); it never holds a copy of the logits.
#[derive(Debug)]
pub struct ForwardState {
    pub(crate) shape: BatchShape,
    pub(crate) config: DpoConfig,
    pub(crate) saved: Saved,
}

impl ForwardState {
    /// Returns the shape of the batch the forward ran on.
    pub fn shape(&self) -> BatchShape {
        self.shape
    }

    /// Returns the config the forward ran with.
    pub fn config(&self) -> DpoConfig {
        self.config
    }

    /// Checks that a backward call passes the forward's batch shape.
    pub(crate) fn check_shape(&self, shape: &BatchShape) -> Result<()> {
        if *shape != self.shape {
            return Err(Error::StateMismatch {
                detail: format!(
                    "forward ran on {:?}, backward was given {:?}; pass the same batch",
                    self.shape, shape
                ),
            });
        }
        Ok(())
    }
}

/// Backend-specific saved values.
#[derive(Debug)]
pub(crate) enum Saved {
    /// CPU backend: host vectors.
    Host(HostSaved),
    /// CUDA backend: device buffers.
    Cuda(crate::cuda::DeviceSaved),
}

/// The CPU backend's saved values.
#[derive(Debug, Default)]
pub(crate) struct HostSaved {
    /// Row max `m` per position `[2B * T]` (unused on masked positions).
    pub row_max: Vec<f32>,
    /// `log(sum exp(x - m))` per position `[2B * T]`.
    pub row_log_sum: Vec<f32>,
    /// `c[r] = d loss / d logp_seq[r]` per sequence `[2B]`, including `1 / n_valid` when
    /// length-normalised.
    pub seq_coef: Vec<f32>,
}
