//! CUDA bench of the fused DPO forward and forward+backward on device-resident batches.
//!
//! Groups are `dpo/<dtype>/<B>x<T>x<V>` with B pairs (2B sequences), T positions and V
//! vocabulary; each has a `forward` and a `forward_backward` bench. Time is measured with CUDA
//! events around the launches (NVRTC compilation happens in a warm-up call before timing) and
//! criterion reports `Throughput::BytesDecimal` of the compulsory traffic:
//!
//! ```text
//! forward          = valid rows * V * sizeof(T) + P * sizeof(label) + 28 * P
//! forward_backward = forward + P * W * sizeof(T)      (the gradient, written once)
//! ```
//!
//! where P = 2B * T and 28 bytes per position are the forward's per-row outputs. Every batch is
//! at least 1 GB, far larger than any L2, so no cache flush is needed between iterations.
//! After each group the bench prints achieved GB/s against a device-to-device copy measured in
//! the same run. Without a GPU it prints why and exits with status 0.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use cudarc::driver::{sys::CUevent_flags, CudaSlice, CudaStream};
use dpo_kernels::{
    cuda::DeviceBatch, BatchShape, Cuda, DpoConfig, Element, Error, ForwardState, Label,
};
use half::bf16;

/// Times `iters` runs of `work` on `stream` with CUDA events; returns the total.
fn time_on_stream(
    stream: &Arc<CudaStream>,
    iters: u64,
    mut work: impl FnMut() -> Result<(), Error>,
) -> Duration {
    let context = stream.context();
    let start = context
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .expect("create a timing event");
    let end = context
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .expect("create a timing event");
    stream.synchronize().expect("synchronize before timing");
    start.record(stream).expect("record the start event");
    for _ in 0..iters {
        work().expect("the timed call failed");
    }
    end.record(stream).expect("record the end event");
    let ms = start.elapsed_ms(&end).expect("read the event timer");
    Duration::from_secs_f64(f64::from(ms) / 1e3)
}

/// Returns device-to-device copy bandwidth in GB/s (bytes read plus written), from a 2 GB copy.
fn copy_bandwidth(stream: &Arc<CudaStream>) -> f64 {
    let len = 1usize << 28; // 2^28 f32 = 1 GiB each way
    let src: CudaSlice<f32> = stream.alloc_zeros(len).expect("allocate the copy source");
    let mut dst: CudaSlice<f32> = stream.alloc_zeros(len).expect("allocate the copy target");
    stream.memcpy_dtod(&src, &mut dst).expect("warm-up copy");
    let iters = 10;
    let elapsed = time_on_stream(stream, iters, || {
        stream.memcpy_dtod(&src, &mut dst).map_err(Error::from)
    });
    let bytes = 2.0 * (len * 4) as f64 * iters as f64;
    bytes / elapsed.as_secs_f64() / 1e9
}

/// One benchmarked shape.
struct Case {
    pairs: usize,
    seq_len: usize,
    vocab: usize,
}

impl Case {
    fn shape(&self) -> BatchShape {
        BatchShape {
            pairs: self.pairs,
            seq_len: self.seq_len,
            vocab: self.vocab,
            row_stride: self.vocab,
        }
    }
}

/// Deterministic logits in [-8, 8) and labels with the first quarter of each sequence masked
/// (a prompt), uploaded to the backend's stream.
fn device_batch<T: Element, L: Label + From<i32>>(
    stream: &Arc<CudaStream>,
    shape: BatchShape,
) -> (CudaSlice<T>, CudaSlice<L>, CudaSlice<f32>, usize) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let logits: Vec<T> = (0..shape.logits_len())
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            T::from_f32(((state >> 40) as f32 / (1u64 << 24) as f32) * 16.0 - 8.0)
        })
        .collect();
    let prompt = shape.seq_len / 4;
    let labels: Vec<L> = (0..shape.positions())
        .map(|p| {
            let t = p % shape.seq_len;
            L::from(if t < prompt {
                -100
            } else {
                ((p * 7919) % shape.vocab) as i32
            })
        })
        .collect();
    let valid_rows = shape.sequences() * (shape.seq_len - prompt);
    let reference: Vec<f32> = (0..shape.sequences()).map(|r| -100.0 - r as f32).collect();
    (
        stream.clone_htod(&logits).expect("upload logits"),
        stream.clone_htod(&labels).expect("upload labels"),
        stream
            .clone_htod(&reference)
            .expect("upload reference log-probs"),
        valid_rows,
    )
}

