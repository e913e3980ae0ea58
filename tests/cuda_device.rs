//! CUDA backend checks. Without a GPU: opening a device returns `Error::NoDevice` (never a
//! panic) and `Device::Auto` falls back to the CPU. With a GPU: a smoke comparison of the CUDA
//! and CPU backends on odd shapes, faults and in-place backward. The full parity suite against
//! the f64 reference lives in the backend-generic tests.
//!
//! GPU tests print why they skip when no device is present, and fail instead when
//! DPO_REQUIRE_GPU=1 (set by `scripts/gpu-check.sh`), so a GPU run cannot pass by skipping.

use dpo_kernels::{
    Backend, Batch, BatchShape, Cpu, Cuda, Device, DpoConfig, DpoLoss, Element, Error, LossKind,
};
use half::{bf16, f16};

fn gpu_required() -> bool {
    std::env::var("DPO_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Opens device 0, or returns None after printing why (panics when a GPU is required).
fn open_gpu() -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(cuda) => Some(cuda),
        Err(err) if !gpu_required() => {
            println!("skipped: {err}");
            None
        }
        Err(err) => panic!("DPO_REQUIRE_GPU=1 but the CUDA backend did not open: {err}"),
    }
}

#[test]
fn cuda_new_opens_or_reports_no_device() {
    match Cuda::new(0) {
        Ok(cuda) => assert_eq!(cuda.name(), "cuda:0"),
        Err(Error::NoDevice { reason }) => {
            assert!(!reason.is_empty());
            assert!(!gpu_required(), "DPO_REQUIRE_GPU=1 but: {reason}");
        }
        Err(other) => panic!("expected NoDevice or a device, got {other}"),
    }
}

#[test]
fn absurd_ordinal_is_no_device() {
    let err = Cuda::new(4096).unwrap_err();
    assert!(matches!(err, Error::NoDevice { .. }), "{err}");
}

#[test]
fn auto_falls_back_to_cpu_with_a_reason() {
    let dpo = DpoLoss::new(DpoConfig::new(0.1), Device::Auto).unwrap();
    if dpo.device_name() == "cpu" {
        assert!(dpo.fallback_reason().is_some_and(|r| !r.is_empty()));
    } else {
        assert!(dpo.fallback_reason().is_none());
    }
}

/// Deterministic logits in roughly [-4, 4] and labels with every `mask_every`-th position
/// masked (-100).
fn make_batch(shape: BatchShape, mask_every: usize) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let logits = (0..shape.logits_len())
        .map(|_| ((next() % 8000) as f32 / 1000.0) - 4.0)
        .collect();
    let labels = (0..shape.positions())
        .map(|p| {
            if p % mask_every == 0 {
                -100
            } else {
                (next() % shape.vocab as u64) as i64
            }
        })
        .collect();
    let reference = (0..shape.sequences())
        .map(|r| -(r as f32) * 1.5 - 10.0)
        .collect();
    (logits, labels, reference)
}

fn assert_close(name: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: lengths differ");
    let mut worst = (0usize, 0.0f32);
    let mut bad = 0usize;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        // A NaN error counts as infinitely large.
        let err = if g.is_nan() {
            f32::INFINITY
        } else {
            (g - w).abs()
        };
        let tol = atol + rtol * w.abs();
        if err > tol {
            bad += 1;
        }
        if err > worst.1 {
            worst = (i, err);
        }
    }
    let (i, err) = worst;
    assert_eq!(
        bad, 0,
        "{name}: {bad} elements out of tolerance; worst index {i}: got {} want {} err {err}",
        got[i], want[i]
    );
}

