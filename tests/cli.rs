//! The `dpo-kernels loss` command on bad input: every failure prints one `error:` line on
//! stderr, nothing on stdout, exits non-zero and never panics. The batch files are written
//! here, in a scratch directory under cargo's `CARGO_TARGET_TMPDIR`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A scratch directory for one test, emptied when created and removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{test}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One tensor of a batch file: name, dtype, shape and little-endian bytes.
type Tensor = (&'static str, Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn i64_bytes(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Logits `[2, 2, 4]` of one pair with two positions.
fn logits() -> Tensor {
    let values: Vec<f32> = (0..16).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
    (
        "policy_logits",
        Dtype::F32,
        vec![2, 2, 4],
        f32_bytes(&values),
    )
}

/// Labels `[2, 2]`: the chosen sequence has two tokens, the rejected one.
fn labels() -> Tensor {
    (
        "labels",
        Dtype::I64,
        vec![2, 2],
        i64_bytes(&[1, 3, 2, -100]),
    )
}

fn reference() -> Tensor {
    (
        "reference_logps",
        Dtype::F32,
        vec![2],
        f32_bytes(&[-2.5, -1.5]),
    )
}

/// Writes a batch file with `tensors` and string `metadata`.
fn write_batch(path: &Path, tensors: &[Tensor], metadata: &[(&str, &str)]) {
    let views = tensors.iter().map(|(name, dtype, shape, bytes)| {
        let view = TensorView::new(*dtype, shape.clone(), bytes).expect("valid tensor");
        (*name, view)
    });
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let metadata = (!metadata.is_empty()).then_some(metadata);
    safetensors::serialize_to_file(views, metadata, path).expect("write the batch file");
}

/// Runs `dpo-kernels loss ARGS` with stdout and stderr captured.
fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dpo-kernels"))
        .arg("loss")
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run dpo-kernels")
}

/// Checks a failed run: exit status 1, stdout empty, and a stderr of exactly one line that
/// starts with `error:` and contains every one of `parts`.
fn assert_fails(context: &str, output: &Output, parts: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{context}: stderr {stderr:?}"
    );
    assert!(stdout.is_empty(), "{context}: stdout {stdout:?}");
    assert!(!stderr.contains("panicked"), "{context}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{context}: stderr {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{context}: {stderr:?}");
    for part in parts {
        assert!(
            lines[0].contains(part),
            "{context}: {stderr:?} does not contain {part:?}"
        );
    }
}

