//! The real kernels through `Cuda::emulated()`, on small batches, compared with the f64
//! reference, next to the CPU backend on the same inputs: every dtype, both label types,
//! backward into f32, into the logits dtype and in place.
//!
//! Each case runs in a fresh emulated backend, so the launch code sizes every device buffer to
//! the batch exactly and the guards sit right after the last element.

use dpo_kernels::{Backend, Batch, BatchShape, Cpu, Cuda, DpoConfig, Element, Label, LossKind};
use half::{bf16, f16};

use crate::check::{assert_close, max_diff, GradTolerance};
use crate::reference::{reference, Reference};

/// Label types, built from the i64 labels the generator makes.
trait TestLabel: Label {
    fn from_i64(value: i64) -> Self;
}

impl TestLabel for i32 {
    fn from_i64(value: i64) -> Self {
        i32::try_from(value).expect("labels fit i32")
    }
}

impl TestLabel for i64 {
    fn from_i64(value: i64) -> Self {
        value
    }
}

/// Which positions are masked out.
#[derive(Clone, Copy, Debug)]
enum Mask {
    /// About one position in five, at pseudo-random places, plus every position of row 1.
    RandomAndRowOne,
    /// No position.
    None,
    /// Every position.
    All,
}

/// How the logits are drawn.
#[derive(Clone, Copy, Debug)]
enum Logits {
    /// Roughly normal with standard deviation 3.
    Normal,
    /// +-1e4 with random signs, several ties at the row max.
    Extreme,
}

struct Case {
    name: &'static str,
    shape: BatchShape,
    config: DpoConfig,
    mask: Mask,
    logits: Logits,
    with_reference: bool,
    grad_loss: f32,
}

/// A small deterministic generator (64-bit LCG, high bits out).
struct Rng(u64);

impl Rng {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as u32
    }

    fn uniform(&mut self) -> f32 {
        self.next_u32() as f32 / (1u64 << 31) as f32
    }

    fn below(&mut self, n: usize) -> usize {
        self.next_u32() as usize % n
    }
}

/// Inputs of one case in f32 (padded columns hold NaN, which no kernel may read) plus i64
/// labels and reference log-probs.
fn generate(case: &Case, seed: u64) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
    let shape = case.shape;
    let mut rng = Rng(seed);
    let mut logits = vec![f32::NAN; shape.logits_len()];
    for p in 0..shape.positions() {
        for col in 0..shape.vocab {
            logits[p * shape.row_stride + col] = match case.logits {
                Logits::Normal => (0..4).map(|_| rng.uniform()).sum::<f32>() * 5.2 - 10.4,
                Logits::Extreme => {
                    if rng.below(2) == 0 {
                        1e4
                    } else {
                        -1e4
                    }
                }
            };
        }
    }
    let labels: Vec<i64> = (0..shape.positions())
        .map(|p| {
            let masked = match case.mask {
                Mask::RandomAndRowOne => p / shape.seq_len == 1 || rng.below(5) == 0,
                Mask::None => false,
                Mask::All => true,
            };
            if masked {
                case.config.ignore_index
            } else {
                rng.below(shape.vocab) as i64
            }
        })
        .collect();
    let reference = (0..shape.sequences())
        .map(|_| -(rng.uniform() * 40.0))
        .collect();
    (logits, labels, reference)
}

/// One backend's outputs flattened to f32, for the emulator-vs-CPU summary.
#[derive(Default)]
struct Outputs {
    forward: Vec<f32>,
    grad_f32: Vec<f32>,
    grad_native: Vec<f32>,
    grad_in_place: Vec<f32>,
}

