//! Hostile-input cases and a real batch, read from safetensors files in `tests/data/`.
//!
//! Each case `cases/NAME.safetensors` contains `policy_logits` F32 `[2B, T, W]`, `labels` I64
//! `[2B, T]` and `reference_logps` F32 `[2B]`. Its metadata contains `beta`, `label_smoothing`,
//! `ignore_index` and, when `W > V`, `vocab_size`. `NAME.expected.json` contains float64
//! expected outputs (`loss`, `chosen_logps`, `rejected_logps`, `dloss_dz`, `grad_probes` as
//! `[row, t, v, value]`, `grad` for the small cases, `grad_max_abs_padded`) or an error kind
//! (`invalid_label`, `nonfinite_logit`, `empty_batch`) with an example message in `detail`.
//!
//! Every case runs on every backend, in f32 against the expected file, and in f32, f16 and
//! bf16 against the f64 reference in `common/reference.rs`. The reference is also checked
//! against the expected files, which come from an independent float64 implementation.

mod common;

use std::path::{Path, PathBuf};

use common::reference::{self, RefForward, RefParams};
use common::{
    assert_close, assert_close_at, backends, check_batch, grad_index, widen_f32, Inputs, RefData,
    TestFloat, TestLabel, Tolerances,
};
use dpo_kernels::{Batch, BatchShape, DpoConfig, Error, LossKind};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// Returns `tests/data` of the checkout this test was built in, or of the current directory
/// when the binary runs elsewhere (`scripts/gpu-check.sh` runs staged binaries from the root
/// of another copy of the repository).
fn data_dir() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("tests").join("data")
    }
}

/// A batch file as read, before any shape check.
struct CaseFile {
    name: String,
    /// `[rows, T, W]` of `policy_logits`.
    dims: [usize; 3],
    vocab: usize,
    /// Logits widened to f32 (exact for F32 and BF16 files).
    logits: Vec<f32>,
    /// The file's BF16 logits, when it stores them as BF16.
    logits_bf16: Option<Vec<bf16>>,
    labels: Vec<i64>,
    reference: Vec<f32>,
    config: DpoConfig,
}

impl CaseFile {
    /// Reads a batch file. Parameters missing from its metadata take `defaults`' values.
    fn read(path: &Path, defaults: DpoConfig) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|err| panic!("cannot read {path:?}: {err}"));
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .unwrap_or_else(|err| panic!("invalid safetensors header in {path:?}: {err}"));
        let tensors = SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|err| panic!("invalid safetensors file {path:?}: {err}"));
        let metadata = header.metadata().clone().unwrap_or_default();
        let param = |key: &str| metadata.get(key).map(|v| v.as_str());

        let logits_view = tensors.tensor("policy_logits").expect("policy_logits");
        let shape = logits_view.shape();
        assert_eq!(shape.len(), 3, "{path:?}: policy_logits must be [2B, T, W]");
        let dims = [shape[0], shape[1], shape[2]];
        let (logits, logits_bf16) = match logits_view.dtype() {
            Dtype::F32 => (f32_values(logits_view.data()), None),
            Dtype::BF16 => {
                let values: Vec<bf16> = logits_view
                    .data()
                    .chunks_exact(2)
                    .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                    .collect();
                (values.iter().map(|x| x.to_f32()).collect(), Some(values))
            }
            other => panic!("{path:?}: policy_logits is {other:?}, expected F32 or BF16"),
        };
        let labels_view = tensors.tensor("labels").expect("labels");
        assert_eq!(labels_view.dtype(), Dtype::I64, "{path:?}: labels dtype");
        let labels = labels_view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let reference_view = tensors.tensor("reference_logps").expect("reference_logps");
        assert_eq!(
            reference_view.dtype(),
            Dtype::F32,
            "{path:?}: reference_logps dtype"
        );
        let reference = f32_values(reference_view.data());

        let mut config = defaults;
        if let Some(beta) = param("beta") {
            config.beta = beta.parse().expect("beta");
        }
        if let Some(eps) = param("label_smoothing") {
            config.loss = LossKind::Sigmoid {
                label_smoothing: eps.parse().expect("label_smoothing"),
            };
        }
        if let Some(ignore_index) = param("ignore_index") {
            config.ignore_index = ignore_index.parse().expect("ignore_index");
        }
        match param("mode") {
            None | Some("sum") => config.length_normalize = false,
            Some("mean") => config.length_normalize = true,
            Some(other) => panic!("{path:?}: unknown mode {other:?}"),
        }
        let vocab = param("vocab_size").map_or(dims[2], |v| v.parse().expect("vocab_size"));
        CaseFile {
            name: path
                .file_stem()
                .expect("file name")
                .to_string_lossy()
                .into_owned(),
            dims,
            vocab,
            logits,
            logits_bf16,
            labels,
            reference,
            config,
        }
    }

    /// Returns the logits rounded to `T`, the shape and the labels and references as given.
    fn inputs<T: TestFloat>(&self, shape: BatchShape) -> Inputs<T> {
        Inputs {
            shape,
            logits: self.logits.iter().map(|&x| T::round(x)).collect(),
            labels: self.labels.clone(),
            reference: Some(self.reference.clone()),
        }
    }
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect()
}