/// Checks a run that clap rejected: exit status 2, no panic, one `error:` line among its
/// usage lines, containing every one of `parts`.
fn assert_usage_error(context: &str, output: &Output, parts: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{context}: stderr {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{context}: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{context}: stderr {stderr:?}");
    for part in parts {
        assert!(
            errors[0].contains(part),
            "{context}: {stderr:?} does not contain {part:?}"
        );
    }
}

/// Returns stdout of a run that must succeed.
fn assert_succeeds(context: &str, output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{context}: stderr {stderr:?}"
    );
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

#[test]
fn unreadable_inputs() {
    let scratch = Scratch::new("unreadable");
    let missing = scratch.path("missing.safetensors");
    let missing_name = missing.display().to_string();
    assert_fails(
        "missing file",
        &run(&["--input", &missing_name]),
        &["cannot access", &missing_name, "No such file"],
    );

    let directory = scratch.0.display().to_string();
    assert_fails(
        "a directory",
        &run(&["--input", &directory]),
        &["cannot access", &directory],
    );

    let text = scratch.path("text.safetensors");
    std::fs::write(&text, "hello, not a safetensors file\n").unwrap();
    assert_fails(
        "a text file",
        &run(&["--input", &text.display().to_string()]),
        &["not a valid safetensors file", "text.safetensors"],
    );

    let full = scratch.path("full.safetensors");
    write_batch(&full, &[logits(), labels(), reference()], &[]);
    let bytes = std::fs::read(&full).unwrap();
    for (name, keep) in [("header", 20), ("data", bytes.len() - 10)] {
        let truncated = scratch.path(&format!("truncated-{name}.safetensors"));
        std::fs::write(&truncated, &bytes[..keep]).unwrap();
        assert_fails(
            &format!("truncated in the {name}"),
            &run(&["--input", &truncated.display().to_string()]),
            &["not a valid safetensors file", "truncated"],
        );
    }
}

#[test]
fn invalid_tensors() {
    let scratch = Scratch::new("tensors");
    let f64_logits = (
        "policy_logits",
        Dtype::F64,
        vec![2, 2, 4],
        vec![0u8; 2 * 2 * 4 * 8],
    );
    let f32_labels = ("labels", Dtype::F32, vec![2, 2], f32_bytes(&[1.0; 4]));
    let i32_reference = ("reference_logps", Dtype::I32, vec![2], vec![0u8; 8]);
    let rank2_logits = (
        "policy_logits",
        Dtype::F32,
        vec![4, 4],
        f32_bytes(&[0.5; 16]),
    );
    let short_labels = ("labels", Dtype::I64, vec![2, 1], i64_bytes(&[1, 2]));
    let rank2_reference = (
        "reference_logps",
        Dtype::F32,
        vec![1, 2],
        f32_bytes(&[-1.0; 2]),
    );
    let odd_logits = (
        "policy_logits",
        Dtype::F32,
        vec![3, 1, 4],
        f32_bytes(&[0.5; 12]),
    );
    let odd_labels = ("labels", Dtype::I64, vec![3, 1], i64_bytes(&[1, 2, 3]));
    let empty_logits = ("policy_logits", Dtype::F32, vec![0, 2, 4], Vec::new());
    let empty_labels = ("labels", Dtype::I64, vec![0, 2], Vec::new());

    let cases: Vec<(&str, Vec<Tensor>, Vec<&str>)> = vec![
        (
            "F64 logits",
            vec![f64_logits, labels()],
            vec!["policy_logits is F64", "F32, BF16 or F16"],
        ),
        (
            "F32 labels",
            vec![logits(), f32_labels],
            vec!["labels is F32", "I64 or I32"],
        ),
        (
            "I32 reference",
            vec![logits(), labels(), i32_reference],
            vec!["reference_logps is I32", "F32"],
        ),
        (
            "rank-2 logits",
            vec![rank2_logits, labels()],
            vec!["[4, 4]", "3 dims"],
        ),
        (
            "labels [2, 1]",
            vec![logits(), short_labels],
            vec!["labels has shape [2, 1]", "[2, 2]"],
        ),
        (
            "reference [1, 2]",
            vec![logits(), labels(), rank2_reference],
            vec!["reference_logps has shape [1, 2]", "[2]"],
        ),
        ("no labels", vec![logits()], vec!["labels is missing"]),
        ("3 rows", vec![odd_logits, odd_labels], vec!["3 rows"]),
        (
            "0 rows",
            vec![empty_logits, empty_labels],
            vec!["empty batch", "[0, 2, 4]"],
        ),
    ];

    for (context, tensors, parts) in cases {
        let path = scratch.path("batch.safetensors");
        write_batch(&path, &tensors, &[]);
        assert_fails(
            context,
            &run(&["--input", &path.display().to_string()]),
            &parts,
        );
    }
}

#[test]
fn invalid_metadata_and_flags() {
    let scratch = Scratch::new("metadata");
    for (value, parts) in [
        ("abc", vec!["vocab_size = \"abc\"", "not a valid number"]),
        ("-3", vec!["vocab_size = \"-3\""]),
        ("0", vec!["vocabulary size 0", "[1, 4]"]),
        ("9", vec!["vocabulary size 9", "[1, 4]"]),
    ] {
        let path = scratch.path("batch.safetensors");
        write_batch(&path, &[logits(), labels()], &[("vocab_size", value)]);
        let context = format!("metadata vocab_size {value:?}");
        assert_fails(
            &context,
            &run(&["--input", &path.display().to_string()]),
            &parts,
        );
    }

    let path = scratch.path("batch.safetensors");
    write_batch(&path, &[logits(), labels(), reference()], &[]);
    let input = path.display().to_string();
    let flag_cases: [(&[&str], &[&str]); 7] = [
        (&["--vocab-size", "0"], &["vocabulary size 0"]),
        (&["--beta", "-1"], &["invalid beta = -1:"]),
        (&["--beta", "nan"], &["invalid beta = NaN:"]),
        (&["--beta", "0"], &["invalid beta = 0:"]),
        (&["--label-smoothing", "-0.1"], &["label_smoothing = -0.1:"]),
        (&["--label-smoothing", "0.6"], &["label_smoothing = 0.6:"]),
        (
            &["--loss", "ipo", "--label-smoothing", "0.1"],
            &["label_smoothing = 0.1:", "ipo"],
        ),
    ];
    for (flags, parts) in flag_cases {
        let mut args = vec!["--input", &input];
        args.extend_from_slice(flags);
        assert_fails(&flags.join(" "), &run(&args), parts);
    }

    // A negative vocabulary size and a flag in place of a value are usage errors.
    assert_usage_error(
        "--vocab-size -1",
        &run(&["--input", &input, "--vocab-size", "-1"]),
        &["-1", "--vocab-size"],
    );
    assert_usage_error(
        "--ignore-index --json",
        &run(&["--input", &input, "--ignore-index", "--json"]),
        &["--ignore-index"],
    );
}

#[test]
fn negative_ignore_index() {
    let scratch = Scratch::new("ignore-index");
    let path = scratch.path("batch.safetensors");
    write_batch(&path, &[logits(), labels(), reference()], &[]);
    let input = path.display().to_string();
    assert_fails(
        "--ignore-index -1 with label -100",
        &run(&["--input", &input, "--ignore-index", "-1"]),
        &["label -100", "ignore_index -1"],
    );

    let minus_one = ("labels", Dtype::I64, vec![2, 2], i64_bytes(&[1, 3, 2, -1]));
    write_batch(&path, &[logits(), minus_one, reference()], &[]);
    let stdout = assert_succeeds(
        "--ignore-index -1",
        &run(&["--input", &input, "--ignore-index", "-1", "--json"]),
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    assert!(json["loss"].as_f64().is_some_and(f64::is_finite), "{json}");
}

#[test]
fn output_path_problems() {
    let scratch = Scratch::new("output");
    let path = scratch.path("batch.safetensors");
    write_batch(&path, &[logits(), labels(), reference()], &[]);
    let input = path.display().to_string();
    let original = std::fs::read(&path).unwrap();

    let missing_dir = scratch.path("no/such/dir/out.safetensors");
    assert_fails(
        "--output in a missing directory",
        &run(&[
            "--input",
            &input,
            "--output",
            &missing_dir.display().to_string(),
        ]),
        &["invalid output path", "no/such/dir", "does not exist"],
    );

    let directory = scratch.0.display().to_string();
    assert_fails(
        "--output is a directory",
        &run(&["--input", &input, "--output", &directory]),
        &["invalid output path", "is a directory"],
    );

    // Writing the outputs over the batch would destroy it, by name or through a link.
    assert_fails(
        "--output = --input",
        &run(&["--input", &input, "--output", &input]),
        &["invalid output path", "is the input file"],
    );
    assert_eq!(std::fs::read(&path).unwrap(), original, "the input changed");
    #[cfg(unix)]
    {
        let link = scratch.path("link.safetensors");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let link_name = link.display().to_string();
        assert_fails(
            "--output is a link to --input",
            &run(&["--input", &input, "--output", &link_name]),
            &["is the input file"],
        );
        let hard_link = scratch.path("hard-link.safetensors");
        std::fs::hard_link(&path, &hard_link).unwrap();
        assert_fails(
            "--output is a hard link to --input",
            &run(&[
                "--input",
                &input,
                "--output",
                &hard_link.display().to_string(),
            ]),
            &["is the input file"],
        );
        assert_eq!(std::fs::read(&path).unwrap(), original, "the input changed");
    }

    // A new file beside the input is fine.
    let out = scratch.path("out.safetensors");
    assert_succeeds(
        "--output beside the input",
        &run(&["--input", &input, "--output", &out.display().to_string()]),
    );
    assert!(out.is_file());
}

#[test]
fn json_with_infinite_loss() {
    // A chosen target logit of -inf gives log-prob -inf and loss +inf: the JSON stays valid
    // and carries the infinities as strings.
    let scratch = Scratch::new("json");
    let mut values: Vec<f32> = (0..16).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
    values[1] = f32::NEG_INFINITY; // row 0, position 0, target 1
    let logits = (
        "policy_logits",
        Dtype::F32,
        vec![2, 2, 4],
        f32_bytes(&values),
    );
    let path = scratch.path("batch.safetensors");
    write_batch(&path, &[logits, labels(), reference()], &[]);
    let stdout = assert_succeeds(
        "--json, loss inf",
        &run(&["--input", &path.display().to_string(), "--json"]),
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    assert_eq!(json["loss"], "inf", "{json}");
    assert_eq!(json["chosen_logps"][0], "-inf", "{json}");
    assert!(json["rejected_logps"][0].as_f64().is_some(), "{json}");
}

#[test]
fn zero_positions_file() {
    let scratch = Scratch::new("zero-positions");
    let logits = ("policy_logits", Dtype::F32, vec![2, 0, 4], Vec::new());
    let labels = ("labels", Dtype::I64, vec![2, 0], Vec::new());
    let path = scratch.path("batch.safetensors");
    write_batch(&path, &[logits, labels], &[]);
    let out = scratch.path("out.safetensors");
    let stdout = assert_succeeds(
        "T = 0",
        &run(&[
            "--input",
            &path.display().to_string(),
            "--json",
            "--output",
            &out.display().to_string(),
        ]),
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    let loss = json["loss"].as_f64().expect("numeric loss");
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{json}");
    let bytes = std::fs::read(&out).unwrap();
    let written = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let grad = written.tensor("policy_logits_grad").unwrap();
    assert_eq!(grad.shape(), [2, 0, 4]);
}

/// Runs a good batch with stdout connected to `stdout` and checks for one `error:` line.
fn assert_stdout_error(context: &str, stdout: Stdio, parts: &[&str]) {
    let scratch = Scratch::new(&context.replace(' ', "-"));
    let path = scratch.path("batch.safetensors");
    write_batch(&path, &[logits(), labels(), reference()], &[]);
    let output = Command::new(env!("CARGO_BIN_EXE_dpo-kernels"))
        .args(["loss", "--input", &path.display().to_string()])
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("run dpo-kernels");
    assert_fails(context, &output, parts);
}

#[test]
fn stdout_write_failures() {
    // A reader that has gone away (`dpo-kernels loss ... | head -0`) gives EPIPE, because
    // Rust programs ignore SIGPIPE.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    assert_stdout_error("closed pipe", Stdio::from(writer), &["standard output"]);

    let full = Path::new("/dev/full");
    if full.exists() {
        let file = std::fs::OpenOptions::new().write(true).open(full).unwrap();
        assert_stdout_error("full device", Stdio::from(file), &["standard output"]);
    }
}
