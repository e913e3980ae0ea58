//! Every invalid input returns its typed error with a message that names the value, on every
//! backend and dtype, and a failed call writes nothing a caller owns.

mod common;

use common::{backends, for_each_dtype, Inputs, RawBatch, Rng, Spec, TestFloat, TestLabel};
use dpo_kernels::{Batch, BatchShape, DpoConfig, Error, LossKind};

/// B = 2 pairs, T = 3 positions, V = 5 real columns in rows of W = 6, nothing masked.
fn small_batch() -> RawBatch {
    let mut rng = Rng::new(40);
    RawBatch::random(&mut rng, &Spec::new(2, 3, 5).stride(6).masked(0.0))
}

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

fn logits_length<T: TestFloat, L: TestLabel>() {
    let inputs = Inputs::<T>::round(&small_batch());
    let labels = inputs.labels_as::<L>();
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        for len in [0, 71, 73] {
            let mut logits = inputs.logits.clone();
            logits.resize(len, T::round(0.0));
            let batch = Batch::new(inputs.shape, &logits, &labels, inputs.reference.as_deref());
            let context = format!("{}/{}: logits of length {len}", backend.name, T::NAME);
            let err = expect_err(&context, dpo.forward(&batch));
            assert!(
                matches!(&err, Error::ShapeMismatch { tensor: "policy_logits", got, expected }
                    if *got == [len] && *expected == [4, 3, 6]),
                "{context}: {err:?}"
            );
            assert_message(
                &context,
                &err,
                &["policy_logits", &format!("[{len}]"), "[4, 3, 6]"],
            );
        }
    }
}

#[test]
fn logits_length_mismatch() {
    for_each_dtype!(logits_length());
}

fn labels_length<T: TestFloat, L: TestLabel>() {
    let inputs = Inputs::<T>::round(&small_batch());
    let labels = inputs.labels_as::<L>();
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        for len in [11, 13] {
            let mut short = labels.clone();
            short.resize(len, L::from_i64(0));
            let batch = Batch::new(inputs.shape, &inputs.logits, &short, None);
            let context = format!("{}/{}: labels of length {len}", backend.name, T::NAME);
            let err = expect_err(&context, dpo.forward(&batch));
            assert!(
                matches!(&err, Error::ShapeMismatch { tensor: "labels", got, expected }
                    if *got == [len] && *expected == [4, 3]),
                "{context}: {err:?}"
            );
            assert_message(&context, &err, &["labels", &format!("[{len}]"), "[4, 3]"]);
        }
    }
}

#[test]
fn labels_length_mismatch() {
    for_each_dtype!(labels_length());
}

fn reference_length<T: TestFloat, L: TestLabel>() {
    let inputs = Inputs::<T>::round(&small_batch());
    let labels = inputs.labels_as::<L>();
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        for reference in [vec![-1.0f32; 2], vec![-1.0; 5]] {
            let batch = Batch::new(inputs.shape, &inputs.logits, &labels, Some(&reference));
            let context = format!(
                "{}: reference_logps of length {}",
                backend.name,
                reference.len()
            );
            let err = expect_err(&context, dpo.forward(&batch));
            assert!(
                matches!(&err, Error::ShapeMismatch { tensor: "reference_logps", got, expected }
                    if *got == [reference.len()] && *expected == [4]),
                "{context}: {err:?}"
            );
            assert_message(&context, &err, &["reference_logps", "[4]"]);
        }
    }
}

#[test]
fn reference_length_mismatch() {
    for_each_dtype!(reference_length());
}

#[test]
fn odd_row_count() {
    let err = expect_err("3 rows", BatchShape::from_dims(3, 2, 5, 5));
    assert!(matches!(err, Error::OddRowCount { rows: 3, .. }), "{err:?}");
    assert_message("3 rows", &err, &["policy_logits", "3 rows"]);
}

