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
        // The CPU backend re-sums an overflowing chunk in f64; the CUDA kernels sum x * 2^-32
        // in f32, which lands within a few f32 ulp of the exact mean.
        let mean_logit = (2 * plus_count - vocab) as f64 * max as f64 / vocab as f64;
        for (name, got) in [
            ("logits/chosen", out.metrics.logits_chosen),
            ("logits/rejected", out.metrics.logits_rejected),
        ] {
            let err = (got as f64 - mean_logit).abs() / mean_logit;
            assert!(
                err <= 1e-6,
                "{context}: {name} = {got}, expected {mean_logit}"
            );
        }
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

        // The smallest subnormal scale gives elements of 0 or subnormals, never NaN.
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

fn zero_positions<T: TestFloat, L: TestLabel>() {
    // T = 0 is accepted like a batch whose every position is masked: each sequence log-prob
    // is 0, so z = ref_r - ref_c and the gradient buffer is empty.
    let shape = BatchShape::from_dims(2, 0, 4, 4).expect("T = 0 is a valid shape");
    let logits: Vec<T> = Vec::new();
    let labels: Vec<L> = Vec::new();
    let reference = [-2.0f32, -1.0];
    for backend in backends() {
        let context = format!("{}/{}/{}: T = 0", backend.name, T::NAME, L::NAME);
        let dpo = backend.open(DpoConfig::new(0.1));
        let batch = Batch::new(shape, &logits, &labels, Some(&reference));
        let out = dpo
            .forward(&batch)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
        // z = ref_r - ref_c = 1, and -log sigmoid(0.1 * 1) = ln(1 + exp(-0.1)).
        let want = (1.0f64 + (-0.1f64).exp()).ln();
        assert!(
            (out.loss as f64 - want).abs() < 1e-7,
            "{context}: loss {}",
            out.loss
        );
        assert_eq!(out.chosen_logps, [0.0], "{context}");
        assert_eq!(out.rejected_logps, [0.0], "{context}");
        assert_eq!(out.metrics.logits_chosen, 0.0, "{context}");
        let mut grad: Vec<T> = Vec::new();
        dpo.backward(&batch, &out.state, 1.0, &mut grad)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
    }
}

#[test]
fn zero_positions_per_sequence() {
    for_each_dtype!(zero_positions());
}

fn single_column_vocab<T: TestFloat, L: TestLabel>() {
    // V = W = 1: the only label is 0, its probability is exactly 1, so every log-prob and
    // every gradient element is 0, whatever the logit.
    let shape = BatchShape::from_dims(2, 2, 1, 1).unwrap();
    let logits: Vec<T> = [5.0, -3.0e4, 1.0e-40, 7.0].map(T::round).to_vec();
    let labels: Vec<L> = [0, 0, 0, -100].map(L::from_i64).to_vec();
    for backend in backends() {
        let context = format!("{}/{}/{}: V = 1", backend.name, T::NAME, L::NAME);
        let dpo = backend.open(DpoConfig::new(0.1));
        let batch = Batch::new(shape, &logits, &labels, None);
        let out = dpo
            .forward(&batch)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
        assert_eq!(out.chosen_logps, [0.0], "{context}");
        assert_eq!(out.rejected_logps, [0.0], "{context}");
        assert_eq!(out.loss, std::f32::consts::LN_2, "{context}: loss");
        let mut grad = vec![T::round(7.0); 4];
        dpo.backward(&batch, &out.state, 1.0, &mut grad)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
        assert!(grad.iter().all(|g| g.widen() == 0.0), "{context}: {grad:?}");

        // Label 1 is outside [0, 1).
        let bad: Vec<L> = [0, 1, 0, 0].map(L::from_i64).to_vec();
        let err = expect_err(
            &context,
            dpo.forward(&Batch::new(shape, &logits, &bad, None)),
        );
        assert!(
            matches!(
                err,
                Error::InvalidLabel {
                    label: 1,
                    vocab: 1,
                    ..
                }
            ),
            "{context}: {err:?}"
        );
    }
}

#[test]
fn vocabulary_of_one_column() {
    for_each_dtype!(single_column_vocab());
}

#[test]
fn label_at_integer_limits() {
    let raw = small_batch();
    let inputs = Inputs::<f32>::round(&raw);
    for label in [i64::MIN, i64::MAX, i32::MIN as i64, i32::MAX as i64] {
        let mut labels = inputs.labels.clone();
        labels[5] = label;
        let batch = Batch::new(inputs.shape, &inputs.logits, &labels, None);
        for backend in backends() {
            let context = format!("{}: label {label}", backend.name);
            let err = expect_err(&context, backend.open(DpoConfig::new(0.1)).forward(&batch));
            assert!(
                matches!(err, Error::InvalidLabel { row: 1, position: 2, label: l, .. } if l == label),
                "{context}: {err:?}"
            );
            assert_message(&context, &err, &[&format!("label {label}"), "[0, 5)"]);
        }
    }
}

