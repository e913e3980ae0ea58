//! Harness self-tests: each kernel of `emu/tests/broken.cu` has one bug, and each test shows
//! that the emulator catches it, as an error or as a wrong result that a comparison sees.

use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use dpo_kernels::cuda::emu::{EmuBuffer, EmuRuntime};
use dpo_kernels::{Error, Result};

/// Mirror of `BrokenParams` in `emu/tests/broken.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct BrokenParams {
    input: u64,
    out: u64,
    n: i64,
    cols: i64,
    stride: i64,
    iterations: i64,
}

/// Buffers of one test: `input` holds the given values and `out` starts as NaN, so elements a
/// kernel never writes stay visible.
struct Fixture {
    runtime: EmuRuntime,
    _input: EmuBuffer<f32>,
    out: EmuBuffer<f32>,
    params: BrokenParams,
}

impl Fixture {
    fn new(input: &[f32], out_len: usize) -> Self {
        Self::with_runtime(EmuRuntime::new(), input, out_len)
    }

    fn with_runtime(runtime: EmuRuntime, input: &[f32], out_len: usize) -> Self {
        let mut input_buf = runtime.alloc_zeroed::<f32>(input.len()).unwrap();
        runtime.copy_to_buffer(input, &mut input_buf).unwrap();
        let mut out = runtime.alloc_zeroed::<f32>(out_len).unwrap();
        runtime
            .copy_to_buffer(&vec![f32::NAN; out_len], &mut out)
            .unwrap();
        let params = BrokenParams {
            input: runtime.buffer_address(&input_buf),
            out: runtime.buffer_address(&out),
            n: input.len() as i64,
            ..BrokenParams::default()
        };
        Fixture {
            runtime,
            _input: input_buf,
            out,
            params,
        }
    }

    fn launch(&self, entry: &str, grid: u32, block: u32, shared_bytes: u32) -> Result<()> {
        // SAFETY: `input` and `out` are live buffers of this runtime; every kernel of
        // broken.cu stays inside them except for the out-of-bounds writes under test, which
        // land in the 4096-byte guards.
        unsafe {
            self.runtime.launch_params(
                "broken.cu",
                entry,
                (grid, 1, 1),
                (block, 1, 1),
                shared_bytes,
                &self.params,
            )
        }
    }

    fn out(&self) -> Vec<f32> {
        let mut host = vec![0.0f32; self.out.len()];
        self.runtime.copy_from_buffer(&self.out, &mut host).unwrap();
        host
    }
}

/// Returns the emulator's message of a failed launch, panicking on success or another error.
fn emulator_error(result: Result<()>) -> String {
    match result {
        Err(Error::Emulator { kernel, detail }) => format!("{kernel}: {detail}"),
        Err(other) => panic!("expected an emulator error, got {other}"),
        Ok(()) => panic!("expected the emulator to reject the launch, but it succeeded"),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "the message should mention {part:?}: {message}"
        );
    }
}

/// Small integers, so sums in any order are exact in f32.
fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 17) as f32 - 5.0).collect()
}

fn block_sums(input: &[f32], block: usize) -> Vec<f32> {
    input.chunks(block).map(|c| c.iter().sum()).collect()
}

#[test]
fn block_sum_control_is_exact() {
    let input = ramp(256);
    let fixture = Fixture::new(&input, 4);
    fixture.launch("block_sum", 4, 64, 0).unwrap();
    assert_eq!(fixture.out(), block_sums(&input, 64));
}

#[test]
fn missing_barrier_reads_poisoned_shared_memory() {
    let input = ramp(256);
    let fixture = Fixture::new(&input, 4);
    fixture
        .launch("block_sum_missing_barrier", 4, 64, 0)
        .unwrap();
    let out = fixture.out();
    // Block 0 runs its threads in ascending order, so thread 0 sums 63 slots that no thread
    // has written yet: 0xFF poison, NaN.
    assert!(out[0].is_nan(), "block 0 sum should be NaN, got {}", out[0]);
    let wrong = out
        .iter()
        .zip(block_sums(&input, 64))
        .filter(|(got, want)| **got != *want)
        .count();
    assert!(
        wrong >= 1,
        "no block sum differs from the exact sums: {out:?}"
    );
}

#[test]
fn missing_barrier_in_tree_gives_wrong_sums() {
    let input = ramp(256);
    let fixture = Fixture::new(&input, 4);
    fixture
        .launch("tree_sum_missing_barrier", 4, 64, 0)
        .unwrap();
    let out = fixture.out();
    let expected = block_sums(&input, 64);
    let wrong: Vec<usize> = (0..4).filter(|&b| out[b] != expected[b]).collect();
    assert!(
        !wrong.is_empty(),
        "every block sum is exact ({out:?}); the missing barrier went unnoticed"
    );
}

