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

/// B = 2 pairs, T = 3 positions, V = 5 real columns in rows of W = 6, nothing masked.
fn small_batch() -> RawBatch {
    let mut rng = Rng::new(70);
    RawBatch::random(&mut rng, &Spec::new(2, 3, 5).stride(6).masked(0.0))
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

/// Returns one pair of T = 2 positions over V = 4, nothing masked, with the target logit of position 0
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
    // derivative. Plain DPO gives 0 because -log sigmoid(+inf) = 0.
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

/// Returns every loss kind, with and without label smoothing.
fn every_loss() -> [LossKind; 6] {
    [
        LossKind::Sigmoid {
            label_smoothing: 0.0,
        },
        LossKind::Sigmoid {
            label_smoothing: 0.5,
        },
        LossKind::Robust {
            label_smoothing: 0.0,
        },
        LossKind::Robust {
            label_smoothing: 0.25,
        },
        LossKind::Ipo,
        LossKind::Hinge,
    ]
}

fn both_neg_inf<T: TestFloat, L: TestLabel>() {
    // Both log-probs of the pair are -inf, so z = -inf - (-inf) has no value. Without a check,
    // hinge returns loss 0 here because NaN < 1 is false.
    let raw = neg_inf_targets(&[0, 1]);
    for backend in backends() {
        for loss in every_loss() {
            let context = format!("{}/{}/{}: {loss:?}", backend.name, T::NAME, L::NAME);
            let mut config = DpoConfig::new(0.1);
            config.loss = loss;
            let err = expect_err(
                &context,
                forward_backward::<T, L>(&backend.open(config), &raw, 1.0),
            );
            assert!(
                matches!(&err, Error::NonFiniteOutput { output, value, .. }
                    if output == "margin of pair 0" && value.is_nan()),
                "{context}: {err:?}"
            );
            assert_message(&context, &err, &["margin of pair 0", "log-prob -inf"]);
        }
    }
}

#[test]
fn both_log_probs_neg_inf_rejected() {
    for_each_dtype!(both_neg_inf());
}

fn opposite_infinite_margins<T: TestFloat, L: TestLabel>() {
    // Pair 0 has z = -inf and pair 1 has z = +inf, so the mean margin is inf - inf.
    let mut rng = Rng::new(72);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 2, 4).masked(0.0));
    for row in [0, 3] {
        let target = raw.labels[raw.position(row, 1)] as usize;
        raw.row_mut(row, 1)[target] = f32::NEG_INFINITY;
    }
    for backend in backends() {
        for loss in every_loss() {
            let context = format!("{}/{}/{}: {loss:?}", backend.name, T::NAME, L::NAME);
            let mut config = DpoConfig::new(0.1);
            config.loss = loss;
            let err = expect_err(
                &context,
                forward_backward::<T, L>(&backend.open(config), &raw, 1.0),
            );
            assert!(
                matches!(&err, Error::NonFiniteOutput { output, value, .. }
                    if output == "rewards/margins" && value.is_nan()),
                "{context}: {err:?}"
            );
            assert_message(&context, &err, &["rewards/margins", "+inf and -inf"]);
        }
    }
}

#[test]
fn opposite_infinite_margins_rejected() {
    for_each_dtype!(opposite_infinite_margins());
}

/// Checks that the forward fails with an f32 overflow of `output`.
fn assert_overflow(context: &str, result: dpo_kernels::Result<DpoOutput>, output: &str) {
    let err = expect_err(context, result);
    assert!(
        matches!(&err, Error::NonFiniteOutput { output: o, value, .. }
            if o == output && value.is_finite()),
        "{context}: {err:?}"
    );
    assert_message(context, &err, &[output, "beyond the f32 range"]);
}