#[test]
fn ignore_index_outside_i32() {
    // With i32 labels no label can equal ignore_index = -2^40, so -100 is an invalid label
    // and every position must hold a real label.
    let mut raw = small_batch();
    raw.labels[4] = -100;
    let inputs = Inputs::<f32>::round(&raw);
    let labels = inputs.labels_as::<i32>();
    let mut config = DpoConfig::new(0.1);
    config.ignore_index = -(1 << 40);
    for backend in backends() {
        let context = format!("{}: ignore_index -2^40, i32 labels", backend.name);
        let dpo = backend.open(config);
        let batch = Batch::new(inputs.shape, &inputs.logits, &labels, None);
        let err = expect_err(&context, dpo.forward(&batch));
        assert!(
            matches!(err, Error::InvalidLabel { label: -100, ignore_index, .. }
                if ignore_index == -(1 << 40)),
            "{context}: {err:?}"
        );
        assert_message(
            &context,
            &err,
            &["label -100", "ignore_index -1099511627776"],
        );

        let valid = small_batch()
            .labels
            .iter()
            .map(|&y| y as i32)
            .collect::<Vec<_>>();
        let batch = Batch::new(inputs.shape, &inputs.logits, &valid, None);
        let out = dpo
            .forward(&batch)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
        assert!(out.loss.is_finite(), "{context}");
    }
}

fn ignore_index_is_a_token<T: TestFloat, L: TestLabel>() {
    // ignore_index = 0 masks every position labelled 0, as in PyTorch's cross_entropy: the
    // result is bit-identical to relabelling those positions -100 under ignore_index -100.
    let mut rng = Rng::new(74);
    let raw = RawBatch::random(&mut rng, &Spec::new(2, 16, 3).masked(0.0));
    assert!(raw.labels.contains(&0), "the batch needs some label 0");
    let inputs = Inputs::<T>::round(&raw);
    let labels = inputs.labels_as::<L>();
    let relabelled: Vec<L> = raw
        .labels
        .iter()
        .map(|&y| L::from_i64(if y == 0 { -100 } else { y }))
        .collect();
    let mut zero_ignored = DpoConfig::new(0.1);
    zero_ignored.ignore_index = 0;
    for backend in backends() {
        let context = format!("{}/{}/{}: ignore_index 0", backend.name, T::NAME, L::NAME);
        let reference = inputs.reference.as_deref();
        let run = |config: DpoConfig, labels: &[L]| {
            let dpo = backend.open(config);
            let batch = Batch::new(inputs.shape, &inputs.logits, labels, reference);
            let out = dpo.forward(&batch).expect("forward");
            let mut grad = vec![0.0f32; inputs.logits.len()];
            dpo.backward(&batch, &out.state, 1.0, &mut grad)
                .expect("backward");
            (out, grad)
        };
        let (out, grad) = run(zero_ignored, &labels);
        let (want, want_grad) = run(DpoConfig::new(0.1), &relabelled);
        assert_eq!(out.loss.to_bits(), want.loss.to_bits(), "{context}: loss");
        assert_eq!(out.chosen_logps, want.chosen_logps, "{context}");
        assert_eq!(out.rejected_logps, want.rejected_logps, "{context}");
        assert!(
            bits(&grad) == bits(&want_grad),
            "{context}: gradients differ"
        );
    }
}

#[test]
fn ignore_index_equal_to_a_token() {
    for_each_dtype!(ignore_index_is_a_token());
}

fn half_label_smoothing<T: TestFloat, L: TestLabel>() {
    // eps = 0.5 is the top of cDPO's range: l(z) = (softplus(-u) + softplus(u)) / 2 is even
    // in u, at least ln 2, and l'(z) = beta * (sigmoid(u) - sigmoid(-u)) / 2.
    let inputs = Inputs::<T>::round(&small_batch());
    let labels = inputs.labels_as::<L>();
    let mut config = DpoConfig::new(0.1);
    config.loss = LossKind::Sigmoid {
        label_smoothing: 0.5,
    };
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    let reference = inputs.reference.as_ref().unwrap();
    let softplus = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    for backend in backends() {
        let context = format!("{}/{}/{}: eps 0.5", backend.name, T::NAME, L::NAME);
        let out = backend
            .open(config)
            .forward(&batch)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
        for i in 0..2 {
            let z = (out.chosen_logps[i] as f64 - reference[i] as f64)
                - (out.rejected_logps[i] as f64 - reference[2 + i] as f64);
            let u = 0.1 * z;
            let loss = (softplus(-u) + softplus(u)) / 2.0;
            let dz = 0.1 * (sigmoid(u) - sigmoid(-u)) / 2.0;
            assert!(
                out.losses[i] as f64 >= std::f64::consts::LN_2 - 1e-7,
                "{context}"
            );
            assert!(
                (out.losses[i] as f64 - loss).abs() <= 1e-6 * loss,
                "{context}: losses[{i}] {} expected {loss}",
                out.losses[i]
            );
            assert!(
                (out.dloss_dmargin[i] as f64 - dz).abs() <= 1e-7,
                "{context}: dloss_dmargin[{i}] {} expected {dz}",
                out.dloss_dmargin[i]
            );
        }
    }
}