fn empty<T: TestFloat, L: TestLabel>() {
    let err = expect_err("0 rows", BatchShape::from_dims(0, 3, 4, 4));
    assert!(matches!(err, Error::EmptyBatch { .. }), "{err:?}");
    assert_message("0 rows", &err, &["empty batch", "[0, 3, 4]"]);

    // A shape built by hand skips from_dims; the backend must still reject it.
    let shape = BatchShape {
        pairs: 0,
        seq_len: 3,
        vocab: 4,
        row_stride: 4,
    };
    let logits: Vec<T> = Vec::new();
    let labels: Vec<L> = Vec::new();
    for backend in backends() {
        let context = format!("{}/{}: zero pairs", backend.name, T::NAME);
        let dpo = backend.open(DpoConfig::new(0.1));
        let err = expect_err(
            &context,
            dpo.forward(&Batch::new(shape, &logits, &labels, None)),
        );
        assert!(
            matches!(err, Error::EmptyBatch { .. }),
            "{context}: {err:?}"
        );
    }
}

#[test]
fn empty_batch() {
    for_each_dtype!(empty());
}

fn label_out_of_range<T: TestFloat, L: TestLabel>() {
    // Negative, equal to V (a padded column exists there), far too large, and -100 when the
    // ignore_index is -1.
    for (ignore_index, label) in [(-100, -5), (-100, 5), (-100, 1000), (-1, -100)] {
        let mut raw = small_batch();
        let p = raw.position(3, 1);
        raw.labels[p] = label;
        let inputs = Inputs::<T>::round(&raw);
        let labels = inputs.labels_as::<L>();
        let batch = Batch::new(inputs.shape, &inputs.logits, &labels, None);
        let mut config = DpoConfig::new(0.1);
        config.ignore_index = ignore_index;
        for backend in backends() {
            let context = format!("{}/{}/{}: label {label}", backend.name, T::NAME, L::NAME);
            let err = expect_err(&context, backend.open(config).forward(&batch));
            assert!(
                matches!(err, Error::InvalidLabel { row: 3, position: 1, label: l, vocab: 5, ignore_index: i }
                    if l == label && i == ignore_index),
                "{context}: {err:?}"
            );
            assert_message(
                &context,
                &err,
                &[
                    &format!("label {label}"),
                    "[0, 5)",
                    &format!("ignore_index {ignore_index}"),
                    "row 3",
                    "position 1",
                ],
            );
        }
    }
}

#[test]
fn label_outside_vocab() {
    for_each_dtype!(label_out_of_range());
}

fn non_finite_logit<T: TestFloat, L: TestLabel>() {
    type Poison = fn(&mut [f32]);
    let cases: [(&str, Poison, &str); 3] = [
        ("NaN", |x| x[3] = f32::NAN, "NaN at vocabulary column 3"),
        (
            "+inf",
            |x| x[4] = f32::INFINITY,
            "+inf at vocabulary column 4",
        ),
        (
            "all -inf",
            |x| x[..5].fill(f32::NEG_INFINITY),
            "-inf in every vocabulary column",
        ),
    ];
    for (kind, poison, detail) in cases {
        let mut raw = small_batch();
        poison(raw.row_mut(2, 1));
        // The padded column is finite, so a kernel that counts it as real finds a finite row.
        raw.row_mut(2, 1)[5] = 3.0;
        // A second bad position later in the batch: the first in index order is reported.
        poison(raw.row_mut(3, 2));
        let inputs = Inputs::<T>::round(&raw);
        let labels = inputs.labels_as::<L>();
        let batch = Batch::new(
            inputs.shape,
            &inputs.logits,
            &labels,
            inputs.reference.as_deref(),
        );
        for backend in backends() {
            let context = format!("{}/{}: {kind} logit", backend.name, T::NAME);
            let err = expect_err(&context, backend.open(DpoConfig::new(0.1)).forward(&batch));
            assert!(
                matches!(
                    err,
                    Error::NonFiniteLogit {
                        row: 2,
                        position: 1,
                        ..
                    }
                ),
                "{context}: {err:?}"
            );
            assert_message(&context, &err, &["row 2", "position 1", detail]);
        }
    }
}

