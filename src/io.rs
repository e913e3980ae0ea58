//! Batch files: safetensors with `policy_logits` `[2B, T, W]` (F32, BF16 or F16), `labels`
//! `[2B, T]` (I64 or I32), optional `reference_logps` `[2B]` (F32; absent means
//! reference-free) and, when `W > V`, the metadata key `vocab_size` holding V in decimal.
//!
//! Outputs are written as safetensors with `loss` (F32 `[]`), `losses`, `chosen_logps`,
//! `rejected_logps`, `chosen_rewards`, `rejected_rewards` (F32 `[B]`) and `policy_logits_grad`
//! (F32 `[2B, T, W]`). Other tools read these names.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::batch::BatchShape;
use crate::error::{Error, Result};
use crate::output::DpoOutput;

/// Logits of a batch file in their stored dtype.
#[derive(Clone, Debug)]
pub enum LogitsData {
    /// F32 logits.
    F32(Vec<f32>),
    /// F16 logits.
    F16(Vec<f16>),
    /// BF16 logits.
    BF16(Vec<bf16>),
}

/// Labels of a batch file in their stored dtype.
#[derive(Clone, Debug)]
pub enum LabelsData {
    /// I32 labels.
    I32(Vec<i32>),
    /// I64 labels.
    I64(Vec<i64>),
}

/// A batch read from a safetensors file.
#[derive(Clone, Debug)]
pub struct BatchFile {
    /// Dimensions, with V from `--vocab-size`, the `vocab_size` metadata or W, in that order.
    pub shape: BatchShape,
    /// `policy_logits`.
    pub logits: LogitsData,
    /// `labels`.
    pub labels: LabelsData,
    /// `reference_logps`, if present.
    pub reference_logps: Option<Vec<f32>>,
    /// The file's string metadata (empty when it has none).
    pub metadata: HashMap<String, String>,
}

impl BatchFile {
    /// Returns a metadata value parsed as `F`, `None` when the key is absent.
    pub fn metadata_value<F: std::str::FromStr>(
        &self,
        key: &str,
        path: &Path,
    ) -> Result<Option<F>> {
        parse_metadata(&self.metadata, key, path)
    }
}

fn batch_error(path: &Path, detail: String) -> Error {
    Error::BatchFile {
        path: path.display().to_string(),
        detail,
    }
}

fn parse_metadata<F: std::str::FromStr>(
    metadata: &HashMap<String, String>,
    key: &str,
    path: &Path,
) -> Result<Option<F>> {
    match metadata.get(key) {
        None => Ok(None),
        Some(text) => text.trim().parse().map(Some).map_err(|_| {
            batch_error(
                path,
                format!("metadata key {key} = {text:?} is not a valid number"),
            )
        }),
    }
}