#[test]
fn label_smoothing_of_one_half() {
    for_each_dtype!(half_label_smoothing());
}

fn subnormal_logits<T: TestFloat, L: TestLabel>() {
    // Logits of the smallest subnormals are all but 0, so every log-prob is -ln V per token.
    let mut raw = small_batch();
    for (i, x) in raw.logits.iter_mut().enumerate() {
        *x = (T::MIN_SUBNORMAL * (i % 3) as f64) as f32;
    }
    raw.reference = None;
    let inputs = Inputs::<T>::round(&raw);
    assert!(inputs.logits.iter().any(|x| x.widen() != 0.0));
    let want = -3.0 * 5.0f64.ln();
    for backend in backends() {
        let context = format!("{}/{}/{}: subnormal logits", backend.name, T::NAME, L::NAME);
        let dpo = backend.open(DpoConfig::new(0.1));
        let (out, grad) = forward_backward::<T, L>(&dpo, &raw, 1.0)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
        for logp in out.chosen_logps.iter().chain(&out.rejected_logps) {
            assert!(
                (*logp as f64 - want).abs() <= 1e-5,
                "{context}: log-prob {logp} expected {want}"
            );
        }
        assert!(
            (out.loss as f64 - std::f64::consts::LN_2).abs() <= 1e-6,
            "{context}"
        );
        assert!(grad.iter().all(|g| g.is_finite()), "{context}: gradient");
    }
}

#[test]
fn subnormal_logits_are_uniform() {
    for_each_dtype!(subnormal_logits());
}

fn half_precision_infinities<L: TestLabel>() {
    // f16 has +-inf next to +-65504. A -inf outside the target is an ordinary 0 probability,
    // and +inf at a valid position is rejected with its column.
    let mut raw = small_batch();
    raw.logits
        .iter_mut()
        .for_each(|x| *x = x.clamp(-60.0, 60.0));
    let target = raw.labels[raw.position(2, 1)] as usize;
    let other = (target + 1) % 5;
    raw.row_mut(2, 1)[other] = f32::NEG_INFINITY;
    raw.row_mut(1, 0)[0] = 65504.0;
    raw.row_mut(1, 0)[1] = -65504.0;
    for backend in backends() {
        let context = format!("{}/f16/{}: +-65504 and -inf", backend.name, L::NAME);
        let dpo = backend.open(DpoConfig::new(0.1));
        let (out, grad) = forward_backward::<half::f16, L>(&dpo, &raw, 1.0)
            .unwrap_or_else(|err| panic!("{context}: {err}"));
        assert!(out.loss.is_finite(), "{context}: loss {}", out.loss);
        assert!(grad.iter().all(|g| g.is_finite()), "{context}: gradient");
        let w = raw.shape.row_stride;
        let p = raw.position(2, 1);
        assert_eq!(grad[p * w + other], 0.0, "{context}: gradient at -inf");

        let mut poisoned = raw.clone();
        poisoned.row_mut(3, 2)[4] = f32::INFINITY;
        let err = expect_err(
            &context,
            forward_backward::<half::f16, L>(&dpo, &poisoned, 1.0),
        );
        assert!(
            matches!(
                err,
                Error::NonFiniteLogit {
                    row: 3,
                    position: 2,
                    ..
                }
            ),
            "{context}: {err:?}"
        );
        assert_message(&context, &err, &["+inf", "column 4"]);
    }
}

#[test]
fn f16_infinities_and_extremes() {
    half_precision_infinities::<i64>();
    half_precision_infinities::<i32>();
}