fn extreme_beta_and_reference<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(73);
    let raw = RawBatch::random(&mut rng, &Spec::new(2, 3, 5).masked(0.0));
    let inputs = Inputs::<T>::round(&raw);
    let labels = inputs.labels_as::<L>();
    let huge_reference = [3e38f32, -3e38, -3e38, 3e38];
    let far_reference = [1e10f32, 1e10, 2e10, 2e10];
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    let huge = Batch::new(inputs.shape, &inputs.logits, &labels, Some(&huge_reference));
    let far = Batch::new(inputs.shape, &inputs.logits, &labels, Some(&far_reference));
    for backend in backends() {
        let name = format!("{}/{}/{}", backend.name, T::NAME, L::NAME);
        let open = |beta: f32, loss: LossKind| {
            let mut config = DpoConfig::new(beta);
            config.loss = loss;
            backend.open(config)
        };
        let sigmoid = LossKind::Sigmoid {
            label_smoothing: 0.0,
        };

        // Finite margins of order 10 keep every output finite at both ends of beta.
        for beta in [1e-30, 1e-45, 1e30] {
            for loss in every_loss() {
                if loss == LossKind::Ipo && beta < 1.0 {
                    continue; // (z - 1 / (2 beta))^2 overflows, checked below
                }
                let context = format!("{name}: beta {beta:e}, {loss:?}");
                let out = open(beta, loss)
                    .forward(&batch)
                    .unwrap_or_else(|err| panic!("{context}: {err}"));
                assert!(out.loss.is_finite(), "{context}: loss {}", out.loss);
                assert!(
                    out.dloss_dmargin.iter().all(|d| d.is_finite()),
                    "{context}: {:?}",
                    out.dloss_dmargin
                );
            }
        }

        // IPO: (z - 1 / (2 beta))^2 = 2.5e59 at beta = 1e-30.
        let context = format!("{name}: IPO, beta 1e-30");
        assert_overflow(&context, open(1e-30, LossKind::Ipo).forward(&batch), "loss");
        let err = expect_err(&context, open(1e-30, LossKind::Ipo).forward(&batch));
        assert_message(&context, &err, &["beta = 1e-30"]);

        // z = 6e38 overflows the loss of each pair at beta = 1 (their mean, 3e38, does not).
        let context = format!("{name}: reference_logps +-3e38, beta 1");
        assert_overflow(&context, open(1.0, sigmoid).forward(&huge), "losses[0]");
        let context = format!("{name}: reference_logps +-3e38, beta 1e30");
        assert_overflow(&context, open(1e30, sigmoid).forward(&huge), "loss");

        // Rewards of -1e40 overflow while the hinge loss is 0 (u = 1e40 is past the hinge).
        let context = format!("{name}: reference_logps 1e10 and 2e10, beta 1e30");
        assert_overflow(
            &context,
            open(1e30, LossKind::Hinge).forward(&far),
            "rewards/chosen",
        );
    }
}

#[test]
fn extreme_beta_and_reference_logps() {
    for_each_dtype!(extreme_beta_and_reference());
}

fn largest_finite_logits<T: TestFloat, L: TestLabel>(max: f32) {
    // V = 300 spans one full 256-column chunk and a tail. Columns with col % 8 < 4 hold +max and
    // the rest -max, so f32 accumulators per lane reach +inf in lanes 0..4 and -inf in lanes
    // 4..8. The true mean logit is (152 - 148) * max / 300.
    let (vocab, plus_count) = (300, 152);
    let row: Vec<f32> = (0..vocab)
        .map(|col| if col % 8 < 4 { max } else { -max })
        .collect();
    let shape = BatchShape::from_dims(2, 1, vocab, vocab).unwrap();
    let logits: Vec<T> = [row.clone(), row]
        .concat()
        .into_iter()
        .map(T::round)
        .collect();
    assert!(logits.iter().all(|x| x.widen().is_finite()));
    let plus_target = vec![L::from_i64(8), L::from_i64(1)];
    let minus_target = vec![L::from_i64(4), L::from_i64(1)];
    for backend in backends() {
        let context = format!("{}/{}/{}: logits +-{max:e}", backend.name, T::NAME, L::NAME);
        let dpo = backend.open(DpoConfig::new(0.1));

        // Targets at +max: log p = -ln 152 on both sides, everything finite.
        let batch = Batch::new(shape, &logits, &plus_target, None);
        let out = dpo
            .forward(&batch)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
        let want = -(plus_count as f64).ln();
        for logp in [out.chosen_logps[0], out.rejected_logps[0]] {
            assert!(
                (logp as f64 - want).abs() <= 1e-5,
                "{context}: log-prob {logp}, expected {want}"
            );
        }
        let mean_logit = ((2 * plus_count - vocab) as f64 * max as f64 / vocab as f64) as f32;
        assert_eq!(
            out.metrics.logits_chosen, mean_logit,
            "{context}: logits/chosen"
        );
        assert_eq!(
            out.metrics.logits_rejected, mean_logit,
            "{context}: logits/rejected"
        );
        assert!(out.loss.is_finite(), "{context}: loss {}", out.loss);
        let mut grad = vec![f32::NAN; logits.len()];
        dpo.backward(&batch, &out.state, 1.0, &mut grad)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
        assert!(grad.iter().all(|g| g.is_finite()), "{context}: gradient");

        // A target at -max: log p = -2 max - ln 152, beyond the f32 range unless max is the
        // f16 one.
        let batch = Batch::new(shape, &logits, &minus_target, None);
        let want = -2.0 * max as f64 - (plus_count as f64).ln();
        if (want as f32).is_finite() {
            let out = dpo
                .forward(&batch)
                .unwrap_or_else(|err| panic!("{context}: {err}"));
            assert_eq!(out.chosen_logps[0], want as f32, "{context}: log-prob");
        } else {
            assert_overflow(&context, dpo.forward(&batch), "logps/chosen");
        }
    }
}

