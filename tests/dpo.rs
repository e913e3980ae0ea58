//! The DPO loss family and its gradient: every loss kind with and without length
//! normalisation and reference log-probs, upstream gradient scaling, determinism across runs
//! and thread counts, a finite-difference check of the f64 reference gradient, and random
//! batches from proptest. Every test runs on every available backend, for f32, f16 and bf16
//! logits and i32 and i64 labels, and compares with the f64 reference.

mod common;

use common::reference::{self, RefBatch, RefParams};
use common::{
    backends, check_all_backends, check_all_backends_scaled, config_with, for_each_dtype,
    loss_kinds, Inputs, RawBatch, RefData, Rng, Spec, TestBackend, TestFloat, TestLabel,
};
use dpo_kernels::{Batch, DpoConfig, DpoOutput, LossKind};
use proptest::prelude::*;

fn all_loss_kinds<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(20);
    let raw = RawBatch::random(&mut rng, &Spec::new(3, 11, 37).stride(40).masked(0.3));
    for loss in loss_kinds() {
        for length_normalize in [false, true] {
            for with_reference in [true, false] {
                let mut raw = raw.clone();
                if !with_reference {
                    raw.reference = None;
                }
                check_all_backends::<T, L>(&raw, config_with(loss, length_normalize));
            }
        }
    }
}

#[test]
fn loss_kinds_match_reference() {
    for_each_dtype!(all_loss_kinds());
}

fn beta_range<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(21);
    let raw = RawBatch::random(&mut rng, &Spec::new(2, 9, 33));
    for beta in [1e-3, 0.05, 1.0, 10.0] {
        for loss in loss_kinds() {
            let mut config = config_with(loss, false);
            config.beta = beta;
            check_all_backends::<T, L>(&raw, config);
        }
    }
}

#[test]
fn beta_from_1e_minus_3_to_10() {
    for_each_dtype!(beta_range());
}

fn hinge_on_both_sides<T: TestFloat, L: TestLabel>() {
    // Reference log-probs chosen so that u = beta * z is about -3 for pair 0 and +3 for
    // pair 1: one pair inside the hinge (gradient -beta), one past it (gradient 0).
    let mut rng = Rng::new(22);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 5, 16).masked(0.0));
    let config = config_with(LossKind::Hinge, false);
    let data = RefData::new(&Inputs::<f32>::round(&raw));
    let fwd = reference::forward(&data.batch(), &RefParams::from_config(&config));
    let logp = &fwd.seq_logp;
    let beta = config.beta as f64;
    let reference = vec![
        (logp[0] + 3.0 / beta) as f32,
        (logp[1] - 3.0 / beta) as f32,
        logp[2] as f32,
        logp[3] as f32,
    ];
    raw.reference = Some(reference);
    check_all_backends::<T, L>(&raw, config);
}

#[test]
fn hinge_inside_and_past_margin() {
    for_each_dtype!(hinge_on_both_sides());
}

fn saturated_margins<T: TestFloat, L: TestLabel>() {
    // beta * z near -500 and +500: the loss is ~500 on one pair and ~e^-500 on the other,
    // where a naive log(sigmoid) gives inf or log(0).
    let mut rng = Rng::new(23);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 3, 12).masked(0.0));
    let config = DpoConfig::new(0.5);
    let data = RefData::new(&Inputs::<f32>::round(&raw));
    let fwd = reference::forward(&data.batch(), &RefParams::from_config(&config));
    let logp = &fwd.seq_logp;
    raw.reference = Some(vec![
        (logp[0] + 1000.0) as f32,
        (logp[1] - 1000.0) as f32,
        logp[2] as f32,
        logp[3] as f32,
    ]);
    check_all_backends::<T, L>(&raw, config);
}

#[test]
fn saturated_margins_500() {
    for_each_dtype!(saturated_margins());
}

fn reference_free<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(24);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(3, 8, 19));
    raw.reference = None;
    for loss in loss_kinds() {
        check_all_backends::<T, L>(&raw, config_with(loss, false));
    }
}

#[test]
fn reference_free_batches() {
    for_each_dtype!(reference_free());
}

