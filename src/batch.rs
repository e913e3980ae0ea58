//! Batch shapes, borrowed views over a trainer's buffers, and the input checks every backend
//! runs before any work.

use crate::dtype::{Element, Label};
use crate::error::{Error, Result};

/// Dimensions of a padded DPO batch: `2 * pairs` rows of `seq_len` positions, each position a
/// logits row of `row_stride` elements whose first `vocab` columns are real.
///
/// Rows `0..pairs` are the chosen responses and rows `pairs..2*pairs` the rejected responses of
/// the same pairs, so pair `i` is rows `i` and `pairs + i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    /// Number of preference pairs B (the batch has 2B sequences).
    pub pairs: usize,
    /// Positions per sequence T.
    pub seq_len: usize,
    /// True vocabulary size V; columns `V..W` are padding and take no part in any softmax.
    pub vocab: usize,
    /// Row stride W >= V of the logits, in elements.
    pub row_stride: usize,
}

impl BatchShape {
    /// Builds a shape from the logits dims `[rows, seq_len, row_stride]` and the vocabulary size,
    /// checking that the batch is non-empty, the row count even and `1 <= vocab <= row_stride`.
    pub fn from_dims(rows: usize, seq_len: usize, row_stride: usize, vocab: usize) -> Result<Self> {
        if rows == 0 {
            return Err(Error::EmptyBatch {
                tensor: "policy_logits",
                shape: vec![rows, seq_len, row_stride],
            });
        }
        if !rows.is_multiple_of(2) {
            return Err(Error::OddRowCount {
                tensor: "policy_logits",
                rows,
            });
        }
        let shape = BatchShape {
            pairs: rows / 2,
            seq_len,
            vocab,
            row_stride,
        };
        shape.validate()?;
        Ok(shape)
    }

    /// Returns the number of sequences 2B.
    ///
    /// This count and the two below saturate at `usize::MAX` instead of overflowing. A shape
    /// whose counts do not fit fails [`BatchShape::validate`] with [`Error::ShapeOverflow`].
    pub fn sequences(&self) -> usize {
        self.pairs.saturating_mul(2)
    }

    /// Returns the number of logits rows 2B * T (one per position).
    pub fn positions(&self) -> usize {
        self.sequences().saturating_mul(self.seq_len)
    }

    /// Returns the number of logits elements 2B * T * W.
    pub fn logits_len(&self) -> usize {
        self.positions().saturating_mul(self.row_stride)
    }

    /// Returns 2B * T * W, or `None` when a product overflows `usize`.
    fn checked_logits_len(&self) -> Option<usize> {
        self.pairs
            .checked_mul(2)?
            .checked_mul(self.seq_len)?
            .checked_mul(self.row_stride)
    }

    /// Checks the dims on their own: B >= 1, `1 <= V <= W` and an element count 2B * T * W
    /// that fits in `usize`.
    pub fn validate(&self) -> Result<()> {
        if self.checked_logits_len().is_none() {
            return Err(Error::ShapeOverflow {
                pairs: self.pairs,
                seq_len: self.seq_len,
                row_stride: self.row_stride,
            });
        }
        if self.pairs == 0 {
            return Err(Error::EmptyBatch {
                tensor: "policy_logits",
                shape: vec![0, self.seq_len, self.row_stride],
            });
        }
        if self.vocab == 0 || self.vocab > self.row_stride {
            return Err(Error::InvalidVocab {
                vocab: self.vocab,
                row_stride: self.row_stride,
            });
        }
        Ok(())
    }
}

/// A borrowed padded batch: the logits, the labels aligned with them and the optional
/// reference log-probs, all host memory in row-major order.
///
/// Build it with [`Batch::new`]. The struct is `non_exhaustive` so that a packed layout
/// (sequences as ranges of one flat token array, no padding) can arrive as another constructor
/// and an optional field without breaking callers or the [`crate::Backend`] signatures.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Batch<'a, T: Element, L: Label> {
    /// Dimensions.
    pub shape: BatchShape,
    /// Policy logits `[2B, T, W]`; `logits[r, t, :]` predicts `labels[r, t]`.
    pub logits: &'a [T],
    /// Target labels `[2B, T]`; `ignore_index` masks a position out.
    pub labels: &'a [L],
    /// Reference sequence log-probs `[2B]`; `None` means reference-free (all 0).
    pub reference_logps: Option<&'a [f32]>,
}