/// Reads a batch file. `vocab_override` replaces the file's `vocab_size` metadata.
pub fn read_batch(path: &Path, vocab_override: Option<usize>) -> Result<BatchFile> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let not_safetensors = |source: safetensors::SafeTensorError| {
        batch_error(
            path,
            format!("not a valid safetensors file ({source}); pass a batch written as safetensors"),
        )
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(not_safetensors)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = SafeTensors::deserialize(&bytes).map_err(not_safetensors)?;
    let get = |name: &str| {
        tensors.tensor(name).map_err(|_| {
            batch_error(
                path,
                format!("tensor {name} is missing; a batch file needs policy_logits and labels"),
            )
        })
    };

    // 1. Logits [2B, T, W] and the vocabulary size.
    let logits_view = get("policy_logits")?;
    let dims = logits_view.shape().to_vec();
    if dims.len() != 3 {
        return Err(batch_error(
            path,
            format!("policy_logits has shape {dims:?}; expected 3 dims [2B, T, W]"),
        ));
    }
    let (rows, seq_len, row_stride) = (dims[0], dims[1], dims[2]);
    let vocab = match vocab_override {
        Some(v) => v,
        None => parse_metadata(&metadata, "vocab_size", path)?.unwrap_or(row_stride),
    };
    let shape = BatchShape::from_dims(rows, seq_len, row_stride, vocab)?;
    let raw = logits_view.data();
    let logits = match logits_view.dtype() {
        Dtype::F32 => LogitsData::F32(bytemuck::pod_collect_to_vec(raw)),
        Dtype::F16 => LogitsData::F16(bytemuck::pod_collect_to_vec(raw)),
        Dtype::BF16 => LogitsData::BF16(bytemuck::pod_collect_to_vec(raw)),
        other => {
            return Err(Error::DTypeMismatch {
                tensor: "policy_logits".to_string(),
                got: format!("{other:?}"),
                expected: "F32, BF16 or F16",
            })
        }
    };

    // 2. Labels [2B, T].
    let labels_view = get("labels")?;
    if labels_view.shape() != [rows, seq_len] {
        return Err(Error::ShapeMismatch {
            tensor: "labels",
            got: labels_view.shape().to_vec(),
            expected: vec![rows, seq_len],
        });
    }
    let labels = match labels_view.dtype() {
        Dtype::I64 => LabelsData::I64(bytemuck::pod_collect_to_vec(labels_view.data())),
        Dtype::I32 => LabelsData::I32(bytemuck::pod_collect_to_vec(labels_view.data())),
        other => {
            return Err(Error::DTypeMismatch {
                tensor: "labels".to_string(),
                got: format!("{other:?}"),
                expected: "I64 or I32",
            })
        }
    };

    // 3. Optional reference log-probs [2B].
    let reference_logps = match tensors.tensor("reference_logps") {
        Err(_) => None,
        Ok(view) => {
            if view.dtype() != Dtype::F32 {
                return Err(Error::DTypeMismatch {
                    tensor: "reference_logps".to_string(),
                    got: format!("{:?}", view.dtype()),
                    expected: "F32",
                });
            }
            if view.shape() != [rows] {
                return Err(Error::ShapeMismatch {
                    tensor: "reference_logps",
                    got: view.shape().to_vec(),
                    expected: vec![rows],
                });
            }
            Some(bytemuck::pod_collect_to_vec(view.data()))
        }
    };

    Ok(BatchFile {
        shape,
        logits,
        labels,
        reference_logps,
        metadata,
    })
}

/// Checks an output path before any work: its directory must exist, it must not be a
/// directory, and it must not be the input file, which writing the outputs would replace. A
/// path that reaches the input through a symbolic or hard link counts as the input.
pub fn check_output_path(output: &Path, input: &Path) -> Result<()> {
    let invalid = |detail: String| Error::InvalidOutputPath {
        path: output.display().to_string(),
        detail,
    };
    if output.is_dir() {
        return Err(invalid(
            "it is a directory; name a file in it, such as out.safetensors".to_string(),
        ));
    }
    let directory = match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if !directory.is_dir() {
        return Err(invalid(format!(
            "its directory {} does not exist; create it first",
            directory.display()
        )));
    }
    if is_same_file(output, input) {
        return Err(invalid(
            "it is the input file, which the outputs would replace; choose another path"
                .to_string(),
        ));
    }
    Ok(())
}

/// Returns true when both paths exist and name one file.
#[cfg(unix)]
fn is_same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Returns true when both paths exist and resolve to one path (hard links are not detected).
#[cfg(not(unix))]
fn is_same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Writes the forward outputs and the f32 logits gradient to a safetensors file.
pub fn write_outputs(
    path: &Path,
    shape: &BatchShape,
    output: &DpoOutput,
    grad: &[f32],
) -> Result<()> {
    let pairs = vec![shape.pairs];
    let grad_dims = vec![shape.sequences(), shape.seq_len, shape.row_stride];
    let loss = [output.loss];
    let entries: [(&str, &[f32], Vec<usize>); 7] = [
        ("loss", &loss, vec![]),
        ("losses", &output.losses, pairs.clone()),
        ("chosen_logps", &output.chosen_logps, pairs.clone()),
        ("rejected_logps", &output.rejected_logps, pairs.clone()),
        ("chosen_rewards", &output.chosen_rewards, pairs.clone()),
        ("rejected_rewards", &output.rejected_rewards, pairs),
        ("policy_logits_grad", grad, grad_dims),
    ];
    let safetensors_error = |source| Error::SafeTensors {
        path: path.display().to_string(),
        source,
    };
    let views = entries
        .iter()
        .map(|(name, values, dims)| {
            let bytes: &[u8] = bytemuck::cast_slice(values);
            safetensors::tensor::TensorView::new(Dtype::F32, dims.clone(), bytes)
                .map(|view| (*name, view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(safetensors_error)?;
    safetensors::serialize_to_file(views, None, path).map_err(safetensors_error)?;

    // serialize_to_file writes a private temporary file (mode 0600) and renames it, so give
    // the output the usual mode of a data file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(
            |source| Error::Io {
                path: path.display().to_string(),
                source,
            },
        )?;
    }
    Ok(())
}