fn tied_pairs<T: TestFloat, L: TestLabel>() {
    // Chosen and rejected identical, same reference: z = 0 exactly, no pair wins.
    let mut rng = Rng::new(25);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 6, 14));
    let seq = 6 * 14;
    let (chosen, rejected) = raw.logits.split_at_mut(2 * seq);
    rejected.copy_from_slice(chosen);
    let (chosen, rejected) = raw.labels.split_at_mut(12);
    rejected.copy_from_slice(chosen);
    let reference = raw.reference.as_mut().expect("reference");
    reference[2] = reference[0];
    reference[3] = reference[1];
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));

    let inputs = Inputs::<T>::round(&raw);
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    for backend in backends() {
        let out = backend
            .open(DpoConfig::new(0.1))
            .forward(&batch)
            .expect("forward");
        assert_eq!(
            out.metrics.rewards_accuracy, 0.0,
            "{}: a tie is not a win",
            backend.name
        );
        assert_eq!(
            out.metrics.rewards_margin, 0.0,
            "{}: margin of ties",
            backend.name
        );
        let ln2 = std::f32::consts::LN_2;
        assert!(
            (out.loss - ln2).abs() <= 1e-6,
            "{}: loss {} at z = 0",
            backend.name,
            out.loss
        );
    }
}

#[test]
fn ties_between_chosen_and_rejected() {
    for_each_dtype!(tied_pairs());
}

fn grad_loss_scaling<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(26);
    let raw = RawBatch::random(&mut rng, &Spec::new(2, 7, 45).stride(47));
    for grad_loss in [0.5, -2.0, 0.0, 1e-3, 64.0] {
        for length_normalize in [false, true] {
            let config = config_with(
                LossKind::Sigmoid {
                    label_smoothing: 0.1,
                },
                length_normalize,
            );
            check_all_backends_scaled::<T, L>(&raw, config, grad_loss);
        }
    }
}

#[test]
fn grad_loss_scales_gradient() {
    for_each_dtype!(grad_loss_scaling());
}

/// Every output of one forward and backward, as bits.
#[derive(Debug, PartialEq, Eq)]
struct Bits {
    forward: Vec<u32>,
    grad_f32: Vec<u32>,
    grad_in_place: Vec<u16>,
}

fn output_bits(out: &DpoOutput) -> Vec<u32> {
    let mut bits = vec![out.loss.to_bits()];
    for values in [
        &out.losses,
        &out.chosen_logps,
        &out.rejected_logps,
        &out.chosen_rewards,
        &out.rejected_rewards,
        &out.dloss_dmargin,
    ] {
        bits.extend(values.iter().map(|x| x.to_bits()));
    }
    bits.extend(out.metrics.named().iter().map(|(_, x)| x.to_bits()));
    bits
}

fn run_bits(backend: &TestBackend, config: DpoConfig, inputs: &Inputs<half::bf16>) -> Bits {
    let labels = inputs.labels_as::<i64>();
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    let dpo = backend.open(config);
    let out = dpo.forward(&batch).expect("forward");
    let mut grad = vec![0.0f32; inputs.logits.len()];
    dpo.backward(&batch, &out.state, 1.0, &mut grad)
        .expect("backward");
    let mut in_place = inputs.logits.clone();
    dpo.backward_in_place(inputs.shape, &mut in_place, &labels, &out.state, 1.0)
        .expect("backward_in_place");
    Bits {
        forward: output_bits(&out),
        grad_f32: grad.iter().map(|g| g.to_bits()).collect(),
        grad_in_place: in_place.iter().map(|g| g.to_bits()).collect(),
    }
}

#[test]
fn deterministic_across_runs_and_thread_counts() {
    // Enough rows (3 * 2 * 47 = 282, V = 1000) for rayon to split the work across threads.
    let mut rng = Rng::new(27);
    let raw = RawBatch::random(&mut rng, &Spec::new(3, 47, 1000).masked(0.3));
    let inputs = Inputs::<half::bf16>::round(&raw);
    let pool = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("rayon pool")
    };
    let (one, two) = (pool(1), pool(2));
    for backend in backends() {
        for config in [DpoConfig::new(0.1), config_with(LossKind::Ipo, true)] {
            let first = two.install(|| run_bits(backend, config, &inputs));
            let again = two.install(|| run_bits(backend, config, &inputs));
            let single = one.install(|| run_bits(backend, config, &inputs));
            assert!(
                first == again,
                "{}: two runs differ in some bit",
                backend.name
            );
            assert!(
                first == single,
                "{}: 1 and 2 threads differ in some bit",
                backend.name
            );
        }
    }
}