impl<'a, T: Element, L: Label> Batch<'a, T, L> {
    /// Bundles the buffers with their shape. Nothing is checked until a backend runs.
    pub fn new(
        shape: BatchShape,
        logits: &'a [T],
        labels: &'a [L],
        reference_logps: Option<&'a [f32]>,
    ) -> Self {
        Batch {
            shape,
            logits,
            labels,
            reference_logps,
        }
    }
}

/// Checks buffer lengths against the shape. An expected length that overflows `usize` matches
/// no buffer.
pub(crate) fn check_len(tensor: &'static str, len: usize, expected: &[usize]) -> Result<()> {
    let want = expected
        .iter()
        .try_fold(1usize, |acc, &dim| acc.checked_mul(dim));
    if want != Some(len) {
        return Err(Error::ShapeMismatch {
            tensor,
            got: vec![len],
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

/// Runs every check that needs no logits value: dims, buffer lengths, label range and finite
/// reference log-probs. Non-finite logits are caught by the forward pass, which reads every
/// valid row anyway, before anything is written.
pub(crate) fn validate_labels_and_lengths<L: Label>(
    shape: &BatchShape,
    logits_len: usize,
    labels: &[L],
    reference_logps: Option<&[f32]>,
    ignore_index: i64,
) -> Result<()> {
    shape.validate()?;
    let (rows, t, w) = (shape.sequences(), shape.seq_len, shape.row_stride);
    check_len("policy_logits", logits_len, &[rows, t, w])?;
    check_len("labels", labels.len(), &[rows, t])?;
    if let Some(reference) = reference_logps {
        check_len("reference_logps", reference.len(), &[rows])?;
        if let Some((index, &value)) = reference.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFiniteReference { index, value });
        }
    }
    check_labels(shape, labels, ignore_index)
}

/// Checks that every label is ignore_index or in `[0, V)`, and names the first that is not.
pub(crate) fn check_labels<L: Label>(
    shape: &BatchShape,
    labels: &[L],
    ignore_index: i64,
) -> Result<()> {
    let vocab = shape.vocab as i64;
    let bad = labels.iter().position(|&y| {
        let y = y.to_i64();
        y != ignore_index && !(0..vocab).contains(&y)
    });
    match bad {
        None => Ok(()),
        Some(index) => Err(Error::InvalidLabel {
            row: index / shape.seq_len,
            position: index % shape.seq_len,
            label: labels[index].to_i64(),
            vocab: shape.vocab,
            ignore_index,
        }),
    }
}

/// Scalar metrics a DPO trainer logs, averaged over the pairs of the batch. The names in
/// [`Metrics::named`] are TRL's.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Mean of `beta * (logp[i] - ref[i])` over chosen rows.
    pub rewards_chosen: f32,
    /// Mean of `beta * (logp[B+i] - ref[B+i])` over rejected rows.
    pub rewards_rejected: f32,
    /// Fraction of pairs whose chosen reward is strictly greater than the rejected one.
    pub rewards_accuracy: f32,
    /// Mean of chosen minus rejected reward.
    pub rewards_margin: f32,
    /// Mean chosen sequence log-prob.
    pub logps_chosen: f32,
    /// Mean rejected sequence log-prob.
    pub logps_rejected: f32,
    /// Mean logit over the real columns of every valid chosen position (0 if none is valid).
    pub logits_chosen: f32,
    /// Mean logit over the real columns of every valid rejected position (0 if none is valid).
    pub logits_rejected: f32,
}

impl Metrics {
    /// Returns `(name, value)` pairs with TRL's metric names, in a fixed order.
    pub fn named(&self) -> [(&'static str, f32); 8] {
        [
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracy),
            ("rewards/margins", self.rewards_margin),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
            ("logits/chosen", self.logits_chosen),
            ("logits/rejected", self.logits_rejected),
        ]
    }
}
