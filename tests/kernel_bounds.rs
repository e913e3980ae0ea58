//! Shapes on both sides of every boundary in how the CUDA kernels split their work, with the
//! launch sizes of `src/cuda/params.rs`. Each test runs on every available backend, for f32,
//! f16 and bf16 logits and i32 and i64 labels unless its comment names fewer. It compares the
//! forward and all three backward modes with the f64 reference. The boundaries:
//!
//! - `token_logps_fwd` and `token_logps_bwd` give each row one warp while `V <= 1024`
//!   (8 rows per 256-thread block), one 256-thread block while `V <= 16384` and one
//!   512-thread block above that. Each row is read as a scalar head up to its first 16-byte
//!   boundary, 16-byte packs (4 f32 or 8 f16/bf16 values) and a scalar tail.
//! - `dpo_pairs_fwd` runs one block of 512 threads (16 warps). Each warp sums whole sequences
//!   with its lanes striding over T, and each thread then takes whole pairs.
//! - The token kernels cap the grid at `i32::MAX` blocks and loop over the remaining rows. A
//!   batch past that cap needs more than 2^31 - 1 rows of over 1024 logits, or 8 times as
//!   many shorter rows, far beyond what any test can allocate. So `grid_stride` below
//!   launches the kernels with a smaller grid instead (emulator only).

mod common;

use common::reference::{self, RefParams};
use common::{
    assert_close_at, assert_zero_outside_valid, backends, check_all_backends, for_each_dtype,
    grad_index, Inputs, RawBatch, RefData, Rng, Spec, TestFloat, TestLabel, Tolerances,
};
use dpo_kernels::{Batch, DpoConfig};
use half::{bf16, f16};

/// Draws a batch from `spec` with `seed` and checks it on every backend.
fn check_random<T: TestFloat, L: TestLabel>(seed: u64, spec: &Spec) {
    let mut rng = Rng::new(seed);
    let raw = RawBatch::random(&mut rng, spec);
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
}

fn warp_block_switch<T: TestFloat, L: TestLabel>() {
    // V <= 1024 gets one warp per row, V = 1025 one 256-thread block. 12 positions fill one
    // warp-per-row block and half of a second one.
    for vocab in [1023, 1024, 1025] {
        check_random::<T, L>(vocab as u64, &Spec::new(2, 3, vocab).masked(0.2));
    }
}

#[test]
fn vocab_at_warp_to_block_switch() {
    for_each_dtype!(warp_block_switch());
}

fn block_size_switch<T: TestFloat, L: TestLabel>() {
    // V = 16384 is the last row on 256 threads, V = 16385 the first on 512.
    for vocab in [16384, 16385] {
        check_random::<T, L>(vocab as u64, &Spec::new(1, 2, vocab).masked(0.0));
    }
}

#[test]
fn vocab_at_256_to_512_threads() {
    for_each_dtype!(block_size_switch());
}

fn below_one_pack<T: TestFloat, L: TestLabel>() {
    // Rows shorter than one 16-byte pack (V < 8 halves, V < 4 floats) are all head or tail,
    // and V = 8 (4 floats) is exactly one pack. Most lanes of the row's warp get no column.
    for vocab in 1..=8 {
        for stride in [vocab, vocab + 1] {
            let spec = Spec::new(2, 3, vocab).stride(stride).masked(0.2);
            check_random::<T, L>((vocab * 100 + stride) as u64, &spec);
        }
    }
}

#[test]
fn vocab_below_one_pack() {
    for_each_dtype!(below_one_pack());
}

fn misaligned_rows<T: TestFloat, L: TestLabel>() {
    // Row p starts p * W elements after a 256-byte aligned buffer. An odd W leaves every
    // row whose index is not a multiple of 16 / sizeof(T) off the 16-byte grid, with heads
    // that vary from row to row. The even W = 1026 still misaligns every other f32 row and
    // three in four f16 and bf16 rows. The pairs cover the warp path, both block sizes and
    // both sides of each switch.
    let strides = [
        (5, 7),
        (8, 9),
        (1023, 1023),
        (1024, 1025),
        (1025, 1025),
        (1025, 1026),
        (16384, 16385),
        (16385, 16385),
    ];
    for (vocab, stride) in strides {
        let spec = Spec::new(1, 4, vocab).stride(stride).masked(0.2);
        check_random::<T, L>(stride as u64, &spec);
    }
}

#[test]
fn misaligned_row_starts() {
    for_each_dtype!(misaligned_rows());
}