/// Runs the forward and the three backward variants on `backend` and checks each output
/// against `want`. Returns the outputs flattened to f32 for the emulator-vs-CPU summary.
fn run_backend<B: Backend, T: Element + GradTolerance, L: Label>(
    backend: &B,
    case: &Case,
    logits: &[T],
    labels: &[L],
    reference_logps: Option<&[f32]>,
    want: &Reference,
) -> Outputs {
    let shape = case.shape;
    let b = shape.pairs;
    let beta = case.config.beta as f64;
    let label = format!(
        "{} {} {} on {}",
        case.name,
        T::DTYPE,
        L::NAME,
        backend.name()
    );
    let batch = Batch::new(shape, logits, labels, reference_logps);
    let out = backend
        .forward(&batch, &case.config)
        .unwrap_or_else(|e| panic!("{label}: forward failed: {e}"));

    // 1. Forward outputs. An error of 1e-5 * sum |lp| in each sequence sum moves z by up to
    //    `pair_scale` and the loss and l' by that times their slope.
    let pair_scale: Vec<f64> = (0..b)
        .map(|i| 1e-5 * (want.seq_scale[i] + want.seq_scale[b + i]))
        .collect();
    let slope = |i: usize| beta.max(want.dloss_dz[i].abs());
    let curve = beta.max(want.curvature);
    let seq_tol = |r: usize| 1e-6 + 1e-5 * want.seq_scale[r];
    assert_close(
        &format!("{label}: chosen_logps"),
        &out.chosen_logps,
        &want.seq_logp[..b],
        seq_tol,
    );
    assert_close(
        &format!("{label}: rejected_logps"),
        &out.rejected_logps,
        &want.seq_logp[b..],
        |i| seq_tol(b + i),
    );
    assert_close(
        &format!("{label}: losses"),
        &out.losses,
        &want.losses,
        |i| 1e-6 + 1e-5 * want.losses[i].abs() + pair_scale[i] * slope(i),
    );
    let mean_loss_slack = (0..b).map(|i| pair_scale[i] * slope(i)).sum::<f64>() / b as f64;
    assert_close(&format!("{label}: loss"), &[out.loss], &[want.loss], |_| {
        1e-6 + 1e-5 * want.loss.abs() + mean_loss_slack
    });
    assert_close(
        &format!("{label}: dloss_dmargin"),
        &out.dloss_dmargin,
        &want.dloss_dz,
        |i| 1e-6 + 1e-5 * want.dloss_dz[i].abs() + pair_scale[i] * curve,
    );
    let reward_tol = |value: f64, scale: f64| 1e-6 + 1e-5 * value.abs() + beta * 1e-5 * scale;
    assert_close(
        &format!("{label}: chosen_rewards"),
        &out.chosen_rewards,
        &want.chosen_rewards,
        |i| reward_tol(want.chosen_rewards[i], want.seq_scale[i]),
    );
    assert_close(
        &format!("{label}: rejected_rewards"),
        &out.rejected_rewards,
        &want.rejected_rewards,
        |i| reward_tol(want.rejected_rewards[i], want.seq_scale[b + i]),
    );
    let m = &out.metrics;
    let got_metrics = [
        m.rewards_chosen,
        m.rewards_rejected,
        m.rewards_accuracy,
        m.rewards_margin,
        m.logps_chosen,
        m.logps_rejected,
        m.logits_chosen,
        m.logits_rejected,
    ];
    let half_scale =
        |half: usize| want.seq_scale[half * b..(half + 1) * b].iter().sum::<f64>() / b as f64;
    let metric_tol = |k: usize| match k {
        0 | 1 => reward_tol(want.metrics[k], half_scale(k)),
        // A fraction of pairs, rounded to f32.
        2 => f32::EPSILON as f64,
        3 => reward_tol(want.metrics[k], half_scale(0) + half_scale(1)),
        4 | 5 => 1e-6 + 1e-5 * half_scale(k - 4),
        _ => 1e-6 + 1e-5 * want.logits_scale[k - 6],
    };
    assert_close(
        &format!("{label}: metrics"),
        &got_metrics,
        &want.metrics,
        metric_tol,
    );

    // 2. Gradients. An error in c[r] adds up to |grad_loss| * (curve * pair_scale / B).
    let gl = case.grad_loss as f64;
    let want_grad: Vec<f64> = want.grad.iter().map(|g| g * gl).collect();
    let t = shape.seq_len;
    let w = shape.row_stride;
    let grad_tol = |rtol: f64| {
        let want_grad = &want_grad;
        let pair_scale = &pair_scale;
        move |i: usize| {
            let pair = (i / (t * w)) % b;
            1e-5 * gl.abs()
                + gl.abs() * curve * pair_scale[pair] / b as f64
                + rtol * want_grad[i].abs()
        }
    };
    let mut grad_native = vec![T::default(); shape.logits_len()];
    backend
        .backward(&batch, &out.state, case.grad_loss, &mut grad_native)
        .unwrap_or_else(|e| panic!("{label}: backward into {} failed: {e}", T::DTYPE));
    let grad_native: Vec<f32> = grad_native.iter().map(|g| g.to_f32()).collect();
    assert_close(
        &format!("{label}: grad into {}", T::DTYPE),
        &grad_native,
        &want_grad,
        grad_tol(T::RTOL),
    );
    let mut grad_f32 = vec![0.0f32; shape.logits_len()];
    backend
        .backward(&batch, &out.state, case.grad_loss, &mut grad_f32)
        .unwrap_or_else(|e| panic!("{label}: backward into f32 failed: {e}"));
    assert_close(
        &format!("{label}: grad into f32"),
        &grad_f32,
        &want_grad,
        grad_tol(f32::RTOL),
    );
    let mut in_place = logits.to_vec();
    backend
        .backward_in_place(shape, &mut in_place, labels, &out.state, case.grad_loss)
        .unwrap_or_else(|e| panic!("{label}: backward in place failed: {e}"));
    let in_place: Vec<f32> = in_place.iter().map(|g| g.to_f32()).collect();
    assert_close(
        &format!("{label}: grad in place"),
        &in_place,
        &want_grad,
        grad_tol(T::RTOL),
    );

    let mut forward = vec![out.loss];
    for part in [
        &out.losses,
        &out.chosen_logps,
        &out.rejected_logps,
        &out.chosen_rewards,
        &out.rejected_rewards,
        &out.dloss_dmargin,
    ] {
        forward.extend_from_slice(part);
    }
    forward.extend_from_slice(&got_metrics);
    Outputs {
        forward,
        grad_f32,
        grad_native,
        grad_in_place: in_place,
    }
}

