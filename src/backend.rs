//! The interface every backend implements, and the checks they share.

use crate::batch::{check_len, Batch, BatchShape};
use crate::config::DpoConfig;
use crate::dtype::{Element, Label};
use crate::error::{Error, Result};
use crate::output::{DpoOutput, ForwardState};

/// One implementation of the fused DPO forward and backward. [`crate::Cpu`] and
/// [`crate::Cuda`] implement it with the same argument types and the same input checks.
pub trait Backend {
    /// Returns a short name for messages and bench labels (`cpu`, `cuda:0`).
    fn name(&self) -> String;

    /// Computes sequence log-probs, losses, rewards, metrics and the backward state.
    ///
    /// Fails before computing anything on an invalid shape, label or parameter, and after the
    /// pass over the logits (which writes nothing a caller owns) on a NaN or +inf logit at a
    /// valid position. Fails with [`crate::Error::NonFiniteOutput`] when an output would be
    /// NaN or a finite value beyond the f32 range. An infinite output is returned as is,
    /// because it is exact: only a sequence log-prob of -inf produces one.
    fn forward<T: Element, L: Label>(
        &self,
        batch: &Batch<'_, T, L>,
        config: &DpoConfig,
    ) -> Result<DpoOutput>;

    /// Writes `grad_loss * d loss / d logits` into `grad` (`[2B, T, W]`, any element type):
    /// zeros on masked positions and padded columns.
    ///
    /// Fails before the first write with [`crate::Error::NonFiniteOutput`] when a row scale
    /// `grad_loss * c[r]` is not finite in f32. Gradient elements beyond the range of `G`
    /// round to +-inf, as a cast does, and are never NaN.
    fn backward<T: Element, L: Label, G: Element>(
        &self,
        batch: &Batch<'_, T, L>,
        state: &ForwardState,
        grad_loss: f32,
        grad: &mut [G],
    ) -> Result<()>;

    /// Runs the forward, then writes `d loss / d logits` (upstream gradient 1) into `grad`.
    ///
    /// Equivalent to [`Backend::forward`] followed by [`Backend::backward`]; a backend may fuse
    /// them (the CUDA backend then uploads host logits once instead of twice).
    fn forward_backward<T: Element, L: Label, G: Element>(
        &self,
        batch: &Batch<'_, T, L>,
        config: &DpoConfig,
        grad: &mut [G],
    ) -> Result<DpoOutput> {
        let out = self.forward(batch, config)?;
        self.backward(batch, &out.state, 1.0, grad)?;
        Ok(out)
    }

    /// Overwrites `logits` with `grad_loss * d loss / d logits`. Every check runs before the
    /// first write, so an error leaves the logits untouched.
    fn backward_in_place<T: Element, L: Label>(
        &self,
        shape: BatchShape,
        logits: &mut [T],
        labels: &[L],
        state: &ForwardState,
        grad_loss: f32,
    ) -> Result<()>;
}

/// Runs every check of a forward that needs no logits value: the config, dims, buffer
/// lengths, label range and finite reference log-probs.
pub(crate) fn validate_forward<T: Element, L: Label>(
    batch: &Batch<'_, T, L>,
    config: &DpoConfig,
) -> Result<()> {
    config.validate()?;
    crate::batch::validate_labels_and_lengths(
        &batch.shape,
        batch.logits.len(),
        batch.labels,
        batch.reference_logps,
        config.ignore_index,
    )
}

/// Checks a backward call against its forward state: same shape, buffer lengths, labels in
/// range and a finite upstream gradient.
pub(crate) fn validate_backward<L: Label>(
    shape: &BatchShape,
    logits_len: usize,
    labels: &[L],
    state: &ForwardState,
    grad_loss: f32,
    grad_len: Option<usize>,
) -> Result<()> {
    state.check_shape(shape)?;
    let dims = [shape.sequences(), shape.seq_len, shape.row_stride];
    check_len("policy_logits", logits_len, &dims)?;
    check_len("labels", labels.len(), &dims[..2])?;
    if let Some(len) = grad_len {
        check_len("policy_logits_grad", len, &dims)?;
    }
    crate::batch::check_labels(shape, labels, state.config.ignore_index)?;
    state.check_reusable(labels)?;
    if !grad_loss.is_finite() {
        return Err(Error::InvalidParameter {
            name: "grad_loss",
            value: crate::config::as_written(grad_loss),
            expected: "a finite upstream gradient of the loss (1.0 for a plain loss.backward())",
        });
    }
    Ok(())
}

/// Checks that every row scale `grad_loss * c[r]` is finite in f32, as the backward forms it.
/// An infinite scale would write inf, and `inf * 0 = NaN` where a softmax term is 0. It is
/// infinite when the product overflows, or when `c[r]` is (IPO at a margin of +-inf).
pub(crate) fn check_gradient_scale(grad_loss: f32, seq_coef: &[f32]) -> Result<()> {
    let Some(r) = seq_coef.iter().position(|&c| !(grad_loss * c).is_finite()) else {
        return Ok(());
    };
    let coef = seq_coef[r];
    let detail = if coef.is_finite() {
        format!(
            "grad_loss = {grad_loss:?} times d loss / d logp = {coef:?} is beyond the f32 \
             range; pass a smaller grad_loss"
        )
    } else {
        "d loss / d logp is infinite, because the IPO loss has no finite gradient at a margin \
         of +-inf (a log-prob of -inf); mask the positions whose target logit is -inf"
            .to_string()
    };
    Err(Error::NonFiniteOutput {
        output: format!("gradient scale of sequence {r}"),
        value: grad_loss as f64 * coef as f64,
        detail,
    })
}