fn positions_per_block<T: TestFloat, L: TestLabel>() {
    // A warp-per-row block owns 8 rows: P = 2, 4, 6 leave warps of the only block idle,
    // P = 8 fills it, P = 10 and 18 start a partly filled block. P = 2B * T is even.
    for (pairs, seq_len) in [(1, 1), (2, 1), (1, 3), (1, 4), (1, 5), (3, 3)] {
        let spec = Spec::new(pairs, seq_len, 9).masked(0.2);
        check_random::<T, L>((pairs * 10 + seq_len) as u64, &spec);
    }
    // One block per row: a single pair of single positions.
    check_random::<T, L>(1025, &Spec::new(1, 1, 1025).masked(0.0));
}

#[test]
fn positions_around_rows_per_block() {
    for_each_dtype!(positions_per_block());
}

fn pairs_per_block<T: TestFloat, L: TestLabel>() {
    // The pair kernel has 16 warps: 2B = 16 gives each one sequence, 2B = 18 gives warps 0
    // and 1 a second one. B = 511, 512 and 513 put one pair per thread with one thread
    // idle, every thread busy, and thread 0 taking a second pair. Length normalisation makes
    // each c[r] depend on its own sequence's valid count, which the pair threads read from
    // other warps' sums.
    let mut config = DpoConfig::new(0.1);
    config.length_normalize = true;
    for pairs in [8, 9, 511, 512, 513] {
        let mut rng = Rng::new(pairs as u64);
        let raw = RawBatch::random(&mut rng, &Spec::new(pairs, 2, 3).masked(0.3));
        check_all_backends::<T, L>(&raw, config);
    }
}

// The pair kernel reads only the token kernel's per-position f64 values and statuses, so the
// logits and label dtypes do not reach it. One dtype keeps the 1000-sequence batches fast in
// the emulator.
#[test]
fn pairs_around_pair_block_size() {
    pairs_per_block::<f32, i64>();
}

fn seq_len_per_warp<T: TestFloat, L: TestLabel>() {
    // The 32 lanes of a warp stride over the T positions of a sequence: T = 1 leaves 31
    // lanes without a position, T = 33 gives lane 0 a second one.
    for seq_len in [1, 31, 32, 33, 64, 65] {
        check_random::<T, L>(seq_len as u64, &Spec::new(2, seq_len, 6).masked(0.2));
    }
}

// As for the pair counts, the dtypes do not reach the per-sequence sums.
#[test]
fn seq_len_around_warp_width() {
    seq_len_per_warp::<f32, i64>();
}

fn masked_blocks<T: TestFloat, L: TestLabel>() {
    // B = 2, T = 4: sequences 0 and 1 are the 8 rows of the first warp-per-row block, so
    // every warp of that block meets only masked rows. Their logits are NaN, which any read
    // would carry into the outputs.
    let mut rng = Rng::new(40);
    let mut raw = RawBatch::random(&mut rng, &Spec::new(2, 4, 20).masked(0.0));
    for row in [0, 1] {
        raw.mask_sequence(row, -100);
        for t in 0..4 {
            raw.row_mut(row, t).fill(f32::NAN);
        }
    }
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));

    // The same with one block per row, and the last block masked instead of the first.
    let mut raw = RawBatch::random(&mut rng, &Spec::new(1, 2, 1025).masked(0.0));
    raw.mask_sequence(1, -100);
    for t in 0..2 {
        raw.row_mut(1, t).fill(f32::NAN);
    }
    check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
}

#[test]
fn fully_masked_row_blocks() {
    for_each_dtype!(masked_blocks());
}

fn edge_labels<T: TestFloat, L: TestLabel>() {
    // Label 0 sits in the head or the first pack, label V - 1 in the tail or the last pack.
    // Half of the labelled rows, with either label, raise their label 20 above the row max,
    // so the target's probability is close to 1 and its gradient is the cancelling
    // c * (1 - p).
    let shapes = [
        (1, 1),
        (2, 2),
        (7, 8),
        (8, 8),
        (9, 10),
        (1023, 1023),
        (1024, 1024),
        (1025, 1026),
        (16385, 16385),
    ];
    for (vocab, stride) in shapes {
        let mut rng = Rng::new(vocab as u64 + 7);
        let mut raw = RawBatch::random(&mut rng, &Spec::new(1, 4, vocab).stride(stride));
        let mut k = 0;
        for p in 0..raw.labels.len() {
            if raw.labels[p] == -100 {
                continue;
            }
            let label = if k % 2 == 0 { 0 } else { vocab - 1 };
            raw.labels[p] = label as i64;
            if k % 4 < 2 {
                let row = &mut raw.logits[p * stride..p * stride + vocab];
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                row[label] = max + 20.0;
            }
            k += 1;
        }
        check_all_backends::<T, L>(&raw, DpoConfig::new(0.1));
    }
}

