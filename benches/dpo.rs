//! CPU throughput of the fused DPO loss: forward, and forward plus backward into a gradient in
//! the logits dtype, at 4 pairs x 512 positions x V = 32000 with the first half of every
//! sequence masked (a prompt), for bf16 and f32 logits.
//!
//! Criterion reports decimal GB/s of compulsory traffic (see `forward_bytes` and
//! `forward_backward_bytes`). After each group the bench prints the achieved GB/s next to the
//! host copy bandwidth measured in the same run: the ceiling of a pass that only streams its
//! bytes.
//!
//! Run: `cargo bench --bench dpo`, or add `-- --warm-up-time 1 --measurement-time 3` for a
//! shorter run.

// The tests' support module, for its seeded RNG.
#[path = "../tests/common/mod.rs"]
mod common;

use std::cell::Cell;
use std::hint::black_box;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dpo_kernels::{Batch, BatchShape, Device, DpoConfig, DpoLoss, Element};
use half::bf16;
use rayon::prelude::*;

use common::Rng;

const PAIRS: usize = 4;
const SEQ_LEN: usize = 512;
const VOCAB: usize = 32000;
const IGNORE_INDEX: i64 = -100;

/// A batch owned by the bench.
struct BenchBatch<T> {
    shape: BatchShape,
    logits: Vec<T>,
    labels: Vec<i64>,
    reference: Vec<f32>,
    valid_positions: usize,
}

/// Builds a batch with uniform logits in [-8, 8) and the first half of every sequence masked.
fn make_batch<T: Element>() -> BenchBatch<T> {
    let shape = BatchShape {
        pairs: PAIRS,
        seq_len: SEQ_LEN,
        vocab: VOCAB,
        row_stride: VOCAB,
    };
    let mut logits = vec![T::default(); shape.logits_len()];
    logits
        .par_chunks_mut(VOCAB)
        .enumerate()
        .for_each(|(position, row)| {
            let mut rng = Rng::new(position as u64);
            for x in row {
                *x = T::from_f32(rng.uniform_in(-8.0, 8.0) as f32);
            }
        });
    let mut rng = Rng::new(7);
    let labels: Vec<i64> = (0..shape.positions())
        .map(|p| {
            if p % SEQ_LEN < SEQ_LEN / 2 {
                IGNORE_INDEX
            } else {
                rng.below(VOCAB) as i64
            }
        })
        .collect();
    let valid_positions = labels.iter().filter(|&&y| y != IGNORE_INDEX).count();
    let reference = (0..shape.sequences()).map(|r| -2600.0 - r as f32).collect();
    BenchBatch {
        shape,
        logits,
        labels,
        reference,
        valid_positions,
    }
}

/// Compulsory bytes of the forward: each valid logits row read once (`V` elements), all
/// labels and reference log-probs read, and the outputs written (loss, six per-pair f32
/// vectors, eight f32 metrics). Masked rows are never read, so they do not count.
fn forward_bytes<T: Element>(batch: &BenchBatch<T>) -> u64 {
    let shape = batch.shape;
    let logits = batch.valid_positions * shape.vocab * T::DTYPE.size_bytes();
    let labels = shape.positions() * std::mem::size_of::<i64>();
    let reference = shape.sequences() * 4;
    let outputs = 4 + 6 * shape.pairs * 4 + 8 * 4;
    (logits + labels + reference + outputs) as u64
}

/// Compulsory bytes of forward plus backward: the forward's bytes, each valid row read once
/// more, and every gradient row (`W` elements, masked rows included) written once in the
/// logits dtype.
fn forward_backward_bytes<T: Element>(batch: &BenchBatch<T>) -> u64 {
    let shape = batch.shape;
    let reread = batch.valid_positions * shape.vocab * T::DTYPE.size_bytes();
    let grad = shape.logits_len() * T::DTYPE.size_bytes();
    forward_bytes(batch) + (reread + grad) as u64
}