#[test]
fn non_finite_logit_at_valid_position() {
    for_each_dtype!(non_finite_logit());
}

fn non_finite_masked<T: TestFloat, L: TestLabel>() {
    let mut raw = small_batch();
    let p = raw.position(1, 2);
    raw.labels[p] = -100;
    raw.row_mut(1, 2).fill(f32::NAN);
    raw.row_mut(1, 2)[0] = f32::INFINITY;
    let inputs = Inputs::<T>::round(&raw);
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        let out = dpo.forward(&batch).unwrap_or_else(|err| {
            panic!(
                "{}/{}: NaN at a masked position: {err}",
                backend.name,
                T::NAME
            )
        });
        assert!(out.loss.is_finite(), "{}: loss {}", backend.name, out.loss);
    }
}

#[test]
fn non_finite_logit_at_masked_position_is_accepted() {
    for_each_dtype!(non_finite_masked());
}

fn non_finite_reference<T: TestFloat, L: TestLabel>() {
    let inputs = Inputs::<T>::round(&small_batch());
    let labels = inputs.labels_as::<L>();
    for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let reference = vec![-3.0, -4.0, value, -5.0];
        let batch = Batch::new(inputs.shape, &inputs.logits, &labels, Some(&reference));
        for backend in backends() {
            let context = format!("{}: reference {value}", backend.name);
            let err = expect_err(&context, backend.open(DpoConfig::new(0.1)).forward(&batch));
            assert!(
                matches!(err, Error::NonFiniteReference { index: 2, value: v } if v.to_bits() == value.to_bits()),
                "{context}: {err:?}"
            );
            assert_message(&context, &err, &["reference_logps[2]", &value.to_string()]);
        }
    }
}

#[test]
fn non_finite_reference_rejected() {
    for_each_dtype!(non_finite_reference());
}

#[test]
fn invalid_beta() {
    for beta in [0.0, -0.1, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for backend in backends() {
            let context = format!("{}: beta {beta}", backend.name);
            let err = expect_err(&context, backend.try_open(DpoConfig::new(beta)));
            assert!(
                matches!(err, Error::InvalidParameter { name: "beta", value, .. }
                    if (value as f32).to_bits() == beta.to_bits()),
                "{context}: {err:?}"
            );
            assert_message(&context, &err, &[&format!("beta = {beta}:"), "> 0"]);
        }
    }
}

#[test]
fn invalid_label_smoothing() {
    let cases = [
        LossKind::Sigmoid {
            label_smoothing: -0.1,
        },
        LossKind::Sigmoid {
            label_smoothing: 0.6,
        },
        LossKind::Sigmoid {
            label_smoothing: f32::NAN,
        },
        LossKind::Robust {
            label_smoothing: 0.5,
        },
        LossKind::Robust {
            label_smoothing: -0.01,
        },
    ];
    for loss in cases {
        let mut config = DpoConfig::new(0.1);
        config.loss = loss;
        for backend in backends() {
            let context = format!("{}: {loss:?}", backend.name);
            let err = expect_err(&context, backend.try_open(config));
            assert!(
                matches!(
                    err,
                    Error::InvalidParameter {
                        name: "label_smoothing",
                        ..
                    }
                ),
                "{context}: {err:?}"
            );
            let eps = loss.label_smoothing();
            assert_message(
                &context,
                &err,
                &[&format!("label_smoothing = {eps}:"), "[0, 0.5"],
            );
        }
    }
}