#[test]
fn labels_at_first_and_last_column() {
    for_each_dtype!(edge_labels());
}

/// Runs the forward of `raw` rounded to `T` on every backend, then the backward into a
/// gradient of type `G`, and compares it with the f64 reference at `G`'s tolerance.
fn check_grad_into<T: TestFloat, G: TestFloat>(raw: &RawBatch) {
    let config = DpoConfig::new(0.1);
    let inputs = Inputs::<T>::round(raw);
    let shape = inputs.shape;
    let batch = Batch::new(
        shape,
        &inputs.logits,
        &inputs.labels,
        inputs.reference.as_deref(),
    );

    let params = RefParams::from_config(&config);
    let data = RefData::new(&inputs);
    let fwd = reference::forward(&data.batch(), &params);
    let tol = Tolerances::new(&fwd, &params);
    let grad_ref = reference::gradient(&data.batch(), &params, &fwd, 1.0);
    let per_seq = shape.seq_len * shape.row_stride;
    let atol: Vec<f64> = (0..grad_ref.len())
        .map(|i| tol.grad_atol(&fwd, i / per_seq, 1.0, G::MIN_SUBNORMAL))
        .collect();
    let abs_ref: Vec<f64> = grad_ref.iter().map(|g| g.abs()).collect();

    for backend in backends() {
        let name = format!(
            "{}/{} logits, V = {}, W = {}: grad into {}",
            backend.name,
            T::NAME,
            shape.vocab,
            shape.row_stride,
            G::NAME
        );
        let dpo = backend.open(config);
        let out = dpo
            .forward(&batch)
            .unwrap_or_else(|err| panic!("{name}: forward failed: {err}"));

        let mut grad = vec![G::round(f32::NAN); shape.logits_len()];
        dpo.backward(&batch, &out.state, 1.0, &mut grad)
            .unwrap_or_else(|err| panic!("{name}: backward failed: {err}"));

        let got: Vec<f64> = grad.iter().map(|&g| g.widen()).collect();
        let index = grad_index(&shape);
        assert_close_at(&name, &got, &grad_ref, &atol, G::GRAD_RTOL, &abs_ref, index);
        assert_zero_outside_valid(&name, &got, &shape, &inputs.labels, config.ignore_index);
    }
}

#[test]
fn grad_into_other_dtypes() {
    // A gradient type other than f32 and the logits type changes the store width per pack:
    // 4 f32 logits go out as 8 bytes of f16 or bf16, and 8 f16 or bf16 logits as 16 bytes
    // of the other 16-bit type. The shapes put rows below one pack and off the 16-byte grid,
    // on the warp path and on both block sizes. Labels are i64, since they do not reach the
    // stores.
    let shapes = [
        (3, 3),
        (5, 7),
        (8, 9),
        (37, 39),
        (1025, 1027),
        (16385, 16385),
    ];
    for (vocab, stride) in shapes {
        let mut rng = Rng::new(stride as u64 + 60);
        let raw = RawBatch::random(&mut rng, &Spec::new(1, 3, vocab).stride(stride));
        check_grad_into::<f32, f16>(&raw);
        check_grad_into::<f32, bf16>(&raw);
        check_grad_into::<f16, bf16>(&raw);
        check_grad_into::<bf16, f16>(&raw);
    }
}

/// The token kernels launched with fewer blocks than rows need, so each block's grid-stride
/// loop takes several rows. The public API never does this below the `i32::MAX` block cap, so
/// these tests call the emulator directly with copies of the kernels' parameter structs. The
/// results must match a full-grid launch bit for bit, because a row's result must not depend
/// on which block or loop trip computes it.
#[cfg(feature = "emulator")]
mod grid_stride {
    use bytemuck::{Pod, Zeroable};
    use dpo_kernels::cuda::emu::{EmuBuffer, EmuRuntime};

    use super::common::Rng;