fn bench_case<T: Element>(c: &mut Criterion, cuda: &Cuda, case: &Case, peak_gbs: f64) {
    let stream = cuda.stream().expect("a GPU backend has a stream").clone();
    let shape = case.shape();
    let (logits, labels, reference, valid_rows) = device_batch::<T, i64>(&stream, shape);
    let mut grad: CudaSlice<T> = stream
        .clone_htod(&vec![T::default(); shape.logits_len()])
        .expect("allocate grad");
    let batch = DeviceBatch {
        shape,
        logits: &logits,
        labels: &labels,
        reference_logps: Some(&reference),
    };
    let config = DpoConfig::new(0.1);
    let positions = shape.positions() as u64;
    let forward_bytes = (valid_rows * shape.vocab * std::mem::size_of::<T>()) as u64
        + positions * std::mem::size_of::<i64>() as u64
        + 28 * positions;
    let grad_bytes = (shape.logits_len() * std::mem::size_of::<T>()) as u64;

    // Warm-up: compiles both modules with NVRTC, outside any timing.
    let state: ForwardState = cuda
        .forward_device(&batch, &config)
        .expect("warm-up forward")
        .state;
    cuda.backward_device(&batch, &state, 1.0, &mut grad)
        .expect("warm-up backward");

    let name = format!(
        "dpo/{}/{}x{}x{}",
        T::DTYPE.kernel_suffix(),
        case.pairs,
        case.seq_len,
        case.vocab
    );
    let mut group = c.benchmark_group(&name);
    group.sample_size(10);
    group.throughput(Throughput::BytesDecimal(forward_bytes));
    group.bench_function(BenchmarkId::from_parameter("forward"), |b| {
        b.iter_custom(|iters| {
            time_on_stream(&stream, iters, || {
                cuda.forward_device(&batch, &config).map(drop)
            })
        })
    });
    group.throughput(Throughput::BytesDecimal(forward_bytes + grad_bytes));
    group.bench_function(BenchmarkId::from_parameter("forward_backward"), |b| {
        b.iter_custom(|iters| {
            time_on_stream(&stream, iters, || {
                let out = cuda.forward_device(&batch, &config)?;
                cuda.backward_device(&batch, &out.state, 1.0, &mut grad)
            })
        })
    });
    group.finish();

    // A short event-timed run for the summary line (criterion keeps its estimates internal).
    let iters = 10;
    let forward = time_on_stream(&stream, iters, || {
        cuda.forward_device(&batch, &config).map(drop)
    });
    let both = time_on_stream(&stream, iters, || {
        let out = cuda.forward_device(&batch, &config)?;
        cuda.backward_device(&batch, &out.state, 1.0, &mut grad)
    });
    for (pass, bytes, elapsed) in [
        ("forward", forward_bytes, forward),
        ("forward_backward", forward_bytes + grad_bytes, both),
    ] {
        let gbs = bytes as f64 * iters as f64 / elapsed.as_secs_f64() / 1e9;
        println!(
            "{name}/{pass}: {:.3} ms, achieved {gbs:.0} GB/s / peak {peak_gbs:.0} GB/s = {:.1}%",
            elapsed.as_secs_f64() * 1e3 / iters as f64,
            100.0 * gbs / peak_gbs
        );
    }
}

fn main() {
    let cuda = match Cuda::new(0) {
        Ok(cuda) => cuda,
        Err(err) => {
            println!("dpo_cuda bench skipped: {err}");
            return;
        }
    };
    let stream = cuda.stream().expect("a GPU backend has a stream").clone();
    let peak_gbs = copy_bandwidth(&stream);
    println!(
        "device-to-device copy: {peak_gbs:.0} GB/s (datasheet: H100 SXM 3350, H200 4800, \
         A100 80GB 2039)"
    );

    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let cases = [
        Case {
            pairs: 4,
            seq_len: 512,
            vocab: 128_256,
        },
        Case {
            pairs: 8,
            seq_len: 1024,
            vocab: 32_000,
        },
        Case {
            pairs: 2,
            seq_len: 1024,
            vocab: 151_936,
        },
    ];
    for case in &cases {
        bench_case::<bf16>(&mut c, &cuda, case, peak_gbs);
    }
    bench_case::<f32>(&mut c, &cuda, &cases[1], peak_gbs);
    c.final_summary();
}