fn invalid_vocab<T: TestFloat, L: TestLabel>() {
    for (vocab, stride) in [(0, 5), (6, 5)] {
        let context = format!("V = {vocab}, W = {stride}");
        let err = expect_err(&context, BatchShape::from_dims(2, 3, stride, vocab));
        assert!(
            matches!(err, Error::InvalidVocab { vocab: v, row_stride: w } if v == vocab && w == stride),
            "{context}: {err:?}"
        );
        assert_message(
            &context,
            &err,
            &[
                &format!("vocabulary size {vocab}"),
                &format!("[1, {stride}]"),
            ],
        );

        let shape = BatchShape {
            pairs: 1,
            seq_len: 3,
            vocab,
            row_stride: stride,
        };
        let logits = vec![T::round(0.5); shape.logits_len()];
        let labels = vec![L::from_i64(-100); shape.positions()];
        for backend in backends() {
            let context = format!("{}/{}: {context}", backend.name, T::NAME);
            let dpo = backend.open(DpoConfig::new(0.1));
            let err = expect_err(
                &context,
                dpo.forward(&Batch::new(shape, &logits, &labels, None)),
            );
            assert!(
                matches!(err, Error::InvalidVocab { .. }),
                "{context}: {err:?}"
            );
        }
    }
}

#[test]
fn vocab_zero_or_above_stride() {
    for_each_dtype!(invalid_vocab());
}

fn grad_buffer_length<T: TestFloat, L: TestLabel>() {
    let inputs = Inputs::<T>::round(&small_batch());
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        let out = dpo.forward(&batch).expect("forward");
        for len in [0, 71, 73] {
            let context = format!("{}/{}: grad of length {len}", backend.name, T::NAME);
            let mut grad = vec![T::round(7.0); len];
            let err = expect_err(&context, dpo.backward(&batch, &out.state, 1.0, &mut grad));
            assert!(
                matches!(&err, Error::ShapeMismatch { tensor: "policy_logits_grad", got, expected }
                    if *got == [len] && *expected == [4, 3, 6]),
                "{context}: {err:?}"
            );
            assert_message(&context, &err, &["policy_logits_grad", &format!("[{len}]")]);
            assert!(
                grad.iter().all(|g| g.widen() == 7.0),
                "{context}: the buffer was written"
            );

            // The fused call checks the same buffer.
            let err = expect_err(&context, dpo.forward_backward(&batch, &mut grad));
            assert!(
                matches!(&err, Error::ShapeMismatch { tensor: "policy_logits_grad", got, expected }
                    if *got == [len] && *expected == [4, 3, 6]),
                "{context}: forward_backward: {err:?}"
            );
            assert!(
                grad.iter().all(|g| g.widen() == 7.0),
                "{context}: forward_backward wrote the buffer"
            );
        }
    }
}

#[test]
fn grad_buffer_wrong_length() {
    for_each_dtype!(grad_buffer_length());
}

fn state_from_other_shape<T: TestFloat, L: TestLabel>() {
    let small = Inputs::<T>::round(&small_batch());
    let mut rng = Rng::new(41);
    let other = Inputs::<T>::round(&RawBatch::random(&mut rng, &Spec::new(2, 3, 6).masked(0.0)));
    let small_labels = small.labels_as::<L>();
    let other_labels = other.labels_as::<L>();
    let small_batch = Batch::new(small.shape, &small.logits, &small_labels, None);
    let other_batch = Batch::new(other.shape, &other.logits, &other_labels, None);
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        let state = dpo.forward(&other_batch).expect("forward").state;
        let context = format!(
            "{}/{}: state of V = 6, W = 6 on V = 5, W = 6",
            backend.name,
            T::NAME
        );
        let mut grad = vec![0.0f32; small.logits.len()];
        let err = expect_err(&context, dpo.backward(&small_batch, &state, 1.0, &mut grad));
        assert!(
            matches!(err, Error::StateMismatch { .. }),
            "{context}: {err:?}"
        );
        assert_message(&context, &err, &["vocab: 6", "vocab: 5"]);
    }
}

#[test]
fn backward_with_state_of_other_shape() {
    for_each_dtype!(state_from_other_shape());
}

