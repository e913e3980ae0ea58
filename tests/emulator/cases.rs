//! The hostile-input cases of `tests/data/cases/` through `Cuda::emulated()` and the CPU
//! backend: each `NAME.safetensors` batch against `NAME.expected.json` (float64 values, or the
//! error the batch must be rejected with). `tests/data/cases/README.md` describes the format.

use std::path::{Path, PathBuf};

use dpo_kernels::{Backend, Batch, BatchShape, Cpu, Cuda, DpoConfig, Error, LossKind};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::check::{assert_close, max_diff};
use crate::reference::reference;

/// One batch file, read as stored.
struct CaseFile {
    name: String,
    /// `[rows, T, W]` of `policy_logits`.
    dims: [usize; 3],
    vocab: usize,
    /// Logits as f32 (exact for F32 and BF16 files).
    logits: Vec<f32>,
    labels: Vec<i64>,
    reference: Vec<f32>,
    config: DpoConfig,
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/cases")
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn read_case(path: &Path) -> CaseFile {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {path:?}: {e}"));
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .unwrap_or_else(|e| panic!("invalid safetensors header in {path:?}: {e}"));
    let tensors = SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("invalid safetensors file {path:?}: {e}"));
    let metadata = header.metadata().clone().unwrap_or_default();
    let param = |key: &str| metadata.get(key).map(String::as_str);

    let logits_view = tensors.tensor("policy_logits").expect("policy_logits");
    let shape = logits_view.shape();
    let dims = [shape[0], shape[1], shape[2]];
    let logits = match logits_view.dtype() {
        Dtype::F32 => f32_values(logits_view.data()),
        Dtype::BF16 => logits_view
            .data()
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => panic!("{path:?}: policy_logits is {other:?}, expected F32 or BF16"),
    };
    let labels_view = tensors.tensor("labels").expect("labels");
    assert_eq!(labels_view.dtype(), Dtype::I64, "{path:?}: labels dtype");
    let labels = labels_view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    let reference = f32_values(tensors.tensor("reference_logps").expect("ref").data());

    let mut config = DpoConfig::new(param("beta").map_or(0.1, |v| v.parse().expect("beta")));
    if let Some(eps) = param("label_smoothing") {
        config.loss = LossKind::Sigmoid {
            label_smoothing: eps.parse().expect("label_smoothing"),
        };
    }
    if let Some(ignore_index) = param("ignore_index") {
        config.ignore_index = ignore_index.parse().expect("ignore_index");
    }
    config.length_normalize = param("mode") == Some("mean");
    CaseFile {
        name: path.file_stem().unwrap().to_string_lossy().into_owned(),
        dims,
        vocab: param("vocab_size").map_or(dims[2], |v| v.parse().expect("vocab_size")),
        logits,
        labels,
        reference,
        config,
    }
}

/// Returns the error kind of the case README for a crate error.
fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::InvalidLabel { .. } => "invalid_label",
        Error::NonFiniteLogit { .. } => "nonfinite_logit",
        Error::EmptyBatch { .. } => "empty_batch",
        _ => "other",
    }
}

fn numbers(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_f64().expect("a number"))
        .collect()
}

