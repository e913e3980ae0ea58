//! The CPU backend: rayon over logits rows, f64 per-sequence sums in index order, so results
//! are bit-identical whatever the thread count.

mod dpo;
mod token_logps;

use rayon::prelude::*;

use crate::backend::{check_gradient_scale, validate_backward, validate_forward, Backend};
use crate::batch::{Batch, BatchShape};
use crate::config::DpoConfig;
use crate::dtype::{Element, Label};
use crate::error::{Error, Result};
use crate::output::{labels_digest, DpoOutput, ForwardState, HostSaved, Saved};
use crate::pairs::round_pair_values;

pub(crate) use dpo::{pair_step, SequenceSums};
pub(crate) use token_logps::RowFault;
use token_logps::{row_backward, row_backward_in_place, row_forward, RowStats};

/// Rows handed to one rayon task at minimum; small vocabularies would otherwise spend more on
/// scheduling than on the row.
const MIN_ROWS_PER_TASK: usize = 8;

/// The rayon CPU backend. It uses the global rayon pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    /// Returns the CPU backend.
    pub fn new() -> Self {
        Cpu
    }
}

/// Returns the target column of a position, or `None` when the position is masked. Labels
/// were range-checked before this is called.
#[inline]
fn target_of<L: Label>(label: L, ignore_index: i64) -> Option<usize> {
    let y = label.to_i64();
    (y != ignore_index).then_some(y as usize)
}

impl Backend for Cpu {
    fn name(&self) -> String {
        "cpu".to_string()
    }

    fn forward<T: Element, L: Label>(
        &self,
        batch: &Batch<'_, T, L>,
        config: &DpoConfig,
    ) -> Result<DpoOutput> {
        let shape = batch.shape;
        validate_forward(batch, config)?;
        let (t, v, w) = (shape.seq_len, shape.vocab, shape.row_stride);

        // 1. One pass over each valid row; masked rows are never read.
        let rows: Vec<Option<Result<RowStats, token_logps::RowFault>>> = (0..shape.positions())
            .into_par_iter()
            .with_min_len(MIN_ROWS_PER_TASK)
            .map(|p| {
                let target = target_of(batch.labels[p], config.ignore_index)?;
                let start = p * w;
                Some(row_forward(&batch.logits[start..start + v], target))
            })
            .collect();

        // 2. The first faulty row in index order is the one reported, whatever the threads.
        if let Some((p, fault)) = rows.iter().enumerate().find_map(|(p, row)| match row {
            Some(Err(fault)) => Some((p, *fault)),
            _ => None,
        }) {
            return Err(Error::NonFiniteLogit {
                row: p / t,
                position: p % t,
                detail: fault.describe(),
            });
        }

        // 3. Masked sums per sequence, in position order.
        let sequences = shape.sequences();
        let mut sums = SequenceSums {
            logp: vec![0.0; sequences],
            logit_sum: vec![0.0; sequences],
            valid: vec![0; sequences],
        };
        let mut saved = HostSaved {
            row_max: vec![0.0; shape.positions()],
            row_log_sum: vec![0.0; shape.positions()],
            seq_coef: Vec::new(),
        };
        for (p, row) in rows.iter().enumerate() {
            if let Some(Ok(stats)) = row {
                let r = p / t;
                sums.logp[r] += stats.logp;
                sums.logit_sum[r] += stats.logit_sum;
                sums.valid[r] += 1;
                saved.row_max[p] = stats.max;
                saved.row_log_sum[p] = stats.log_sum;
            }
        }

        // 4. Losses, rewards, metrics and c[r].
        let (values, seq_coef) = pair_step(&shape, config, &sums, batch.reference_logps);
        let step = round_pair_values(&values, config)?;
        saved.seq_coef = seq_coef;
        Ok(DpoOutput {
            loss: step.loss,
            losses: step.losses,
            chosen_logps: step.chosen_logps,
            rejected_logps: step.rejected_logps,
            chosen_rewards: step.chosen_rewards,
            rejected_rewards: step.rejected_rewards,
            dloss_dmargin: step.dloss_dmargin,
            metrics: step.metrics,
            state: ForwardState::new(
                shape,
                *config,
                Saved::Host(saved),
                Some(labels_digest(batch.labels)),
            ),
        })
    }

    fn backward<T: Element, L: Label, G: Element>(
        &self,
        batch: &Batch<'_, T, L>,
        state: &ForwardState,
        grad_loss: f32,
        grad: &mut [G],
    ) -> Result<()> {
        let shape = batch.shape;
        validate_backward(
            &shape,
            batch.logits.len(),
            batch.labels,
            state,
            grad_loss,
            Some(grad.len()),
        )?;
        let saved = host_saved(state)?;
        check_gradient_scale(grad_loss, &saved.seq_coef)?;
        let (t, v, w) = (shape.seq_len, shape.vocab, shape.row_stride);
        let ignore_index = state.config.ignore_index;
        grad.par_chunks_mut(w)
            .with_min_len(MIN_ROWS_PER_TASK)
            .enumerate()
            .for_each(|(p, g)| match target_of(batch.labels[p], ignore_index) {
                None => g.fill(G::default()),
                Some(target) => {
                    let x = &batch.logits[p * w..p * w + v];
                    let stats = (saved.row_max[p], saved.row_log_sum[p]);
                    let coef = grad_loss * saved.seq_coef[p / t];
                    row_backward(x, g, target, stats, coef);
                }
            });
        Ok(())
    }

    fn backward_in_place<T: Element, L: Label>(
        &self,
        shape: BatchShape,
        logits: &mut [T],
        labels: &[L],
        state: &ForwardState,
        grad_loss: f32,
    ) -> Result<()> {
        validate_backward(&shape, logits.len(), labels, state, grad_loss, None)?;
        let saved = host_saved(state)?;
        check_gradient_scale(grad_loss, &saved.seq_coef)?;
        let (t, v, w) = (shape.seq_len, shape.vocab, shape.row_stride);
        let ignore_index = state.config.ignore_index;
        logits
            .par_chunks_mut(w)
            .with_min_len(MIN_ROWS_PER_TASK)
            .enumerate()
            .for_each(|(p, row)| match target_of(labels[p], ignore_index) {
                None => row.fill(T::default()),
                Some(target) => {
                    let stats = (saved.row_max[p], saved.row_log_sum[p]);
                    let coef = grad_loss * saved.seq_coef[p / t];
                    row_backward_in_place(row, v, target, stats, coef);
                }
            });
        state.mark_consumed_in_place();
        Ok(())
    }
}

/// Returns the host state, or an error when the forward ran on another backend.
fn host_saved(state: &ForwardState) -> Result<&HostSaved> {
    match &state.saved {
        Saved::Host(saved) => Ok(saved),
        Saved::Cuda(_) => Err(Error::StateMismatch {
            detail: "the forward ran on CUDA and the backward on the CPU; use one backend for \
                     both"
                .to_string(),
        }),
    }
}