fn non_finite_grad_loss<T: TestFloat, L: TestLabel>() {
    let inputs = Inputs::<T>::round(&small_batch());
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        let out = dpo.forward(&batch).expect("forward");
        for grad_loss in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let context = format!("{}/{}: grad_loss {grad_loss}", backend.name, T::NAME);
            let mut grad = vec![0.0f32; inputs.logits.len()];
            let err = expect_err(
                &context,
                dpo.backward(&batch, &out.state, grad_loss, &mut grad),
            );
            assert!(
                matches!(
                    err,
                    Error::InvalidParameter {
                        name: "grad_loss",
                        ..
                    }
                ),
                "{context}: {err:?}"
            );
            assert_message(&context, &err, &[&format!("grad_loss = {grad_loss}:")]);
        }
    }
}

#[test]
fn non_finite_grad_loss_rejected() {
    for_each_dtype!(non_finite_grad_loss());
}

fn in_place_error_untouched<T: TestFloat, L: TestLabel>() {
    let inputs = Inputs::<T>::round(&small_batch());
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    let mut rng = Rng::new(42);
    let other = Inputs::<T>::round(&RawBatch::random(&mut rng, &Spec::new(2, 3, 6).masked(0.0)));
    let other_labels = other.labels_as::<L>();
    let mut bad_labels = labels.clone();
    bad_labels[7] = L::from_i64(5);
    let short_labels = &labels[..11];
    let bits = |x: &[T]| x.iter().map(|v| v.widen().to_bits()).collect::<Vec<_>>();
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        let state = dpo.forward(&batch).expect("forward").state;
        let other_state = dpo
            .forward(&Batch::new(other.shape, &other.logits, &other_labels, None))
            .expect("forward")
            .state;
        let shape = inputs.shape;
        let attempts: [(&str, &[L], &dpo_kernels::ForwardState, f32, usize); 5] = [
            ("state of another shape", &labels, &other_state, 1.0, 72),
            ("label 5 = V", &bad_labels, &state, 1.0, 72),
            ("labels too short", short_labels, &state, 1.0, 72),
            ("NaN grad_loss", &labels, &state, f32::NAN, 72),
            ("logits too short", &labels, &state, 1.0, 71),
        ];
        for (context, attempt_labels, attempt_state, grad_loss, len) in attempts {
            let context = format!(
                "{}/{}/{}: in place, {context}",
                backend.name,
                T::NAME,
                L::NAME
            );
            let mut logits = inputs.logits[..len].to_vec();
            let before = bits(&logits);
            let result =
                dpo.backward_in_place(shape, &mut logits, attempt_labels, attempt_state, grad_loss);
            expect_err(&context, result);
            assert!(bits(&logits) == before, "{context}: logits changed");
        }
    }
}

#[test]
fn in_place_backward_error_leaves_logits_untouched() {
    for_each_dtype!(in_place_error_untouched());
}

fn invalid_label_in_backward<T: TestFloat, L: TestLabel>() {
    // Labels changed between forward and backward are checked again before any write.
    let inputs = Inputs::<T>::round(&small_batch());
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    let mut bad_labels = labels.clone();
    bad_labels[4] = L::from_i64(-7);
    let bad_batch = Batch::new(inputs.shape, &inputs.logits, &bad_labels, None);
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        let out = dpo.forward(&batch).expect("forward");
        let context = format!("{}/{}: backward with label -7", backend.name, T::NAME);
        let mut grad = vec![3.0f32; inputs.logits.len()];
        let err = expect_err(
            &context,
            dpo.backward(&bad_batch, &out.state, 1.0, &mut grad),
        );
        assert!(
            matches!(
                err,
                Error::InvalidLabel {
                    row: 1,
                    position: 1,
                    label: -7,
                    ..
                }
            ),
            "{context}: {err:?}"
        );
        assert!(
            grad.iter().all(|&g| g == 3.0),
            "{context}: the buffer was written"
        );
    }
}

#[test]
fn invalid_label_in_backward_rejected() {
    for_each_dtype!(invalid_label_in_backward());
}