    /// Copy of `TokenLogpsFwdParams` in `kernels/common.cuh`. The emulator rejects a launch
    /// whose parameter size differs from the kernel's.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
    struct FwdParams {
        logits: u64,
        labels: u64,
        row_max: u64,
        row_log_sum: u64,
        target_logp: u64,
        logit_sum: u64,
        fault_info: u64,
        status: u64,
        ignore_index: i64,
        positions: i64,
        vocab: i64,
        row_stride: i64,
        warp_per_row: i32,
        reserved: i32,
    }

    /// Copy of `TokenLogpsBwdParams` in `kernels/common.cuh`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
    struct BwdParams {
        logits: u64,
        labels: u64,
        row_max: u64,
        row_log_sum: u64,
        seq_coef: u64,
        grad: u64,
        ignore_index: i64,
        positions: i64,
        seq_len: i64,
        vocab: i64,
        row_stride: i64,
        grad_loss: f32,
        warp_per_row: i32,
    }

    const IGNORE_INDEX: i64 = -100;

    /// Everything one forward and backward writes, as raw bits (integers widened to u64), so
    /// NaN compares equal.
    struct Outputs {
        per_row: [(&'static str, Vec<u64>); 6],
        grad: Vec<u64>,
    }

    /// Panics with the count and the first index where `got` and `want` differ.
    fn assert_same_bits(name: &str, got: &[u64], want: &[u64]) {
        assert_eq!(got.len(), want.len(), "{name}: length");
        let differing: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
        if let Some(&first) = differing.first() {
            panic!(
                "{name}: {} of {} elements differ; first at [{first}]: got bits {:#x}, want {:#x}",
                differing.len(),
                got.len(),
                got[first],
                want[first]
            );
        }
    }

    fn upload<T: Pod>(runtime: &EmuRuntime, values: &[T]) -> EmuBuffer<T> {
        let mut buffer = runtime.alloc_zeroed::<T>(values.len()).unwrap();
        runtime.copy_to_buffer(values, &mut buffer).unwrap();
        buffer
    }

    fn download<T: Pod + Default>(runtime: &EmuRuntime, buffer: &EmuBuffer<T>) -> Vec<T> {
        let mut host = vec![T::default(); buffer.len()];
        runtime.copy_from_buffer(buffer, &mut host).unwrap();
        host
    }

    /// Runs `token_logps_fwd_f32_i64` and `token_logps_bwd_f32_i64_f32` on `grid` blocks of
    /// `threads` threads, with one sequence per position (T = 1).
    fn run(
        logits: &[f32],
        labels: &[i64],
        vocab: usize,
        stride: usize,
        warp_per_row: bool,
        grid: u32,
        threads: u32,
    ) -> Outputs {
        let positions = labels.len();
        let runtime = EmuRuntime::new();
        let logits_buf = upload(&runtime, logits);
        let labels_buf = upload(&runtime, labels);
        let row_max = runtime.alloc_zeroed::<f32>(positions).unwrap();
        let row_log_sum = runtime.alloc_zeroed::<f32>(positions).unwrap();
        let target_logp = runtime.alloc_zeroed::<f64>(positions).unwrap();
        let logit_sum = runtime.alloc_zeroed::<f64>(positions).unwrap();
        let fault_info = runtime.alloc_zeroed::<i64>(positions).unwrap();
        let status = runtime.alloc_zeroed::<i32>(positions).unwrap();
        let coef: Vec<f32> = (0..positions).map(|p| 0.25 - 0.125 * p as f32).collect();
        let seq_coef = upload(&runtime, &coef);
        let grad = upload(&runtime, &vec![f32::NAN; logits.len()]);

        let fwd = FwdParams {
            logits: runtime.buffer_address(&logits_buf),
            labels: runtime.buffer_address(&labels_buf),
            row_max: runtime.buffer_address(&row_max),
            row_log_sum: runtime.buffer_address(&row_log_sum),
            target_logp: runtime.buffer_address(&target_logp),
            logit_sum: runtime.buffer_address(&logit_sum),
            fault_info: runtime.buffer_address(&fault_info),
            status: runtime.buffer_address(&status),
            ignore_index: IGNORE_INDEX,
            positions: positions as i64,
            vocab: vocab as i64,
            row_stride: stride as i64,
            warp_per_row: i32::from(warp_per_row),
            reserved: 0,
        };
        let bwd = BwdParams {
            logits: fwd.logits,
            labels: fwd.labels,
            row_max: fwd.row_max,
            row_log_sum: fwd.row_log_sum,
            seq_coef: runtime.buffer_address(&seq_coef),
            grad: runtime.buffer_address(&grad),
            ignore_index: IGNORE_INDEX,
            positions: positions as i64,
            seq_len: 1,
            vocab: vocab as i64,
            row_stride: stride as i64,
            grad_loss: 1.0,
            warp_per_row: i32::from(warp_per_row),
        };
        let dims = ((grid, 1, 1), (threads, 1, 1));
        // SAFETY: every address is a live buffer of `runtime` with P rows of W logits, P
        // labels, P elements of each per-row output and P sequence coefficients (T = 1). The
        // kernels visit rows below P and columns below W, and gather a label's column only
        // when it lies in [0, V).
        unsafe {
            runtime
                .launch_params(
                    "token_logps.cu",
                    "token_logps_fwd_f32_i64",
                    dims.0,
                    dims.1,
                    0,
                    &fwd,
                )
                .unwrap();
            runtime
                .launch_params(
                    "token_logps.cu",
                    "token_logps_bwd_f32_i64_f32",
                    dims.0,
                    dims.1,
                    0,
                    &bwd,
                )
                .unwrap();
        }
        let bits32 = |values: Vec<f32>| values.iter().map(|x| u64::from(x.to_bits())).collect();
        let bits64 = |values: Vec<f64>| values.iter().map(|x| x.to_bits()).collect();
        let ints = |values: Vec<i64>| values.iter().map(|&x| x as u64).collect();
        let status: Vec<i32> = download(&runtime, &status);
        Outputs {
            per_row: [
                ("row_max", bits32(download(&runtime, &row_max))),
                ("row_log_sum", bits32(download(&runtime, &row_log_sum))),
                ("target_logp", bits64(download(&runtime, &target_logp))),
                ("logit_sum", bits64(download(&runtime, &logit_sum))),
                ("fault_info", ints(download(&runtime, &fault_info))),
                ("status", status.iter().map(|&x| x as u64).collect()),
            ],
            grad: bits32(download(&runtime, &grad)),
        }
    }

    /// Draws P rows of W logits (junk in padded columns) and labels with a fifth masked.
    fn random_rows(
        seed: u64,
        positions: usize,
        vocab: usize,
        stride: usize,
    ) -> (Vec<f32>, Vec<i64>) {
        let mut rng = Rng::new(seed);
        let mut logits = Vec::with_capacity(positions * stride);
        let mut labels = Vec::with_capacity(positions);
        for _ in 0..positions {
            for col in 0..stride {
                let x = if col < vocab {
                    2.0 * rng.normal()
                } else {
                    rng.uniform_in(-1e3, 1e3)
                };
                logits.push(x as f32);
            }
            labels.push(if rng.chance(0.2) {
                IGNORE_INDEX
            } else {
                rng.below(vocab) as i64
            });
        }
        (logits, labels)
    }

    /// Checks that every grid in `grids` gives the outputs of the full grid `full`.
    fn check_grids(
        seed: u64,
        positions: usize,
        (vocab, stride): (usize, usize),
        warp_per_row: bool,
        threads: u32,
        full: u32,
        grids: &[u32],
    ) {
        let (logits, labels) = random_rows(seed, positions, vocab, stride);
        let want = run(&logits, &labels, vocab, stride, warp_per_row, full, threads);
        let (_, status) = &want.per_row[5];
        assert!(
            status.iter().all(|&s| s <= 1),
            "the full grid left a status other than MASKED or VALID: {status:?}"
        );
        for &grid in grids {
            let got = run(&logits, &labels, vocab, stride, warp_per_row, grid, threads);
            let case = format!("P = {positions}, V = {vocab}, W = {stride}, {grid} blocks");
            for ((name, got), (_, want)) in got.per_row.iter().zip(&want.per_row) {
                assert_same_bits(&format!("{case}: {name}"), got, want);
            }
            assert_same_bits(&format!("{case}: grad"), &got.grad, &want.grad);
        }
    }

    #[test]
    fn warp_per_row_loop_wraps() {
        // 29 rows need 4 blocks of 8 warps. With 1 to 3 blocks each warp takes 1 to 4 rows,
        // and some warps of a block run one trip fewer than others.
        check_grids(50, 29, (37, 39), true, 256, 4, &[1, 2, 3]);
    }

    #[test]
    fn block_per_row_loop_wraps() {
        // 5 rows of one block each: 2 blocks take 3 and 2 rows, 1 block takes all of them.
        check_grids(51, 5, (1025, 1027), false, 256, 5, &[1, 2]);
    }
}