fn repeated_backward<T: TestFloat, L: TestLabel>() {
    // The backward reads the state and never changes it, so a second call gives the same bits.
    let inputs = Inputs::<T>::round(&small_batch());
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    for backend in backends() {
        let context = format!("{}/{}/{}: backward twice", backend.name, T::NAME, L::NAME);
        let dpo = backend.open(DpoConfig::new(0.1));
        let out = dpo.forward(&batch).expect("forward");
        let mut first = vec![T::round(f32::NAN); inputs.logits.len()];
        let mut second = vec![T::round(-1.0); inputs.logits.len()];
        dpo.backward(&batch, &out.state, 1.0, &mut first)
            .expect("first backward");
        dpo.backward(&batch, &out.state, 1.0, &mut second)
            .expect("second backward");
        assert!(bits(&first) == bits(&second), "{context}: the calls differ");
    }
}

#[test]
fn backward_twice_is_identical() {
    for_each_dtype!(repeated_backward());
}

#[test]
fn state_of_other_labels_rejected() {
    // A state from another batch of the same shape and config, whose labels differ, fails with
    // StateMismatch (the state keeps a hash of the forward's labels) and writes nothing.
    let inputs = Inputs::<f32>::round(&small_batch());
    let mut rng = Rng::new(75);
    let other_raw = RawBatch::random(&mut rng, &Spec::new(2, 3, 5).stride(6).masked(0.0));
    let other = Inputs::<f32>::round(&other_raw);
    assert_ne!(
        inputs.labels, other.labels,
        "the two batches must differ in their labels"
    );
    let batch = Batch::new(inputs.shape, &inputs.logits, &inputs.labels, None);
    let other_batch = Batch::new(other.shape, &other.logits, &other.labels, None);
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        let state = dpo.forward(&other_batch).expect("forward").state;
        let mut grad = vec![7.0f32; inputs.logits.len()];
        let err = expect_err(backend.name, dpo.backward(&batch, &state, 1.0, &mut grad));
        assert!(
            matches!(err, Error::StateMismatch { .. }),
            "{}: {err:?}",
            backend.name
        );
        assert_message(backend.name, &err, &["labels differ"]);
        assert!(
            grad.iter().all(|&g| g == 7.0),
            "{}: grad was written",
            backend.name
        );
    }
}

#[test]
fn backward_after_in_place_rejected() {
    // After backward_in_place the logits hold the gradient, so the state refuses a second
    // backward of either kind.
    let inputs = Inputs::<f32>::round(&small_batch());
    let batch = Batch::new(inputs.shape, &inputs.logits, &inputs.labels, None);
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        let out = dpo.forward(&batch).expect("forward");
        let mut logits = inputs.logits.clone();
        dpo.backward_in_place(inputs.shape, &mut logits, &inputs.labels, &out.state, 1.0)
            .expect("first in-place backward");
        let mut grad = vec![0.0f32; logits.len()];
        let again = Batch::new(inputs.shape, &logits, &inputs.labels, None);
        let err = expect_err(
            backend.name,
            dpo.backward(&again, &out.state, 1.0, &mut grad),
        );
        assert!(
            matches!(err, Error::StateMismatch { .. }),
            "{}: {err:?}",
            backend.name
        );
        assert_message(backend.name, &err, &["in-place backward"]);
        let err = expect_err(
            backend.name,
            dpo.backward_in_place(inputs.shape, &mut logits, &inputs.labels, &out.state, 1.0),
        );
        assert!(
            matches!(err, Error::StateMismatch { .. }),
            "{}: {err:?}",
            backend.name
        );
    }
}

#[test]
fn concurrent_forward_on_one_loss() {
    // Eight threads share one DpoLoss by reference, and each gets the bits of a lone run
    // while the others run.
    let mut rng = Rng::new(76);
    let raw = RawBatch::random(&mut rng, &Spec::new(3, 17, 300).masked(0.2));
    let inputs = Inputs::<half::bf16>::round(&raw);
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &inputs.labels,
        inputs.reference.as_deref(),
    );
    let run = |dpo: &DpoLoss| {
        let mut grad = vec![0.0f32; inputs.logits.len()];
        let out = dpo.forward_backward(&batch, &mut grad).expect("forward");
        let mut all = vec![out.loss.to_bits()];
        all.extend(out.losses.iter().map(|x| x.to_bits()));
        all.extend(out.chosen_logps.iter().map(|x| x.to_bits()));
        all.extend(out.rejected_logps.iter().map(|x| x.to_bits()));
        all.extend(out.metrics.named().iter().map(|(_, x)| x.to_bits()));
        all.extend(grad.iter().map(|x| x.to_bits()));
        all
    };
    for backend in backends() {
        let dpo = backend.open(DpoConfig::new(0.1));
        let want = run(&dpo);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8).map(|_| scope.spawn(|| run(&dpo))).collect();
            for (i, handle) in handles.into_iter().enumerate() {
                let got = handle.join().expect("thread panicked");
                assert!(got == want, "{}: thread {i} differs", backend.name);
            }
        });
    }
}
