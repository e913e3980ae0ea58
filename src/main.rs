//! `dpo-kernels`: run the fused DPO loss on a batch file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use dpo_kernels::io::{
    check_output_path, read_batch, write_outputs, BatchFile, LabelsData, LogitsData,
};
use dpo_kernels::{
    Batch, Device, DpoConfig, DpoLoss, DpoOutput, Element, Error, Label, LossKind, Result,
};

#[derive(Parser)]
#[command(
    name = "dpo-kernels",
    version,
    about = "Fused DPO loss and gradient over policy logits"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compute the DPO loss and metrics of a safetensors batch file, and with --output its
    /// gradient.
    Loss(LossArgs),
    /// Compile every CUDA kernel with NVRTC (no GPU needed) and print each entry's registers,
    /// shared memory and spills. Fails on a compile error or a spill.
    CheckKernels(dpo_kernels::cuda::CheckKernelsArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// The rayon CPU backend.
    Cpu,
    /// CUDA device 0; fails when there is none.
    Cuda,
    /// CUDA when a driver, NVRTC and a GPU are present, otherwise the CPU.
    Auto,
}

#[derive(Clone, Copy, ValueEnum)]
enum LossArg {
    /// DPO with optional conservative label smoothing.
    Sigmoid,
    /// Robust DPO (unbiased under label noise).
    Robust,
    /// IPO (squared loss on the margin).
    Ipo,
    /// Hinge loss on the margin.
    Hinge,
}

#[derive(clap::Args)]
struct LossArgs {
    /// Batch file: policy_logits [2B,T,W], labels [2B,T], optional reference_logps [2B].
    #[arg(long, value_name = "BATCH")]
    input: PathBuf,
    /// Also run the backward, and write the loss, per-pair outputs and policy_logits_grad (F32)
    /// to this safetensors file.
    #[arg(long, value_name = "OUT")]
    output: Option<PathBuf>,
    // Numeric flags take negative values, so that `--beta -1` reaches the range check and
    // gets its error message instead of clap's "unexpected argument".
    /// Inverse temperature beta > 0 [default: the file's `beta` metadata, else 0.1].
    #[arg(long, allow_negative_numbers = true)]
    beta: Option<f32>,
    /// Label value that masks a position out [default: the file's `ignore_index`, else -100].
    #[arg(long, allow_negative_numbers = true)]
    ignore_index: Option<i64>,
    /// True vocabulary size V <= W [default: the file's `vocab_size`, else W].
    #[arg(long, allow_negative_numbers = true)]
    vocab_size: Option<usize>,
    /// Loss family member.
    #[arg(long, value_enum, default_value = "sigmoid")]
    loss: LossArg,
    /// Label-smoothing rate for sigmoid and robust losses [default: the file's
    /// `label_smoothing`, else 0].
    #[arg(long, allow_negative_numbers = true)]
    label_smoothing: Option<f32>,
    /// Divide each sequence log-prob by its number of valid positions (reference_logps must be
    /// normalised the same way).
    #[arg(long)]
    length_normalize: bool,
    /// Backend.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Loss(args) => run_loss(&args),
        Command::CheckKernels(args) => {
            dpo_kernels::cuda::check::run_check_kernels(&args, &mut std::io::stdout())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the config from flags, then the file's metadata, then defaults.
fn build_config(args: &LossArgs, file: &BatchFile) -> Result<DpoConfig> {
    let path = args.input.as_path();
    let beta = match args.beta {
        Some(beta) => beta,
        None => file.metadata_value("beta", path)?.unwrap_or(0.1),
    };
    // The file's label_smoothing describes a sigmoid or robust run; ipo and hinge have no
    // smoothing, so only an explicit flag can conflict with them.
    let smoothing_loss = matches!(args.loss, LossArg::Sigmoid | LossArg::Robust);
    let label_smoothing = match args.label_smoothing {
        Some(eps) => eps,
        None if smoothing_loss => file.metadata_value("label_smoothing", path)?.unwrap_or(0.0),
        None => 0.0,
    };
    let ignore_index = match args.ignore_index {
        Some(index) => index,
        None => file.metadata_value("ignore_index", path)?.unwrap_or(-100),
    };
    let loss = match args.loss {
        LossArg::Sigmoid => LossKind::Sigmoid { label_smoothing },
        LossArg::Robust => LossKind::Robust { label_smoothing },
        LossArg::Ipo | LossArg::Hinge if label_smoothing != 0.0 => {
            return Err(Error::InvalidParameter {
                name: "label_smoothing",
                // Widened through the shortest decimal, so that 0.1 reads `0.1`.
                value: label_smoothing.to_string().parse().unwrap_or(f64::NAN),
                expected: "0 for ipo and hinge losses (only sigmoid and robust use it)",
            });
        }
        LossArg::Ipo => LossKind::Ipo,
        LossArg::Hinge => LossKind::Hinge,
    };
    let config = DpoConfig {
        beta,
        loss,
        ignore_index,
        length_normalize: args.length_normalize,
    };
    config.validate()?;
    Ok(config)
}

fn run_loss(args: &LossArgs) -> Result<()> {
    if let Some(output) = &args.output {
        check_output_path(output, &args.input)?;
    }
    let file = read_batch(&args.input, args.vocab_size)?;
    let config = build_config(args, &file)?;
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda(0),
        DeviceArg::Auto => Device::Auto,
    };
    let dpo = DpoLoss::new(config, device)?;
    if let Some(reason) = dpo.fallback_reason() {
        eprintln!("notice: running on the CPU because CUDA is unavailable: {reason}");
    }
    match (&file.logits, &file.labels) {
        (LogitsData::F32(x), LabelsData::I64(y)) => run_typed(args, &dpo, &file, x, y),
        (LogitsData::F32(x), LabelsData::I32(y)) => run_typed(args, &dpo, &file, x, y),
        (LogitsData::F16(x), LabelsData::I64(y)) => run_typed(args, &dpo, &file, x, y),
        (LogitsData::F16(x), LabelsData::I32(y)) => run_typed(args, &dpo, &file, x, y),
        (LogitsData::BF16(x), LabelsData::I64(y)) => run_typed(args, &dpo, &file, x, y),
        (LogitsData::BF16(x), LabelsData::I32(y)) => run_typed(args, &dpo, &file, x, y),
    }
}

fn run_typed<T: Element, L: Label>(
    args: &LossArgs,
    dpo: &DpoLoss,
    file: &BatchFile,
    logits: &[T],
    labels: &[L],
) -> Result<()> {
    let batch = Batch::new(file.shape, logits, labels, file.reference_logps.as_deref());
    let out = match &args.output {
        Some(path) => {
            let mut grad = vec![0.0f32; file.shape.logits_len()];
            let out = dpo.forward_backward(&batch, &mut grad)?;
            write_outputs(path, &file.shape, &out, &grad)?;
            out
        }
        None => dpo.forward(&batch)?,
    };
    let report = if args.json {
        report_json(dpo, &out, args.output.as_deref()) + "\n"
    } else {
        report_table(dpo, &out, args.output.as_deref())
    };
    write_stdout(&report)
}

/// Writes the report to stdout. A closed pipe or a full disk becomes an error, where `print!`
/// would panic.
fn write_stdout(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|source| Error::Io {
            path: "standard output".to_string(),
            source,
        })
}