/// Runs one case in dtype `T` with labels `L` on the emulator and the CPU.
fn run_case<T: Element + GradTolerance, L: TestLabel>(case: &Case, seed: u64) {
    let (logits_f32, labels_i64, reference_logps) = generate(case, seed);
    let logits: Vec<T> = logits_f32.iter().map(|&x| T::from_f32(x)).collect();
    let labels: Vec<L> = labels_i64.iter().map(|&y| L::from_i64(y)).collect();
    let widened: Vec<f64> = logits.iter().map(|x| x.to_f32() as f64).collect();
    let reference_logps = case.with_reference.then_some(reference_logps);
    let want = reference(
        case.shape,
        &widened,
        &labels_i64,
        reference_logps.as_deref(),
        &case.config,
    );
    let emulated = Cuda::emulated().expect("the emulator is always available");
    let emu = run_backend(
        &emulated,
        case,
        &logits,
        &labels,
        reference_logps.as_deref(),
        &want,
    );
    let cpu = run_backend(
        &Cpu,
        case,
        &logits,
        &labels,
        reference_logps.as_deref(),
        &want,
    );
    let summary = [
        ("forward", max_diff(&emu.forward, &cpu.forward)),
        ("grad f32", max_diff(&emu.grad_f32, &cpu.grad_f32)),
        ("grad native", max_diff(&emu.grad_native, &cpu.grad_native)),
        (
            "grad in place",
            max_diff(&emu.grad_in_place, &cpu.grad_in_place),
        ),
    ];
    let mut line = format!("{} {} {}: emulator vs cpu", case.name, T::DTYPE, L::NAME);
    for (what, diff) in summary {
        assert_eq!(
            diff.nan_mismatch, 0,
            "{}: {what}: NaN in one backend only",
            case.name
        );
        line += &format!(
            "; {what} max abs {:.2e}, max rel {:.2e}",
            diff.max_abs, diff.max_rel
        );
    }
    println!("{line}");
}

