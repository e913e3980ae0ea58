//! Log-softmax, target gather and masked per-sequence sums, seen through the DPO forward and
//! backward: shapes, padding, masking and hostile logit values. Every test runs on every
//! available backend, for f32, f16 and bf16 logits and i32 and i64 labels, and compares every
//! output and all three gradient modes with the f64 reference.

mod common;

use common::{
    check_all_backends, for_each_dtype, BatchStats, Inputs, RawBatch, Rng, Spec, TestFloat,
    TestLabel,
};
use dpo_kernels::{Batch, DpoConfig};

fn odd_shape<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(0x0dd);
    let raw = RawBatch::random(&mut rng, &Spec::new(3, 47, 123).masked(0.3));
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
}

#[test]
fn odd_shape_b3_t47_v123() {
    for_each_dtype!(odd_shape());
}

fn single_position<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(1);
    let raw = RawBatch::random(&mut rng, &Spec::new(1, 1, 5).masked(0.0));
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
}

#[test]
fn single_pair_single_position() {
    for_each_dtype!(single_position());
}

fn single_valid_token<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(2);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 9, 17).masked(1.0));
    // One valid token per sequence, each at a different position.
    for (row, t) in [(0, 0), (1, 8), (2, 4), (3, 5)] {
        let p = raw.position(row, t);
        raw.labels[p] = (3 * row + t) as i64 % 17;
    }
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
}

#[test]
fn single_valid_token_per_sequence() {
    for_each_dtype!(single_valid_token());
}

fn vocab_sizes<T: TestFloat, L: TestLabel>() {
    // Both sides of 8 and 16 (16-byte packs of f16 and f32) and of 64 (the CPU chunk).
    for vocab in [
        1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 257,
    ] {
        let mut rng = Rng::new(vocab as u64);
        let raw = RawBatch::random(&mut rng, &Spec::new(2, 3, vocab).masked(0.2));
        check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
    }
}

#[test]
fn vocab_sizes_around_pack_widths() {
    for_each_dtype!(vocab_sizes());
}

fn large_vocab<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(32000);
    let raw = RawBatch::random(&mut rng, &Spec::new(1, 3, 32000).masked(0.0));
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
}

#[test]
fn vocab_32000() {
    for_each_dtype!(large_vocab());
}

fn padded_vocab<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(3);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 5, 37).stride(48).masked(0.2));
    // Padded columns already contain junk up to +-1000. NaN and infinities are added because a
    // kernel that reads past V turns them into a NaN loss or a wrong max.
    raw.row_mut(0, 0)[40] = f32::NAN;
    raw.row_mut(1, 2)[37] = f32::INFINITY;
    raw.row_mut(3, 4)[47] = f32::NEG_INFINITY;
    raw.row_mut(2, 1)[37..].fill(1e30);
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.2));
}

#[test]
fn padded_vocab_with_junk() {
    for_each_dtype!(padded_vocab());
}

fn misaligned_stride<T: TestFloat, L: TestLabel>() {
    // Odd W puts every other row at an odd element offset, so no row after the first is
    // 16-byte aligned.
    for (vocab, stride) in [(30, 31), (31, 33), (64, 65), (9, 9), (127, 129)] {
        let mut rng = Rng::new(stride as u64);
        let raw = RawBatch::random(&mut rng, &Spec::new(2, 4, vocab).stride(stride));
        check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
    }
}

#[test]
fn misaligned_row_stride() {
    for_each_dtype!(misaligned_stride());
}

fn fully_masked<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(4);
    let spec = Spec::new(3, 5, 11).masked(0.0);
    let mut raw = RawBatch::random(&mut rng, &spec);
    // Pair 0: chosen fully masked; pair 1: rejected fully masked; pair 2: both. Their logits
    // are 50, which would dominate the sums if a masked row were counted.
    for row in [0, 4, 2, 5] {
        raw.mask_sequence(row, -100);
        for t in 0..5 {
            raw.row_mut(row, t).fill(50.0);
        }
    }
    for length_normalize in [false, true] {
        let mut config = DpoConfig::new(0.1);
        config.length_normalize = length_normalize;
        check_all_backends::<T, L>(&raw, config);
    }

    // A batch with no valid chosen or rejected position at all: logits/* metrics are 0.
    let mut raw = RawBatch::random(&mut rng, &Spec::new(1, 3, 4));
    raw.mask_sequence(0, -100);
    raw.mask_sequence(1, -100);
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
}

#[test]
fn fully_masked_sequences() {
    for_each_dtype!(fully_masked());
}

fn random_ignore_positions<T: TestFloat, L: TestLabel>() {
    for (seed, mask_prob) in [(5, 0.1), (6, 0.5), (7, 0.9)] {
        let mut rng = Rng::new(seed);
        let raw = RawBatch::random(&mut rng, &Spec::new(2, 19, 29).stride(32).masked(mask_prob));
        check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
    }
}

#[test]
fn random_ignore_index_positions() {
    for_each_dtype!(random_ignore_positions());
}

fn custom_ignore_index<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(8);
    let mut spec = Spec::new(2, 13, 21).masked(0.4);
    spec.ignore_index = -1;
    let raw = RawBatch::random(&mut rng, &spec);
    let mut config = DpoConfig::new(0.25);
    config.ignore_index = -1;
    check_all_backends::<T, L>(&raw, config);
}

#[test]
fn custom_ignore_index_minus_one() {
    for_each_dtype!(custom_ignore_index());
}

