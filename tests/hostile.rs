//! Hostile inputs to the library: extreme dims, labels, parameters and logits. Each case
//! either returns its typed error with a message that names the value, or returns outputs
//! that are finite or exactly the documented infinity, never NaN.

mod common;

use common::backends;
use dpo_kernels::{Batch, BatchShape, DpoConfig, Error};

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