fn forward_backward_same<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(28);
    let raw = RawBatch::random(&mut rng, &Spec::new(2, 5, 30).stride(31));
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
        let mut separate = vec![T::round(f32::NAN); inputs.logits.len()];
        dpo.backward(&batch, &out.state, 1.0, &mut separate)
            .expect("backward");
        let mut fused = vec![T::round(f32::NAN); inputs.logits.len()];
        let fused_out = dpo
            .forward_backward(&batch, &mut fused)
            .expect("forward_backward");
        assert_eq!(
            output_bits(&out),
            output_bits(&fused_out),
            "{}: forward outputs",
            backend.name
        );
        let bits = |g: &[T]| g.iter().map(|x| x.widen().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&separate), bits(&fused), "{}: gradients", backend.name);
    }
}

#[test]
fn forward_backward_matches_separate_calls() {
    for_each_dtype!(forward_backward_same());
}

/// Checks the analytic reference gradient against f64 central differences of the reference
/// loss. This validates the reference; the crate is compared with the reference elsewhere.
#[test]
fn reference_gradient_matches_finite_differences() {
    const STEP: f64 = 1e-5;
    let mut rng = Rng::new(29);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 3, 5).stride(6).masked(0.2));
    raw.mask_sequence(3, -100); // one empty sequence, for the n = 0 branch of normalisation
    let data = RefData::new(&Inputs::<f32>::round(&raw));
    let mut kinds = loss_kinds().to_vec();
    kinds.push(LossKind::Robust {
        label_smoothing: 0.45,
    });
    for loss in kinds {
        for length_normalize in [false, true] {
            for with_reference in [true, false] {
                let config = config_with(loss, length_normalize);
                let params = RefParams::from_config(&config);
                let mut batch = data.batch();
                if !with_reference {
                    batch.reference = None;
                }
                let fwd = reference::forward(&batch, &params);
                let margin_step = 4.0 * STEP; // |d z / d x| <= 2 per element, times 2 for slack
                for (i, &z) in fwd.margins.iter().enumerate() {
                    assert!(
                        !reference::near_kink(&params, z, margin_step),
                        "pair {i} sits on the hinge kink; pick another seed"
                    );
                }
                let grad_loss = 1.5;
                let analytic = reference::gradient(&batch, &params, &fwd, grad_loss);
                let mut logits = data.logits.clone();
                let mut numeric = vec![0.0; logits.len()];
                for i in 0..logits.len() {
                    let x = logits[i];
                    logits[i] = x + STEP;
                    let up = loss_at(&batch, &logits, &params);
                    logits[i] = x - STEP;
                    let down = loss_at(&batch, &logits, &params);
                    logits[i] = x;
                    numeric[i] = grad_loss * (up - down) / (2.0 * STEP);
                }
                // Truncation error ~ STEP^2 * |l'''| and cancellation ~ 1e-16 * |loss| / STEP,
                // both below 1e-8 for these sizes.
                let name = format!("finite differences, {loss:?}, length_normalize {length_normalize}, reference {with_reference}");
                common::assert_close_at(
                    &name,
                    &analytic,
                    &numeric,
                    1e-8,
                    1e-6,
                    &numeric.iter().map(|g| g.abs()).collect::<Vec<_>>(),
                    common::grad_index(&data.shape),
                );
            }
        }
    }
}

/// Returns the reference loss of `batch` with its logits replaced by `logits`.
fn loss_at(batch: &RefBatch<'_>, logits: &[f64], params: &RefParams) -> f64 {
    let perturbed = RefBatch { logits, ..*batch };
    reference::forward(&perturbed, params).loss
}

fn random_case<T: TestFloat, L: TestLabel>(
    spec: Spec,
    seed: u64,
    config: DpoConfig,
    grad_loss: f32,
) {
    let mut rng = Rng::new(seed);
    let raw = RawBatch::random(&mut rng, &spec);
    check_all_backends_scaled::<T, L>(&raw, config, grad_loss);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_batches_match_reference(
        seed in any::<u64>(),
        pairs in 1usize..4,
        seq_len in 1usize..12,
        vocab in 1usize..90,
        padding in 0usize..5,
        mask_prob in 0.0f64..1.0,
        logit_std in 0.1f64..8.0,
        loss_index in 0usize..7,
        length_normalize in any::<bool>(),
        with_reference in any::<bool>(),
        beta in 0.01f32..2.0,
        grad_loss in -4.0f32..4.0,
    ) {
        let mut spec = Spec::new(pairs, seq_len, vocab).stride(vocab + padding).masked(mask_prob);
        spec.logit_std = logit_std;
        spec.with_reference = with_reference;
        let mut config = config_with(loss_kinds()[loss_index], length_normalize);
        config.beta = beta;
        for_each_dtype!(random_case(spec, seed, config, grad_loss));
    }
}