/// Returns the integer after the first `key` in `text` (e.g. `row ` in `row 1, position 2`).
fn number_after(text: &str, key: &str) -> Option<i64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
        .map_or(rest.len(), |(i, _)| i);
    rest[..end].parse().ok()
}

fn json_f64s(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

/// Returns the expected `l'(z_i)` of each pair. The files store the derivative of the mean
/// loss, `l'(z_i) / B`, while `DpoOutput::dloss_dmargin` is the per-pair `l'(z_i)`.
fn expected_dloss_dz(expected: &Value, pairs: usize) -> Vec<f64> {
    let per_batch = json_f64s(&expected["dloss_dz"]);
    per_batch.iter().map(|d| d * pairs as f64).collect()
}

/// Flattens the nested `[2B][T][W]` gradient array.
fn json_grad(value: &Value) -> Vec<f64> {
    let mut flat = Vec::new();
    for row in value.as_array().expect("grad rows") {
        for position in row.as_array().expect("grad positions") {
            flat.extend(json_f64s(position));
        }
    }
    flat
}

/// Lists the cases; a missing or renamed file fails here rather than silently shrinking the
/// suite.
fn case_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data_dir().join("cases"))
        .expect("tests/data/cases")
        .filter_map(|entry| {
            let name = entry
                .expect("directory entry")
                .file_name()
                .into_string()
                .ok()?;
            name.strip_suffix(".expected.json").map(str::to_string)
        })
        .collect();
    names.sort();
    assert_eq!(
        names.len(),
        18,
        "expected 18 cases in tests/data/cases, found {names:?}"
    );
    names
}

fn load_case(name: &str) -> (CaseFile, Value) {
    let dir = data_dir().join("cases");
    let case = CaseFile::read(
        &dir.join(format!("{name}.safetensors")),
        DpoConfig::new(0.1),
    );
    let text = std::fs::read_to_string(dir.join(format!("{name}.expected.json")))
        .unwrap_or_else(|err| panic!("{name}: cannot read the expected file: {err}"));
    let expected = serde_json::from_str(&text).expect("expected JSON");
    (case, expected)
}