#[test]
fn logits_at_largest_finite_value() {
    largest_finite_logits::<f32, i64>(f32::MAX);
    largest_finite_logits::<f32, i32>(f32::MAX);
    largest_finite_logits::<half::bf16, i64>(half::bf16::MAX.to_f32());
    largest_finite_logits::<half::f16, i64>(half::f16::MAX.to_f32());
}

/// Returns the bits of `values` widened to f64, to compare buffers exactly (NaN included).
fn bits<T: TestFloat>(values: &[T]) -> Vec<u64> {
    values.iter().map(|v| v.widen().to_bits()).collect()
}

fn overflowing_gradient_scale<T: TestFloat, L: TestLabel>() {
    // d loss / d logp[r] = c[r] is 5e29 at beta = 1e30 (B = 2), so grad_loss = 1e30 makes
    // grad_loss * c[r] overflow f32, and -inf * p gives NaN where p = 0.
    let raw = small_batch();
    let inputs = Inputs::<T>::round(&raw);
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(inputs.shape, &inputs.logits, &labels, None);
    for backend in backends() {
        let context = format!("{}/{}/{}: grad_loss 1e30", backend.name, T::NAME, L::NAME);
        let dpo = backend.open(DpoConfig::new(1e30));
        let out = dpo
            .forward(&batch)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
        let mut grad = vec![T::round(7.0); inputs.logits.len()];
        let err = expect_err(&context, dpo.backward(&batch, &out.state, 1e30, &mut grad));
        assert!(
            matches!(&err, Error::NonFiniteOutput { value, .. } if value.is_finite()),
            "{context}: {err:?}"
        );
        assert_message(
            &context,
            &err,
            &["grad_loss = 1e30", "beyond the f32 range"],
        );
        assert!(
            grad.iter().all(|g| g.widen() == 7.0),
            "{context}: the buffer was written"
        );

        let mut logits = inputs.logits.clone();
        let before = bits(&logits);
        let result = dpo.backward_in_place(inputs.shape, &mut logits, &labels, &out.state, 1e30);
        expect_err(&format!("{context}, in place"), result);
        assert!(bits(&logits) == before, "{context}: logits changed");

        // The same state with grad_loss 1 is fine.
        dpo.backward(&batch, &out.state, 1.0, &mut grad)
            .unwrap_or_else(|err| panic!("{context}: grad_loss 1: {err}"));
        assert!(grad.iter().all(|g| !g.widen().is_nan()), "{context}");
    }
}

#[test]
fn gradient_scale_overflow_rejected() {
    for_each_dtype!(overflowing_gradient_scale());
}

