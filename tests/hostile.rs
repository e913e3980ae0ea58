//! Hostile inputs to the library: extreme dims, labels, parameters and logits. Each case
//! either returns its typed error with a message that names the value, or returns outputs
//! that are finite or exactly the documented infinity, never NaN.

mod common;

use common::{backends, for_each_dtype, Inputs, RawBatch, Rng, Spec, TestFloat, TestLabel};
use dpo_kernels::{Batch, BatchShape, DpoConfig, DpoLoss, DpoOutput, Error, LossKind};

/// Unwraps the error of `result`, panicking with `context` when the call succeeded.
fn expect_err<R>(context: &str, result: dpo_kernels::Result<R>) -> Error {
    match result {
        Ok(_) => panic!("{context}: succeeded, expected an error"),
        Err(err) => err,
    }
}

/// Checks that the error message contains every one of `parts`.
fn assert_message(context: &str, err: &Error, parts: &[&str]) {
    let message = err.to_string();
    for part in parts {
        assert!(
            message.contains(part),
            "{context}: message {message:?} does not contain {part:?}"
        );
    }
}

#[test]
fn shape_overflow_is_an_error() {
    let err = expect_err("T = usize::MAX", BatchShape::from_dims(2, usize::MAX, 2, 2));
    assert!(
        matches!(
            err,
            Error::ShapeOverflow {
                pairs: 1,
                seq_len: usize::MAX,
                row_stride: 2
            }
        ),
        "{err:?}"
    );
    assert_message(
        "T = usize::MAX",
        &err,
        &["B = 1", &format!("T = {}", usize::MAX), "W = 2"],
    );

    // 2 * 2^62 * 2 * 2 = 2^66 wraps to 0, which empty buffers would match if the product
    // wrapped instead of failing.
    let wraps_to_zero = BatchShape {
        pairs: 1 << 62,
        seq_len: 2,
        vocab: 2,
        row_stride: 2,
    };
    let saturated = BatchShape {
        pairs: usize::MAX,
        seq_len: 1,
        vocab: 1,
        row_stride: 1,
    };
    assert_eq!(saturated.sequences(), usize::MAX);
    assert_eq!(saturated.logits_len(), usize::MAX);
    assert_eq!(wraps_to_zero.logits_len(), usize::MAX);
    for shape in [wraps_to_zero, saturated] {
        let logits: Vec<f32> = Vec::new();
        let labels: Vec<i64> = Vec::new();
        let batch = Batch::new(shape, &logits, &labels, None);
        for backend in backends() {
            let context = format!("{}: {shape:?}", backend.name);
            let dpo = backend.open(DpoConfig::new(0.1));
            let err = expect_err(&context, dpo.forward(&batch));
            assert!(
                matches!(err, Error::ShapeOverflow { .. }),
                "{context}: {err:?}"
            );
        }
    }
}

/// Runs the forward and, when it succeeds, the backward with `grad_loss` into an f32 buffer.
fn forward_backward<T: TestFloat, L: TestLabel>(
    dpo: &DpoLoss,
    raw: &RawBatch,
    grad_loss: f32,
) -> dpo_kernels::Result<(DpoOutput, Vec<f32>)> {
    let inputs = Inputs::<T>::round(raw);
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    let out = dpo.forward(&batch)?;
    let mut grad = vec![f32::NAN; inputs.logits.len()];
    dpo.backward(&batch, &out.state, grad_loss, &mut grad)?;
    Ok((out, grad))
}

/// One pair of T = 2 positions over V = 4, nothing masked, with the target logit of position 0
/// set to -inf in each of `rows`, so those sequences have log-prob -inf (probability 0).
fn neg_inf_targets(rows: &[usize]) -> RawBatch {
    let mut rng = Rng::new(71);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(1, 2, 4).masked(0.0));
    for &row in rows {
        let target = raw.labels[raw.position(row, 0)] as usize;
        raw.row_mut(row, 0)[target] = f32::NEG_INFINITY;
    }
    raw
}