/// Checks that `case` fails on every backend with the error kind and values of `expected`.
fn check_error_case<T: TestFloat, L: TestLabel>(case: &CaseFile, expected: &Value) {
    let kind = expected["error"].as_str().expect("error kind");
    let detail = expected["detail"].as_str().unwrap_or("");
    let context = format!("{}/{}/{}", case.name, T::NAME, L::NAME);
    let [rows, t, w] = case.dims;
    let shape = match BatchShape::from_dims(rows, t, w, case.vocab) {
        Ok(shape) => shape,
        Err(err) => {
            assert_eq!(kind, "empty_batch", "{context}: from_dims failed: {err}");
            assert!(
                matches!(err, Error::EmptyBatch { .. }),
                "{context}: {err:?}"
            );
            assert!(
                err.to_string().contains(&format!("{:?}", case.dims)),
                "{context}: {err}"
            );
            return;
        }
    };
    let inputs = case.inputs::<T>(shape);
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(shape, &inputs.logits, &labels, inputs.reference.as_deref());
    for backend in backends() {
        let context = format!("{}: {context}", backend.name);
        let err = match backend.open(case.config).forward(&batch) {
            Ok(out) => panic!(
                "{context}: succeeded with loss {}, expected {kind}",
                out.loss
            ),
            Err(err) => err,
        };
        let message = err.to_string();
        let row = number_after(detail, "row ").expect("row in detail") as usize;
        let position = number_after(detail, "position ").expect("position in detail") as usize;
        match kind {
            "invalid_label" => {
                let label = number_after(detail, "label ").expect("label in detail");
                assert!(
                    matches!(err, Error::InvalidLabel { row: r, position: p, label: l, vocab, .. }
                        if r == row && p == position && l == label && vocab == case.vocab),
                    "{context}: {err:?}"
                );
                for part in [format!("label {label}"), format!("[0, {})", case.vocab)] {
                    assert!(
                        message.contains(&part),
                        "{context}: {message:?} lacks {part:?}"
                    );
                }
            }
            "nonfinite_logit" => {
                assert!(
                    matches!(err, Error::NonFiniteLogit { row: r, position: p, .. }
                        if r == row && p == position),
                    "{context}: {err:?}"
                );
                let column = number_after(detail, "column ").expect("column in detail");
                let value = if detail.ends_with("nan") {
                    "NaN"
                } else {
                    "+inf"
                };
                for part in [format!("column {column}"), value.to_string()] {
                    assert!(
                        message.contains(&part),
                        "{context}: {message:?} lacks {part:?}"
                    );
                }
            }
            other => panic!("{context}: no check for expected error kind {other:?}, got {err:?}"),
        }
    }
}

/// Compares the f64 reference with the expected file. Both are float64 from the same f32
/// inputs; they differ by the f32 rounding of beta (relative 1.5e-8) and by summation order.
fn check_reference_against_expected(name: &str, fwd: &RefForward, grad: &[f64], expected: &Value) {
    let b = fwd.losses.len();
    let (atol, rtol) = (1e-12, 1e-6);
    let close = |what: &str, got: &[f64], want: &[f64]| {
        let scale: Vec<f64> = want.iter().map(|x| x.abs()).collect();
        assert_close(
            &format!("{name}: reference {what} vs expected"),
            got,
            want,
            atol,
            rtol,
            &scale,
        );
    };
    close(
        "loss",
        &[fwd.loss],
        &[expected["loss"].as_f64().expect("loss")],
    );
    close(
        "chosen_logps",
        &fwd.seq_logp[..b],
        &json_f64s(&expected["chosen_logps"]),
    );
    close(
        "rejected_logps",
        &fwd.seq_logp[b..],
        &json_f64s(&expected["rejected_logps"]),
    );
    close("dloss_dz", &fwd.dloss_dz, &expected_dloss_dz(expected, b));
    if !expected["grad"].is_null() {
        close("grad", grad, &json_grad(&expected["grad"]));
    }
}