fn extreme_logits<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(9);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 6, 40).masked(0.0));
    // Scatter +-1e4 everywhere; a naive exp(x) overflows and x - lse in f32 loses every digit
    // of the target log-prob.
    for x in raw.logits.iter_mut() {
        if rng.chance(0.1) {
            *x = if rng.chance(0.5) { 1e4 } else { -1e4 };
        }
    }
    // Rows where the target is the +1e4 peak (log-prob ~0) and where it sits at -1e4 under a
    // +1e4 peak (log-prob ~-2e4).
    for (row, t) in [(0, 0), (1, 1), (2, 2)] {
        let p = raw.position(row, t);
        let y = raw.labels[p] as usize;
        raw.row_mut(row, t)[y] = 1e4;
    }
    for (row, t) in [(3, 3), (0, 4)] {
        let p = raw.position(row, t);
        let y = raw.labels[p] as usize;
        let x = raw.row_mut(row, t);
        x.fill(0.0);
        x[(y + 1) % 40] = 1e4;
        x[y] = -1e4;
    }
    for with_reference in [true, false] {
        let mut raw = raw.clone();
        if !with_reference {
            raw.reference = None;
        }
        check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
    }
}

#[test]
fn extreme_logits_1e4() {
    for_each_dtype!(extreme_logits());
}

fn tied_logits<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(10);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 4, 50).masked(0.0));
    // A constant row (every log-prob is -ln V), a row whose max is shared by the target and
    // 9 other columns, and a row of constant 1e4.
    raw.row_mut(0, 0).fill(5.5);
    {
        let p = raw.position(1, 1);
        let y = raw.labels[p] as usize;
        let x = raw.row_mut(1, 1);
        for col in (0..50).step_by(5) {
            x[col] = 8.0;
        }
        x[y] = 8.0;
    }
    raw.row_mut(2, 3).fill(1e4);
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
}

#[test]
fn tied_logits_in_a_row() {
    for_each_dtype!(tied_logits());
}

fn neg_inf_logits<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(11);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 5, 70).stride(72).masked(0.0));
    let mut neg_inf_cells = Vec::new();
    for row in 0..4 {
        for t in 0..5 {
            let p = raw.position(row, t);
            let y = raw.labels[p] as usize;
            // Row (0, 0): only the target is finite, so its log-prob is exactly 0. Others:
            // about half the non-target columns are -inf.
            let everything = row == 0 && t == 0;
            for col in 0..70 {
                if col != y && (everything || rng.chance(0.5)) {
                    raw.row_mut(row, t)[col] = f32::NEG_INFINITY;
                    neg_inf_cells.push(p * 72 + col);
                }
            }
        }
    }
    let config = DpoConfig::new(0.1);
    check_all_backends::<T, L>(&raw, config);

    // A -inf logit has probability 0, so its gradient is exactly 0.
    let inputs = Inputs::<T>::round(&raw);
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(
        inputs.shape,
        &inputs.logits,
        &labels,
        inputs.reference.as_deref(),
    );
    for backend in common::backends() {
        let dpo = backend.open(config);
        let out = dpo.forward(&batch).expect("forward");
        let mut grad = vec![f32::NAN; inputs.logits.len()];
        dpo.backward(&batch, &out.state, 1.0, &mut grad)
            .expect("backward");
        for &i in &neg_inf_cells {
            assert_eq!(grad[i], 0.0, "{}: gradient at -inf logit {i}", backend.name);
        }
    }
}

#[test]
fn neg_inf_logits_outside_target() {
    for_each_dtype!(neg_inf_logits());
}

fn masked_rows_unread<T: TestFloat, L: TestLabel>() {
    let mut rng = Rng::new(12);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 7, 24).stride(25).masked(0.4));
    // Poison every masked row; the forward must not read them and the backward must write
    // zeros there without reading them.
    for p in 0..raw.labels.len() {
        if raw.labels[p] == -100 {
            let w = raw.shape.row_stride;
            let fill = if p % 2 == 0 { f32::NAN } else { f32::INFINITY };
            raw.logits[p * w..(p + 1) * w].fill(fill);
        }
    }
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
}

#[test]
fn masked_rows_never_read() {
    for_each_dtype!(masked_rows_unread());
}

/// Prints the largest error of each output per dtype over a set of hard batches; run with
/// `cargo test --test token_logps -- --nocapture max_errors` to see the table.
#[test]
fn max_errors_per_dtype() {
    fn run<T: TestFloat, L: TestLabel>() -> BatchStats {
        let mut stats = BatchStats::default();
        let specs = [
            Spec::new(3, 47, 123).masked(0.3),
            Spec::new(2, 8, 1000).stride(1001),
            Spec::new(1, 2, 32000).masked(0.0),
        ];
        for (seed, spec) in specs.iter().enumerate() {
            let mut rng = Rng::new(100 + seed as u64);
            let raw = RawBatch::random(&mut rng, spec);
            for loss in common::loss_kinds() {
                for length_normalize in [false, true] {
                    let config = common::config_with(loss, length_normalize);
                    stats.merge(&check_all_backends::<T, L>(&raw, config));
                }
            }
        }
        stats
    }
    run::<f32, i64>().print("f32 logits: max error per output (all backends, all loss kinds)");
    run::<half::f16, i64>()
        .print("f16 logits: max error per output (all backends, all loss kinds)");
    run::<half::bf16, i64>()
        .print("bf16 logits: max error per output (all backends, all loss kinds)");
}