fn rejected_neg_inf<T: TestFloat, L: TestLabel>() {
    // z = +inf. Every loss has a finite limit or an exact infinity there and a finite
    // derivative; plain DPO gives 0, as -log sigmoid(+inf) = 0.
    let raw = neg_inf_targets(&[1]);
    let beta = 0.1f32;
    let cases: [(LossKind, f32, f32); 5] = [
        (
            LossKind::Sigmoid {
                label_smoothing: 0.0,
            },
            0.0,
            0.0,
        ),
        (
            LossKind::Robust {
                label_smoothing: 0.0,
            },
            0.0,
            0.0,
        ),
        (LossKind::Hinge, 0.0, 0.0),
        (
            LossKind::Sigmoid {
                label_smoothing: 0.25,
            },
            f32::INFINITY,
            beta * 0.25,
        ),
        (
            LossKind::Robust {
                label_smoothing: 0.25,
            },
            f32::NEG_INFINITY,
            -beta * 0.25 / 0.5,
        ),
    ];
    for backend in backends() {
        for (loss, want_loss, want_dz) in cases {
            let context = format!("{}/{}/{}: {loss:?}", backend.name, T::NAME, L::NAME);
            let mut config = DpoConfig::new(beta);
            config.loss = loss;
            let dpo = backend.open(config);
            let (out, grad) = forward_backward::<T, L>(&dpo, &raw, 1.0)
                .unwrap_or_else(|err| panic!("{context}: {err}"));
            assert_eq!(out.rejected_logps[0], f32::NEG_INFINITY, "{context}");
            assert!(out.chosen_logps[0].is_finite(), "{context}");
            assert_eq!(out.losses[0], want_loss, "{context}: losses[0]");
            assert_eq!(out.loss, want_loss, "{context}: loss");
            assert!(
                (out.dloss_dmargin[0] - want_dz).abs() <= 1e-7,
                "{context}: dloss_dmargin {} expected {want_dz}",
                out.dloss_dmargin[0]
            );
            assert!(
                grad.iter().all(|g| g.is_finite()),
                "{context}: gradient {grad:?}"
            );
        }
    }
}

#[test]
fn rejected_log_prob_neg_inf() {
    for_each_dtype!(rejected_neg_inf());
}

fn chosen_neg_inf<T: TestFloat, L: TestLabel>() {
    // z = -inf: -log p with p = 0 is +inf for every loss, and the derivative stays finite
    // (-beta for plain DPO), so the gradient is finite.
    let raw = neg_inf_targets(&[0]);
    let beta = 0.1f32;
    let cases: [(LossKind, f32); 4] = [
        (
            LossKind::Sigmoid {
                label_smoothing: 0.0,
            },
            -beta,
        ),
        (
            LossKind::Sigmoid {
                label_smoothing: 0.5,
            },
            -beta * 0.5,
        ),
        (
            LossKind::Robust {
                label_smoothing: 0.25,
            },
            -beta * 0.75 / 0.5,
        ),
        (LossKind::Hinge, -beta),
    ];
    for backend in backends() {
        for (loss, want_dz) in cases {
            let context = format!("{}/{}/{}: {loss:?}", backend.name, T::NAME, L::NAME);
            let mut config = DpoConfig::new(beta);
            config.loss = loss;
            let dpo = backend.open(config);
            let (out, grad) = forward_backward::<T, L>(&dpo, &raw, 1.0)
                .unwrap_or_else(|err| panic!("{context}: {err}"));
            assert_eq!(out.chosen_logps[0], f32::NEG_INFINITY, "{context}");
            assert_eq!(out.loss, f32::INFINITY, "{context}: loss");
            assert_eq!(out.metrics.rewards_chosen, f32::NEG_INFINITY, "{context}");
            assert_eq!(out.metrics.rewards_margin, f32::NEG_INFINITY, "{context}");
            assert!(
                (out.dloss_dmargin[0] - want_dz).abs() <= 1e-7,
                "{context}: dloss_dmargin {} expected {want_dz}",
                out.dloss_dmargin[0]
            );
            assert!(
                grad.iter().all(|g| g.is_finite()),
                "{context}: gradient {grad:?}"
            );
        }
    }
}

#[test]
fn chosen_log_prob_neg_inf() {
    for_each_dtype!(chosen_neg_inf());
}