fn report_table(dpo: &DpoLoss, out: &DpoOutput, output: Option<&Path>) -> String {
    let config = dpo.config();
    let mut text = String::new();
    let mut line = |name: &str, value: String| text.push_str(&format!("{name:<20} {value}\n"));
    line("device", dpo.device_name());
    line("loss_type", config.loss.name().to_string());
    line("beta", config.beta.to_string());
    line("pairs", out.losses.len().to_string());
    line("loss", out.loss.to_string());
    for (name, value) in out.metrics.named() {
        line(name, value.to_string());
    }
    let list = |v: &[f32]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    line("losses", list(&out.losses));
    line("chosen_logps", list(&out.chosen_logps));
    line("rejected_logps", list(&out.rejected_logps));
    line("chosen_rewards", list(&out.chosen_rewards));
    line("rejected_rewards", list(&out.rejected_rewards));
    if let Some(path) = output {
        line("output", path.display().to_string());
    }
    text
}

/// JSON numbers cannot be NaN or infinite; those become strings ("inf", "NaN"). Finite values
/// are widened through their shortest decimal form, so an f32 0.1 prints as 0.1.
fn json_number(value: f32) -> serde_json::Value {
    let widened: f64 = value.to_string().parse().unwrap_or(f64::NAN);
    serde_json::Number::from_f64(widened)
        .map(serde_json::Value::Number)
        .unwrap_or_else(|| serde_json::Value::String(value.to_string()))
}

fn report_json(dpo: &DpoLoss, out: &DpoOutput, output: Option<&Path>) -> String {
    let config = dpo.config();
    let mut object = serde_json::Map::new();
    object.insert("device".into(), dpo.device_name().into());
    object.insert("loss_type".into(), config.loss.name().into());
    object.insert("beta".into(), json_number(config.beta));
    object.insert("pairs".into(), out.losses.len().into());
    object.insert("loss".into(), json_number(out.loss));
    for (name, value) in out.metrics.named() {
        object.insert(name.into(), json_number(value));
    }
    let list = |v: &[f32]| serde_json::Value::Array(v.iter().map(|&x| json_number(x)).collect());
    object.insert("losses".into(), list(&out.losses));
    object.insert("chosen_logps".into(), list(&out.chosen_logps));
    object.insert("rejected_logps".into(), list(&out.rejected_logps));
    object.insert("chosen_rewards".into(), list(&out.chosen_rewards));
    object.insert("rejected_rewards".into(), list(&out.rejected_rewards));
    if let Some(path) = output {
        object.insert("output".into(), path.display().to_string().into());
    }
    serde_json::Value::Object(object).to_string()
}