fn compare_backends<T: Element>(cuda: &Cuda, shape: BatchShape, config: DpoConfig, rtol: f32) {
    let (logits_f32, labels, reference) = make_batch(shape, 5);
    let logits: Vec<T> = logits_f32.iter().map(|&x| T::from_f32(x)).collect();
    let batch = Batch::new(shape, &logits, &labels, Some(&reference));
    let want = Cpu.forward(&batch, &config).unwrap();
    let got = cuda.forward(&batch, &config).unwrap();
    let label = format!("{:?} {shape:?}", T::DTYPE);
    assert_close(
        &format!("loss {label}"),
        &[got.loss],
        &[want.loss],
        1e-5,
        1e-4,
    );
    assert_close(
        &format!("losses {label}"),
        &got.losses,
        &want.losses,
        1e-5,
        1e-4,
    );
    assert_close(
        &format!("chosen {label}"),
        &got.chosen_logps,
        &want.chosen_logps,
        1e-3,
        1e-5,
    );
    assert_close(
        &format!("rejected {label}"),
        &got.rejected_logps,
        &want.rejected_logps,
        1e-3,
        1e-5,
    );
    assert_eq!(
        got.metrics.rewards_accuracy, want.metrics.rewards_accuracy,
        "{label}"
    );

    // Gradient in the logits dtype and in f32, then in place.
    let mut grad_cpu = vec![T::default(); shape.logits_len()];
    Cpu.backward(&batch, &want.state, 0.5, &mut grad_cpu)
        .unwrap();
    let mut grad_gpu = vec![T::default(); shape.logits_len()];
    cuda.backward(&batch, &got.state, 0.5, &mut grad_gpu)
        .unwrap();
    let to_f32 = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    assert_close(
        &format!("grad {label}"),
        &to_f32(&grad_gpu),
        &to_f32(&grad_cpu),
        1e-6,
        rtol,
    );

    let mut grad_f32 = vec![0.0f32; shape.logits_len()];
    cuda.backward(&batch, &got.state, 0.5, &mut grad_f32)
        .unwrap();
    let mut grad_cpu_f32 = vec![0.0f32; shape.logits_len()];
    Cpu.backward(&batch, &want.state, 0.5, &mut grad_cpu_f32)
        .unwrap();
    assert_close(
        &format!("grad f32 {label}"),
        &grad_f32,
        &grad_cpu_f32,
        1e-6,
        1e-4,
    );

    let mut in_place = logits.clone();
    cuda.backward_in_place(shape, &mut in_place, &labels, &got.state, 0.5)
        .unwrap();
    assert_close(
        &format!("in place {label}"),
        &to_f32(&in_place),
        &to_f32(&grad_cpu),
        1e-6,
        rtol,
    );
}

#[test]
fn cuda_matches_cpu_on_odd_shapes() {
    let Some(cuda) = open_gpu() else { return };
    let shapes = [
        // Warp per row, V not a multiple of any pack, misaligned row stride.
        BatchShape {
            pairs: 3,
            seq_len: 47,
            vocab: 123,
            row_stride: 131,
        },
        // Block per row just past the warp limit, odd stride.
        BatchShape {
            pairs: 1,
            seq_len: 5,
            vocab: 1025,
            row_stride: 1027,
        },
        // Block of 512 threads.
        BatchShape {
            pairs: 2,
            seq_len: 3,
            vocab: 32003,
            row_stride: 32008,
        },
        // A single position per sequence.
        BatchShape {
            pairs: 1,
            seq_len: 1,
            vocab: 7,
            row_stride: 7,
        },
    ];
    for shape in shapes {
        let config = DpoConfig::new(0.1);
        compare_backends::<f32>(&cuda, shape, config, 1e-4);
        compare_backends::<f16>(&cuda, shape, config, 2e-3);
        compare_backends::<bf16>(&cuda, shape, config, 1.6e-2);
    }
}

#[test]
fn cuda_matches_cpu_for_every_loss() {
    let Some(cuda) = open_gpu() else { return };
    let shape = BatchShape {
        pairs: 4,
        seq_len: 9,
        vocab: 50,
        row_stride: 52,
    };
    let losses = [
        LossKind::Sigmoid {
            label_smoothing: 0.1,
        },
        LossKind::Robust {
            label_smoothing: 0.2,
        },
        LossKind::Ipo,
        LossKind::Hinge,
    ];
    for loss in losses {
        for length_normalize in [false, true] {
            let config = DpoConfig {
                loss,
                length_normalize,
                ..DpoConfig::new(0.5)
            };
            compare_backends::<f32>(&cuda, shape, config, 1e-4);
        }
    }
}

#[test]
fn cuda_reports_the_first_faulty_position() {
    let Some(cuda) = open_gpu() else { return };
    let shape = BatchShape {
        pairs: 1,
        seq_len: 4,
        vocab: 300,
        row_stride: 300,
    };
    let (mut logits, labels, _) = make_batch(shape, 1000);
    logits[5 * 300 + 17] = f32::NAN;
    logits[6 * 300 + 3] = f32::INFINITY;
    let batch = Batch::new(shape, &logits, &labels, None);
    let config = DpoConfig::new(0.1);
    let want = Cpu.forward(&batch, &config).unwrap_err().to_string();
    let got = cuda.forward(&batch, &config).unwrap_err().to_string();
    assert_eq!(got, want);
}