/// Compares the crate's f32 outputs with the expected file, with the tolerances of the f64
/// reference run on the same inputs.
fn check_crate_against_expected<L: TestLabel>(
    case: &CaseFile,
    shape: BatchShape,
    expected: &Value,
) {
    let inputs = case.inputs::<f32>(shape);
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(shape, &inputs.logits, &labels, inputs.reference.as_deref());
    let params = RefParams::from_config(&case.config);
    let data = RefData::new(&inputs);
    let fwd = reference::forward(&data.batch(), &params);
    let grad_ref = reference::gradient(&data.batch(), &params, &fwd, 1.0);
    check_reference_against_expected(&case.name, &fwd, &grad_ref, expected);
    let tol = Tolerances::new(&fwd, &params);
    let b = shape.pairs;
    let (t, w, v) = (shape.seq_len, shape.row_stride, shape.vocab);

    for backend in backends() {
        let context = format!(
            "{}: {}/f32/{} vs expected",
            backend.name,
            case.name,
            L::NAME
        );
        let dpo = backend.open(case.config);
        let out = dpo
            .forward(&batch)
            .unwrap_or_else(|err| panic!("{context}: forward failed: {err}"));
        let mut grad = vec![f32::NAN; shape.logits_len()];
        dpo.backward(&batch, &out.state, 1.0, &mut grad)
            .unwrap_or_else(|err| panic!("{context}: backward failed: {err}"));
        let grad = widen_f32(&grad);

        let loss = expected["loss"].as_f64().expect("loss");
        assert_close(
            &format!("{context} loss"),
            &[out.loss as f64],
            &[loss],
            tol.loss,
            0.0,
            0.0,
        );
        let chosen = json_f64s(&expected["chosen_logps"]);
        let rejected = json_f64s(&expected["rejected_logps"]);
        assert_close(
            &format!("{context} chosen_logps"),
            &widen_f32(&out.chosen_logps),
            &chosen,
            &tol.seq_logp[..b],
            0.0,
            0.0,
        );
        assert_close(
            &format!("{context} rejected_logps"),
            &widen_f32(&out.rejected_logps),
            &rejected,
            &tol.seq_logp[b..],
            0.0,
            0.0,
        );
        assert_close(
            &format!("{context} dloss_dz"),
            &widen_f32(&out.dloss_dmargin),
            &expected_dloss_dz(expected, b),
            &tol.dloss_dz,
            0.0,
            0.0,
        );

        let grad_atol = |row: usize| tol.grad_atol(&fwd, row, 1.0, f32::MIN_SUBNORMAL);
        let probes = expected["grad_probes"].as_array().expect("grad_probes");
        let mut got = Vec::new();
        let mut want = Vec::new();
        let mut atol = Vec::new();
        for probe in probes {
            let [row, position, column, value] = json_f64s(probe)[..] else {
                panic!("{context}: probe {probe} is not [row, t, v, value]");
            };
            let (row, position, column) = (row as usize, position as usize, column as usize);
            got.push(grad[(row * t + position) * w + column]);
            want.push(value);
            atol.push(grad_atol(row));
        }
        let scale: Vec<f64> = want.iter().map(|x| x.abs()).collect();
        assert_close_at(
            &format!("{context} grad_probes"),
            &got,
            &want,
            &atol,
            f32::GRAD_RTOL,
            &scale,
            |i| format!("probe {i} {}", probes[i]),
        );
        if !expected["grad"].is_null() {
            let want = json_grad(&expected["grad"]);
            let per_seq = t * w;
            let atol: Vec<f64> = (0..want.len()).map(|i| grad_atol(i / per_seq)).collect();
            let scale: Vec<f64> = want.iter().map(|x| x.abs()).collect();
            assert_close_at(
                &format!("{context} grad"),
                &grad,
                &want,
                &atol,
                f32::GRAD_RTOL,
                &scale,
                grad_index(&shape),
            );
        }
        let max_padded = expected["grad_max_abs_padded"]
            .as_f64()
            .expect("grad_max_abs_padded");
        for (i, g) in grad.iter().enumerate() {
            if i % w >= v {
                assert!(
                    g.abs() <= max_padded,
                    "{context}: padded gradient {g:e} at {i}"
                );
            }
        }
    }
}