fn ipo_infinite_margin<T: TestFloat, L: TestLabel>() {
    // IPO at z = +inf: the loss (z - 1 / (2 beta))^2 and its derivative are +inf, which the
    // forward reports as exact values, but no finite gradient exists.
    let raw = neg_inf_targets(&[1]);
    let mut config = DpoConfig::new(0.1);
    config.loss = LossKind::Ipo;
    for backend in backends() {
        let context = format!("{}/{}/{}: IPO, z = +inf", backend.name, T::NAME, L::NAME);
        let dpo = backend.open(config);
        let inputs = Inputs::<T>::round(&raw);
        let labels = inputs.labels_as::<L>();
        let batch = Batch::new(inputs.shape, &inputs.logits, &labels, None);
        let out = dpo
            .forward(&batch)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
        assert_eq!(out.loss, f32::INFINITY, "{context}: loss");
        assert_eq!(
            out.dloss_dmargin[0],
            f32::INFINITY,
            "{context}: dloss_dmargin"
        );
        let mut grad = vec![0.0f32; inputs.logits.len()];
        let err = expect_err(&context, dpo.backward(&batch, &out.state, 1.0, &mut grad));
        assert!(
            matches!(&err, Error::NonFiniteOutput { value, .. } if value.is_infinite()),
            "{context}: {err:?}"
        );
        assert_message(&context, &err, &["sequence 0"]);
    }
}

#[test]
fn ipo_infinite_margin_has_no_gradient() {
    for_each_dtype!(ipo_infinite_margin());
}

fn gradient_scales<T: TestFloat, L: TestLabel>() {
    let raw = small_batch();
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
        let out = dpo.forward(&batch).expect("forward");
        let name = format!("{}/{}/{}", backend.name, T::NAME, L::NAME);

        // grad_loss 0 gives an all-zero gradient.
        let mut grad = vec![T::round(7.0); inputs.logits.len()];
        dpo.backward(&batch, &out.state, 0.0, &mut grad)
            .expect("grad_loss 0");
        assert!(
            grad.iter().all(|g| g.widen() == 0.0),
            "{name}: grad_loss 0 left a nonzero gradient"
        );

        // The smallest subnormal flushes every element to 0 or a subnormal, never NaN.
        dpo.backward(&batch, &out.state, f32::from_bits(1), &mut grad)
            .expect("grad_loss 1e-45");
        assert!(
            grad.iter().all(|g| g.widen().abs() < 1e-37),
            "{name}: grad_loss 1e-45"
        );

        // 1e30 fits f32, so an f32 gradient is finite. Elements beyond an f16 or bf16 range
        // round to +-inf, as a cast does, which is what loss scalers test for. None is NaN.
        dpo.backward(&batch, &out.state, 1e30, &mut grad)
            .expect("grad_loss 1e30");
        assert!(
            grad.iter().all(|g| !g.widen().is_nan()),
            "{name}: grad_loss 1e30 gave NaN"
        );
        let mut grad32 = vec![0.0f32; inputs.logits.len()];
        dpo.backward(&batch, &out.state, 1e30, &mut grad32)
            .expect("grad_loss 1e30");
        assert!(
            grad32.iter().all(|g| g.is_finite()),
            "{name}: grad_loss 1e30 gave a non-finite f32 gradient"
        );
    }
}

#[test]
fn gradient_at_extreme_grad_loss() {
    for_each_dtype!(gradient_scales());
}

fn state_from_other_config<T: TestFloat, L: TestLabel>() {
    let inputs = Inputs::<T>::round(&small_batch());
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    for backend in backends() {
        let context = format!("{}/{}/{}: beta 0.1 state", backend.name, T::NAME, L::NAME);
        let state = backend
            .open(DpoConfig::new(0.1))
            .forward(&batch)
            .expect("forward")
            .state;
        let other = backend.open(DpoConfig::new(0.2));
        let mut grad = vec![T::round(7.0); inputs.logits.len()];
        let err = expect_err(&context, other.backward(&batch, &state, 1.0, &mut grad));
        assert!(
            matches!(err, Error::StateMismatch { .. }),
            "{context}: {err:?}"
        );
        assert_message(&context, &err, &["beta: 0.1", "beta: 0.2"]);
        assert!(
            grad.iter().all(|g| g.widen() == 7.0),
            "{context}: the buffer was written"
        );

        let mut logits = inputs.logits.clone();
        let result = other.backward_in_place(inputs.shape, &mut logits, &labels, &state, 1.0);
        let err = expect_err(&context, result);
        assert!(
            matches!(err, Error::StateMismatch { .. }),
            "{context}: in place: {err:?}"
        );
        assert!(
            bits(&logits) == bits(&inputs.logits),
            "{context}: logits changed"
        );
    }
}

#[test]
fn backward_with_state_of_other_config() {
    for_each_dtype!(state_from_other_config());
}