#[test]
fn cuda_state_is_rejected_by_cpu_backward() {
    let Some(cuda) = open_gpu() else { return };
    let shape = BatchShape {
        pairs: 1,
        seq_len: 2,
        vocab: 8,
        row_stride: 8,
    };
    let (logits, labels, _) = make_batch(shape, 3);
    let batch = Batch::new(shape, &logits, &labels, None);
    let out = cuda.forward(&batch, &DpoConfig::new(0.1)).unwrap();
    let mut grad = vec![0.0f32; shape.logits_len()];
    let err = Cpu
        .backward(&batch, &out.state, 1.0, &mut grad)
        .unwrap_err();
    assert!(matches!(err, Error::StateMismatch { .. }), "{err}");
}

#[test]
fn cuda_backend_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cuda>();
    assert_send_sync::<DpoLoss>();
    assert_send_sync::<dpo_kernels::ForwardState>();
}

/// f64 log-softmax of one row: `(log-prob of target, softmax)`.
fn row_reference(row: &[f64], target: usize) -> (f64, Vec<f64>) {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = row.iter().map(|&x| (x - max).exp()).sum();
    let log_sum = sum.ln();
    let softmax = row.iter().map(|&x| ((x - max) - log_sum).exp()).collect();
    ((row[target] - max) - log_sum, softmax)
}

/// A Llama-3 sized vocabulary (V = 128256) with more than 2^31 logits elements in one buffer,
/// so row offsets past the 32-bit boundary are used. Rows on both sides of that boundary and
/// the last row are checked against an f64 reference; the loss against the CPU backend.
#[test]
fn cuda_handles_more_than_2_pow_31_logits() {
    use rayon::prelude::*;

    let Some(cuda) = open_gpu() else { return };
    let vocab = 128_256usize;
    let shape = BatchShape {
        pairs: 1,
        seq_len: 8_400,
        vocab,
        row_stride: vocab,
    };
    assert!(shape.logits_len() > 1 << 31);
    let hash = |i: u64| {
        let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let logits: Vec<bf16> = (0..shape.logits_len() as u64)
        .into_par_iter()
        .map(|i| bf16::from_f32((hash(i) % 12_000) as f32 / 1000.0 - 6.0))
        .collect();
    let labels: Vec<i64> = (0..shape.positions() as u64)
        .map(|p| {
            if p % shape.seq_len as u64 <= 100 {
                -100
            } else {
                (hash(p ^ 0xabcdef) % vocab as u64) as i64
            }
        })
        .collect();
    let reference = [-90_000.0f32, -91_000.0];
    let batch = Batch::new(shape, &logits, &labels, Some(&reference));
    let config = DpoConfig::new(0.1);

    let got = cuda.forward(&batch, &config).unwrap();
    let want = Cpu.forward(&batch, &config).unwrap();
    assert_close("chosen", &got.chosen_logps, &want.chosen_logps, 0.5, 1e-5);
    assert_close(
        "rejected",
        &got.rejected_logps,
        &want.rejected_logps,
        0.5,
        1e-5,
    );
    assert_close("loss", &[got.loss], &[want.loss], 1e-5, 1e-3);

    let mut grad = vec![bf16::ZERO; shape.logits_len()];
    cuda.backward(&batch, &got.state, 1.0, &mut grad).unwrap();
    let boundary_row = (1usize << 31) / vocab;
    let last = shape.positions() - 1;
    for p in [101, boundary_row, boundary_row + 1, last] {
        let row: Vec<f64> = logits[p * vocab..(p + 1) * vocab]
            .iter()
            .map(|x| x.to_f32() as f64)
            .collect();
        let target = labels[p] as usize;
        let (_, softmax) = row_reference(&row, target);
        let coef = if p < shape.seq_len {
            got.dloss_dmargin[0] as f64
        } else {
            -got.dloss_dmargin[0] as f64
        };
        let want_row: Vec<f32> = softmax
            .iter()
            .enumerate()
            .map(|(v, &s)| (coef * (f64::from(u8::from(v == target)) - s)) as f32)
            .collect();
        let got_row: Vec<f32> = grad[p * vocab..(p + 1) * vocab]
            .iter()
            .map(|g| g.to_f32())
            .collect();
        // bf16 output: 2 units of 2^-8 relative, plus 1e-5 * |grad_loss| absolute.
        assert_close(&format!("grad row {p}"), &got_row, &want_row, 1e-5, 8e-3);
    }
}
