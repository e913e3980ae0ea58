//! Forward outputs, and the O(rows) state a backward pass needs.

use crate::batch::{BatchShape, Metrics};
use crate::config::DpoConfig;
use crate::dtype::Label;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// Loss, per-pair values and metrics of one forward pass, plus the state for the backward.
///
/// Per-pair vectors have length B. `chosen_logps[i]` and `rejected_logps[i]` are the sequence
/// log-probs of rows `i` and `B + i` (length-normalised when the config sets `length_normalize`).
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
    /// State for [`crate::DpoLoss::backward`]: O(rows), no logits.
    pub state: ForwardState,
}

/// Per-row and per-sequence values the forward keeps for the backward. Its size is
/// O(2B * T); it never contains a copy of the logits.
#[derive(Debug)]
pub struct ForwardState {
    pub(crate) shape: BatchShape,
    pub(crate) config: DpoConfig,
    pub(crate) saved: Saved,
    /// [`labels_digest`] of the forward's labels; `None` when they stayed on a device.
    pub(crate) labels_digest: Option<u64>,
    /// Set by an in-place backward, after which the logits hold the gradient.
    pub(crate) consumed_in_place: AtomicBool,
}

/// Returns an FNV-1a hash of the label values, so a backward can tell that it was given other
/// labels (another mask) than its forward. O(rows), against O(rows x vocabulary) for the pass.
pub(crate) fn labels_digest<L: Label>(labels: &[L]) -> u64 {
    labels.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, y| {
        (hash ^ y.to_i64() as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl ForwardState {
    /// Bundles what a backward needs; `labels_digest` is `None` for device-resident labels.
    pub(crate) fn new(
        shape: BatchShape,
        config: DpoConfig,
        saved: Saved,
        labels_digest: Option<u64>,
    ) -> Self {
        ForwardState {
            shape,
            config,
            saved,
            labels_digest,
            consumed_in_place: AtomicBool::new(false),
        }
    }

    /// Checks that no in-place backward has overwritten the logits since the forward.
    pub(crate) fn check_not_consumed(&self) -> Result<()> {
        if self.consumed_in_place.load(Ordering::Acquire) {
            return Err(Error::StateMismatch {
                detail: "an in-place backward already overwrote the logits with their \
                         gradient; run the forward again before another backward"
                    .to_string(),
            });
        }
        Ok(())
    }

    /// Checks that a backward with host labels gets the forward's labels and that no in-place
    /// backward has overwritten the logits since the forward.
    pub(crate) fn check_reusable<L: Label>(&self, labels: &[L]) -> Result<()> {
        self.check_not_consumed()?;
        if let Some(digest) = self.labels_digest {
            if digest != labels_digest(labels) {
                return Err(Error::StateMismatch {
                    detail: "the labels differ from the ones the forward ran on; pass the \
                             same labels to forward and backward"
                        .to_string(),
                });
            }
        }
        Ok(())
    }

    /// Records that an in-place backward has overwritten the logits.
    pub(crate) fn mark_consumed_in_place(&self) {
        self.consumed_in_place.store(true, Ordering::Release);
    }

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