/// Runs a case for every logits dtype and both label types.
fn run_all(case: &Case, seed: u64) {
    run_case::<f32, i64>(case, seed);
    run_case::<f32, i32>(case, seed);
    run_case::<f16, i64>(case, seed);
    run_case::<f16, i32>(case, seed);
    run_case::<bf16, i64>(case, seed);
    run_case::<bf16, i32>(case, seed);
}

fn shape(pairs: usize, seq_len: usize, vocab: usize, row_stride: usize) -> BatchShape {
    BatchShape {
        pairs,
        seq_len,
        vocab,
        row_stride,
    }
}

#[test]
fn odd_shape_with_masks() {
    // W = V = 123: rows start at every alignment, so heads, packs and tails all run.
    let case = Case {
        name: "B=3 T=47 V=123",
        shape: shape(3, 47, 123, 123),
        config: DpoConfig::new(0.1),
        mask: Mask::RandomAndRowOne,
        logits: Logits::Normal,
        with_reference: true,
        grad_loss: 1.0,
    };
    run_all(&case, 1);
}

#[test]
fn single_pair_single_position() {
    let case = Case {
        name: "B=1 T=1 V=123",
        shape: shape(1, 1, 123, 123),
        config: DpoConfig::new(0.5),
        mask: Mask::None,
        logits: Logits::Normal,
        with_reference: false,
        grad_loss: 1.0,
    };
    run_all(&case, 2);
}

#[test]
fn padded_vocabulary_with_label_smoothing() {
    // Padded columns hold NaN: reading one would poison the row's softmax.
    let mut config = DpoConfig::new(0.2);
    config.loss = LossKind::Sigmoid {
        label_smoothing: 0.2,
    };
    let case = Case {
        name: "B=2 T=9 V=123 W=136",
        shape: shape(2, 9, 123, 136),
        config,
        mask: Mask::RandomAndRowOne,
        logits: Logits::Normal,
        with_reference: true,
        grad_loss: 0.5,
    };
    run_all(&case, 3);
}

#[test]
fn extreme_logits_with_ipo() {
    let mut config = DpoConfig::new(0.1);
    config.loss = LossKind::Ipo;
    config.length_normalize = true;
    let case = Case {
        name: "B=2 T=5 V=123 +-1e4",
        shape: shape(2, 5, 123, 123),
        config,
        mask: Mask::RandomAndRowOne,
        logits: Logits::Extreme,
        with_reference: true,
        grad_loss: 1.0,
    };
    run_all(&case, 4);
}

#[test]
fn fully_masked_batch() {
    let mut config = DpoConfig::new(0.1);
    config.loss = LossKind::Robust {
        label_smoothing: 0.1,
    };
    let case = Case {
        name: "B=2 T=4 all masked",
        shape: shape(2, 4, 123, 128),
        config,
        mask: Mask::All,
        logits: Logits::Normal,
        with_reference: true,
        grad_loss: 1.0,
    };
    run_all(&case, 5);
}

#[test]
fn block_per_row_vocabulary() {
    // V > 1024 selects the one-block-per-row kernels with their block reduction.
    let mut config = DpoConfig::new(0.1);
    config.loss = LossKind::Hinge;
    let case = Case {
        name: "B=1 T=3 V=1500 W=1504",
        shape: shape(1, 3, 1500, 1504),
        config,
        mask: Mask::None,
        logits: Logits::Normal,
        with_reference: true,
        grad_loss: 2.0,
    };
    run_all(&case, 6);
}

#[test]
fn large_block_vocabulary() {
    // V > 16384 selects 512-thread blocks.
    let case = Case {
        name: "B=1 T=2 V=17001",
        shape: shape(1, 2, 17001, 17001),
        config: DpoConfig::new(0.1),
        mask: Mask::None,
        logits: Logits::Normal,
        with_reference: true,
        grad_loss: 1.0,
    };
    run_case::<f32, i64>(&case, 7);
    run_case::<bf16, i32>(&case, 7);
}