#[test]
fn divergent_barrier_fails_without_hanging() {
    let fixture = Fixture::new(&ramp(64), 64);
    let start = Instant::now();
    let message = emulator_error(fixture.launch("divergent_barrier", 1, 64, 0));
    assert_mentions(
        &message,
        &[
            "divergent_barrier (broken.cu)",
            "block (0,0,0)",
            "divergent __syncthreads()",
            "threads 0-31",
            "threads 32-63",
        ],
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn early_exit_before_barrier_is_a_deadlock() {
    let mut fixture = Fixture::new(&ramp(64), 64);
    fixture.params.n = 40;
    let message = emulator_error(fixture.launch("early_exit_barrier", 1, 64, 0));
    assert_mentions(
        &message,
        &[
            "deadlock",
            "threads 0-39 wait at __syncthreads()",
            "threads 40-63 have exited",
        ],
    );
}

#[test]
fn off_by_one_write_hits_the_guard() {
    let input = ramp(100);
    let mut fixture = Fixture::new(&input, 100);
    fixture.params.n = 100;
    let message = emulator_error(fixture.launch("copy_off_by_one", 2, 64, 0));
    assert_mentions(
        &message,
        &[
            "copy_off_by_one (broken.cu)",
            "wrote outside buffer",
            "`out`",
            "100 x f32",
            // The first element past the end; which of its bytes differ depends on the value.
            "bytes 0..",
            "after its end",
        ],
    );
}

#[test]
fn wrong_output_stride_leaves_rows_unwritten() {
    // 6 rows of 40 columns in a row stride of 48; the correct copy fills columns 0..40 of
    // every output row.
    let (rows, cols, stride) = (6usize, 40usize, 48usize);
    let input: Vec<f32> = (0..rows * stride).map(|i| i as f32).collect();
    let mut fixture = Fixture::new(&input, rows * stride);
    fixture.params.cols = cols as i64;
    fixture.params.stride = stride as i64;
    fixture
        .launch("copy_rows_wrong_stride", rows as u32, 32, 0)
        .unwrap();
    let out = fixture.out();
    let mismatches: Vec<(usize, usize)> = (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (r, c)))
        .filter(|&(r, c)| out[r * stride + c] != input[r * stride + c])
        .collect();
    assert!(
        !mismatches.is_empty(),
        "the mis-strided copy matched the input everywhere"
    );
}

#[test]
fn input_stride_on_compact_output_overruns() {
    let (rows, cols, stride) = (6usize, 40usize, 48usize);
    let input: Vec<f32> = (0..rows * stride).map(|i| i as f32).collect();
    let mut fixture = Fixture::new(&input, rows * cols);
    fixture.params.cols = cols as i64;
    fixture.params.stride = stride as i64;
    let message = emulator_error(fixture.launch("copy_rows_output_stride", rows as u32, 32, 0));
    assert_mentions(
        &message,
        &["wrote outside buffer", "`out`", "after its end"],
    );
}

#[test]
fn partial_mask_shuffle_is_rejected() {
    let fixture = Fixture::new(&ramp(32), 32);
    let message = emulator_error(fixture.launch("partial_mask_shuffle", 1, 32, 0));
    assert_mentions(
        &message,
        &["__shfl_xor_sync", "mask 0x0000ffff", "full mask"],
    );
}

#[test]
fn divergent_shuffle_is_a_deadlock() {
    let fixture = Fixture::new(&ramp(64), 64);
    let message = emulator_error(fixture.launch("divergent_shuffle", 1, 64, 0));
    assert_mentions(
        &message,
        &["deadlock", "wait at __shfl_xor_sync", "have exited"],
    );
}

#[test]
fn endless_barriers_time_out() {
    let runtime = EmuRuntime::new().with_timeout(Duration::from_millis(500));
    let mut fixture = Fixture::with_runtime(runtime, &ramp(64), 64);
    fixture.params.iterations = i64::MAX;
    let start = Instant::now();
    let message = emulator_error(fixture.launch("endless_barriers", 1, 64, 0));
    assert_mentions(&message, &["timed out", "wait at __syncthreads()"]);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn dynamic_shared_overflow_is_caught() {
    let fixture = Fixture::new(&ramp(64), 64);
    // 64 threads write 64 floats into the 16 floats the launch requests.
    let message = emulator_error(fixture.launch("dynamic_shared_overflow", 1, 64, 64));
    assert_mentions(&message, &["dynamic shared memory", "past the 64 bytes"]);
}

#[test]
fn failing_device_assert_is_an_error() {
    let fixture = Fixture::new(&ramp(64), 64);
    let message = emulator_error(fixture.launch("failing_assert", 1, 64, 0));
    assert_mentions(
        &message,
        &["assertion `threadIdx.x != 5` failed", "thread 5"],
    );
}

#[test]
fn unknown_kernel_is_not_found() {
    let fixture = Fixture::new(&ramp(4), 4);
    let message = emulator_error(fixture.launch("no_such_kernel", 1, 32, 0));
    assert_mentions(&message, &["not found", "block_sum"]);
}

#[test]
fn oversized_block_is_rejected() {
    let fixture = Fixture::new(&ramp(4), 4);
    let message = emulator_error(fixture.launch("block_sum", 1, 2048, 0));
    assert_mentions(&message, &["invalid block (2048,1,1)"]);
}

#[test]
fn parameter_size_mismatch_is_rejected() {
    let fixture = Fixture::new(&ramp(4), 4);
    let short = [fixture.params.input, fixture.params.out];
    // SAFETY: the kernel never runs: the size check rejects the launch first.
    let result = unsafe {
        fixture
            .runtime
            .launch_params("broken.cu", "block_sum", (1, 1, 1), (32, 1, 1), 0, &short)
    };
    let message = emulator_error(result);
    assert_mentions(
        &message,
        &["16 bytes on the host but 48 bytes in the kernel source"],
    );
}