/// Returns the host copy bandwidth in decimal GB/s (bytes read plus written), the best of
/// five copies of 256 MiB, single-threaded and split over the rayon pool, whichever is faster.
fn host_copy_gbps() -> f64 {
    static BANDWIDTH: OnceLock<f64> = OnceLock::new();
    *BANDWIDTH.get_or_init(|| {
        let len = 256 << 20;
        let src = vec![1u8; len];
        let mut dst = vec![0u8; len];
        let mut best_single = Duration::MAX;
        let mut best_parallel = Duration::MAX;
        for _ in 0..5 {
            let start = Instant::now();
            dst.copy_from_slice(black_box(&src));
            best_single = best_single.min(start.elapsed());
            black_box(&dst);

            let start = Instant::now();
            dst.par_chunks_mut(1 << 20)
                .zip(src.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
            best_parallel = best_parallel.min(start.elapsed());
            black_box(&dst);
        }
        let gbps = |time: Duration| 2.0 * len as f64 / time.as_secs_f64() / 1e9;
        let (single, parallel) = (gbps(best_single), gbps(best_parallel));
        println!(
            "host copy: {single:.2} GB/s on 1 thread, {parallel:.2} GB/s on {} rayon threads \
             (256 MiB, read + write)",
            rayon::current_num_threads()
        );
        single.max(parallel)
    })
}

/// Mean time per call over every timed call of one benchmark, warm-up included.
#[derive(Default)]
struct MeanTime {
    total: Cell<Duration>,
    calls: Cell<u64>,
}

impl MeanTime {
    fn record(&self, elapsed: Duration, calls: u64) {
        self.total.set(self.total.get() + elapsed);
        self.calls.set(self.calls.get() + calls);
    }

    /// Prints achieved GB/s for `bytes` per call and its share of the host copy bandwidth.
    fn print(&self, id: &str, bytes: u64) {
        // `--list` and filtered-out benchmarks take no samples.
        if self.calls.get() == 0 {
            return;
        }
        let seconds = self.total.get().as_secs_f64() / self.calls.get().max(1) as f64;
        let achieved = bytes as f64 / seconds / 1e9;
        let peak = host_copy_gbps();
        println!(
            "{id}: {:.1} ms, {bytes} compulsory bytes, achieved {achieved:.2} GB/s / host copy \
             {peak:.2} GB/s = {:.0}%",
            seconds * 1e3,
            100.0 * achieved / peak
        );
    }
}

fn bench_dtype<T: Element>(c: &mut Criterion, dtype: &str) {
    host_copy_gbps();
    let batch = make_batch::<T>();
    let labels = &batch.labels;
    let view = Batch::new(batch.shape, &batch.logits, labels, Some(&batch.reference));
    let dpo = DpoLoss::new(DpoConfig::new(0.1), Device::Cpu).expect("CPU backend");
    let group_name = format!("dpo/{dtype}/{PAIRS}x{SEQ_LEN}x{VOCAB}");

    let forward_time = MeanTime::default();
    let mut group = c.benchmark_group(&group_name);
    group.throughput(Throughput::BytesDecimal(forward_bytes(&batch)));
    group.bench_function("cpu_forward", |b| {
        b.iter_custom(|calls| {
            let start = Instant::now();
            for _ in 0..calls {
                black_box(dpo.forward(black_box(&view)).expect("forward"));
            }
            let elapsed = start.elapsed();
            forward_time.record(elapsed, calls);
            elapsed
        })
    });

    let forward_backward_time = MeanTime::default();
    let mut grad = vec![T::default(); batch.shape.logits_len()];
    group.throughput(Throughput::BytesDecimal(forward_backward_bytes(&batch)));
    group.bench_function("cpu_forward_backward", |b| {
        b.iter_custom(|calls| {
            let start = Instant::now();
            for _ in 0..calls {
                let out = dpo.forward_backward(black_box(&view), &mut grad);
                black_box(out.expect("forward_backward"));
                black_box(&grad);
            }
            let elapsed = start.elapsed();
            forward_backward_time.record(elapsed, calls);
            elapsed
        })
    });
    group.finish();

    forward_time.print(&format!("{group_name}/cpu_forward"), forward_bytes(&batch));
    forward_backward_time.print(
        &format!("{group_name}/cpu_forward_backward"),
        forward_backward_bytes(&batch),
    );
}

fn dpo_benches(c: &mut Criterion) {
    bench_dtype::<bf16>(c, "bf16");
    bench_dtype::<f32>(c, "f32");
}

criterion_group! {
    name = benches;
    // Each forward + backward moves over a gigabyte, so 10 samples are enough.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    targets = dpo_benches
}
criterion_main!(benches);