/// Runs one case on `backend`; returns the forward values and f32 gradient for the
/// emulator-vs-CPU comparison, or `None` for an error case.
fn run_case(backend: &impl Backend, case: &CaseFile, expected: &Value) -> Option<Vec<f32>> {
    let [rows, t, w] = case.dims;
    let label = format!("{} on {}", case.name, backend.name());
    let shape = BatchShape {
        pairs: rows / 2,
        seq_len: t,
        vocab: case.vocab,
        row_stride: w,
    };
    let batch = Batch::new(shape, &case.logits, &case.labels, Some(&case.reference));
    let result = backend.forward(&batch, &case.config);
    if let Some(kind) = expected.get("error").and_then(Value::as_str) {
        match result {
            Err(error) => assert_eq!(error_kind(&error), kind, "{label}: {error}"),
            Ok(out) => panic!("{label}: expected {kind}, got loss {}", out.loss),
        }
        return None;
    }
    let out = result.unwrap_or_else(|e| panic!("{label}: forward failed: {e}"));

    // Scales from the f64 reference: 1e-5 of sum |lp| per sequence, as in kernels.rs.
    let x: Vec<f64> = case.logits.iter().map(|&v| v as f64).collect();
    let want = reference(shape, &x, &case.labels, Some(&case.reference), &case.config);
    let b = shape.pairs;
    let beta = case.config.beta as f64;
    let pair_scale: Vec<f64> = (0..b)
        .map(|i| 1e-5 * (want.seq_scale[i] + want.seq_scale[b + i]))
        .collect();
    let curve = beta.max(want.curvature);

    let loss = expected["loss"].as_f64().expect("loss");
    let slack = (0..b)
        .map(|i| pair_scale[i] * beta.max(want.dloss_dz[i].abs()))
        .sum::<f64>()
        / b as f64;
    assert_close(&format!("{label}: loss"), &[out.loss], &[loss], |_| {
        1e-6 + 1e-5 * loss.abs() + slack
    });
    let chosen = numbers(&expected["chosen_logps"]);
    assert_close(
        &format!("{label}: chosen_logps"),
        &out.chosen_logps,
        &chosen,
        |i| 1e-6 + 1e-5 * want.seq_scale[i],
    );
    let rejected = numbers(&expected["rejected_logps"]);
    assert_close(
        &format!("{label}: rejected_logps"),
        &out.rejected_logps,
        &rejected,
        |i| 1e-6 + 1e-5 * want.seq_scale[b + i],
    );
    // The file's dloss_dz is d(mean loss)/dz_i = l'(z_i) / B; dloss_dmargin is l'(z_i).
    let dz = numbers(&expected["dloss_dz"]);
    let per_mean: Vec<f32> = out.dloss_dmargin.iter().map(|d| d / b as f32).collect();
    assert_close(&format!("{label}: dloss_dz"), &per_mean, &dz, |i| {
        1e-6 + 1e-5 * dz[i].abs() + pair_scale[i] * curve / b as f64
    });

    let mut grad = vec![0.0f32; shape.logits_len()];
    backend
        .backward(&batch, &out.state, 1.0, &mut grad)
        .unwrap_or_else(|e| panic!("{label}: backward failed: {e}"));
    let grad_tol = |index: usize, value: f64| {
        let pair = (index / (t * w)) % b;
        1e-5 + curve * pair_scale[pair] / b as f64 + 1e-5 * value.abs()
    };
    let padded_max = expected["grad_max_abs_padded"].as_f64().unwrap_or(0.0);
    for (index, &g) in grad.iter().enumerate() {
        if index % w >= case.vocab {
            assert!(
                (g.abs() as f64) <= padded_max,
                "{label}: padded column gradient {g} at index {index}"
            );
        }
    }
    for probe in expected["grad_probes"].as_array().expect("grad_probes") {
        let p = numbers(probe);
        let index = (p[0] as usize * t + p[1] as usize) * w + p[2] as usize;
        assert_close(
            &format!("{label}: grad probe at [{}, {}, {}]", p[0], p[1], p[2]),
            &[grad[index]],
            &[p[3]],
            |_| grad_tol(index, p[3]),
        );
    }
    if let Some(full) = expected.get("grad") {
        let flat: Vec<f64> = full
            .as_array()
            .expect("grad")
            .iter()
            .flat_map(|row| row.as_array().expect("row").iter())
            .flat_map(numbers)
            .collect();
        assert_close(&format!("{label}: grad"), &grad, &flat, |i| {
            grad_tol(i, flat[i])
        });
    }

    let mut values = vec![out.loss];
    values.extend_from_slice(&out.chosen_logps);
    values.extend_from_slice(&out.rejected_logps);
    values.extend_from_slice(&out.dloss_dmargin);
    values.extend_from_slice(&grad);
    Some(values)
}

#[test]
fn hostile_cases_match_expected() {
    let dir = cases_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {dir:?}: {e}"))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 18,
        "expected the 18 cases in {dir:?}, found {}",
        paths.len()
    );
    for path in paths {
        let case = read_case(&path);
        let expected_path = path.with_extension("expected.json");
        let text = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("cannot read {expected_path:?}: {e}"));
        let expected: Value = serde_json::from_str(&text).expect("valid JSON");
        let emulated = Cuda::emulated().expect("the emulator is always available");
        let emu = run_case(&emulated, &case, &expected);
        let cpu = run_case(&Cpu, &case, &expected);
        if let (Some(emu), Some(cpu)) = (emu, cpu) {
            let diff = max_diff(&emu, &cpu);
            assert_eq!(
                diff.nan_mismatch, 0,
                "{}: NaN in one backend only",
                case.name
            );
            println!(
                "{}: emulator vs cpu max abs {:.2e}, max rel {:.2e}",
                case.name, diff.max_abs, diff.max_rel
            );
        }
    }
}