/// Runs a case that must succeed on every backend, dtype and label type.
fn check_ok_case<T: TestFloat, L: TestLabel>(case: &CaseFile, expected: &Value) {
    let [rows, t, w] = case.dims;
    let shape = BatchShape::from_dims(rows, t, w, case.vocab)
        .unwrap_or_else(|err| panic!("{}: invalid dims: {err}", case.name));
    if T::NAME == "f32" {
        check_crate_against_expected::<L>(case, shape, expected);
    }
    let inputs = case.inputs::<T>(shape);
    for backend in backends() {
        check_batch::<T, L>(backend, case.config, &inputs, 1.0);
    }
}

fn check_case<T: TestFloat, L: TestLabel>(name: &str) {
    let (case, expected) = load_case(name);
    if expected["error"].is_string() {
        check_error_case::<T, L>(&case, &expected);
    } else {
        check_ok_case::<T, L>(&case, &expected);
    }
}

#[test]
fn hostile_input_cases() {
    for name in case_names() {
        check_case::<f32, i64>(&name);
        check_case::<f32, i32>(&name);
        check_case::<f16, i64>(&name);
        check_case::<f16, i32>(&name);
        check_case::<bf16, i64>(&name);
        check_case::<bf16, i32>(&name);
    }
}

#[test]
fn number_after_parses_signed_integers() {
    let detail = "row 0, position 2: label -100 is not in [0, 6)";
    assert_eq!(number_after(detail, "row "), Some(0));
    assert_eq!(number_after(detail, "position "), Some(2));
    assert_eq!(number_after(detail, "label "), Some(-100));
    assert_eq!(number_after(detail, "column "), None);
}

/// A real DPO batch: SmolLM2-135M-Instruct, one pair of 40 positions, V = 49152, BF16
/// policy logits, F32 reference log-prob sums, beta 0.1.
#[test]
fn smollm2_real_batch() {
    let path = data_dir().join("smollm2-one-pair.safetensors");
    let case = CaseFile::read(&path, DpoConfig::new(0.1));
    assert_eq!(case.dims, [2, 40, 49152], "smollm2 batch dims");
    let shape = BatchShape::from_dims(2, 40, 49152, 49152).expect("shape");
    let stored = case.logits_bf16.clone().expect("BF16 logits");

    // The file's own BF16 values, and the same values widened to f32 (exact).
    let inputs = Inputs::<bf16> {
        shape,
        logits: stored,
        labels: case.labels.clone(),
        reference: Some(case.reference.clone()),
    };
    let widened = case.inputs::<f32>(shape);
    let valid = case
        .labels
        .iter()
        .filter(|&&y| y != case.config.ignore_index)
        .count();
    assert!(
        valid > 0 && valid < 80,
        "expected a masked prompt, got {valid} valid positions"
    );
    for backend in backends() {
        let stats = check_batch::<bf16, i64>(backend, case.config, &inputs, 1.0);
        stats.print(&format!(
            "{}: smollm2 bf16 logits, max error per output",
            backend.name
        ));
        check_batch::<bf16, i32>(backend, case.config, &inputs, 1.0);
        let stats = check_batch::<f32, i64>(backend, case.config, &widened, 1.0);
        stats.print(&format!(
            "{}: smollm2 logits widened to f32, max error per output",
            backend.name
        ));

        let labels = inputs.labels_as::<i64>();
        let batch = Batch::new(shape, &inputs.logits, &labels, inputs.reference.as_deref());
        let out = backend.open(case.config).forward(&batch).expect("forward");
        println!(
            "{}: smollm2 loss {:.6}, chosen logp {:.4}, rejected logp {:.4}",
            backend.name, out.loss, out.chosen_logps[0], out.rejected_logps[0]
        );
        for (metric, value) in out.metrics.named() {
            println!("  {metric:<20} {value:.6}");
        }
    }
}
