//! Compile-time check of the kernels that needs NVRTC but no GPU: compiles every kernel
//! source to SASS for each requested architecture with `--ptxas-options=-v`, and reports each
//! entry's registers, shared memory, stack and spills from ptxas's log.
//!
//! The command line runs it as `dpo-kernels check-kernels [--arch sm_80,sm_90] [--include DIR]`
//! through [`run_check_kernels`], and `.ci/kernels` runs that command in CI.

use std::io::Write;
use std::path::PathBuf;

use super::nvrtc::{self, resolve_include_dirs};
use super::source::MODULES;
use crate::error::{Error, Result};

/// ptxas's report for one kernel entry on one architecture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelReport {
    /// Kernel source file (`token_logps.cu`).
    pub module: &'static str,
    /// Target architecture (`sm_90`).
    pub arch: String,
    /// Entry name (`token_logps_fwd_bf16_i64`).
    pub entry: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, in bytes (dynamic shared memory is not included).
    pub shared_bytes: u64,
    /// Stack frame per thread, in bytes.
    pub stack_bytes: u64,
    /// Bytes stored to local memory because registers ran out, entry and callees together.
    pub spill_store_bytes: u64,
    /// Bytes loaded back from those spills.
    pub spill_load_bytes: u64,
}

/// Arguments of the `check-kernels` command.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckKernelsArgs {
    /// Real GPU architectures to compile for, comma-separated.
    #[arg(long = "arch", value_delimiter = ',', default_value = "sm_80,sm_90")]
    pub archs: Vec<String>,
    /// Directory holding cuda_fp16.h and cuda_bf16.h (repeatable); found automatically when
    /// omitted (DPO_CUDA_INCLUDE, CUDA_HOME, CUDA_PATH, /usr/local/cuda, the .ci/kernels cache).
    #[arg(long = "include")]
    pub include_dirs: Vec<PathBuf>,
}

/// Compiles every kernel source for every architecture in `archs` (real ones, `sm_XY`) and
/// returns one report per entry and architecture.
///
/// Fails with [`Error::Compile`] on any compile error, and on any register spill (the log
/// then lists the spilling entries). Fails with [`Error::NoDevice`] when NVRTC or the CUDA
/// headers cannot be found; no GPU is needed.
pub fn check_kernels(archs: &[&str], include_dirs: &[PathBuf]) -> Result<Vec<KernelReport>> {
    let include_dirs = resolve_include_dirs(include_dirs)?;
    let mut reports = Vec::new();
    for arch in archs {
        if !arch.starts_with("sm_") {
            return Err(Error::Compile {
                module: "check-kernels",
                log: format!(
                    "invalid architecture {arch:?}: pass a real one such as sm_80 or sm_90, \
                     because ptxas (and so the register report) only runs for those"
                ),
            });
        }
        for module in MODULES {
            let compiled = nvrtc::compile(&module, arch, &include_dirs, true)?;
            let entries = parse_ptxas_log(module.name, arch, &compiled.log);
            if entries.is_empty() {
                return Err(Error::Compile {
                    module: module.name,
                    log: format!(
                        "the log for {arch} has no ptxas entry report; log:\n{}",
                        compiled.log
                    ),
                });
            }
            let spills: Vec<String> = entries
                .iter()
                .filter(|r| r.spill_store_bytes > 0 || r.spill_load_bytes > 0)
                .map(|r| {
                    format!(
                        "{} on {}: {} bytes spill stores, {} bytes spill loads",
                        r.entry, r.arch, r.spill_store_bytes, r.spill_load_bytes
                    )
                })
                .collect();
            if !spills.is_empty() {
                return Err(Error::Compile {
                    module: module.name,
                    log: format!("ptxas reports register spills:\n{}", spills.join("\n")),
                });
            }
            reports.extend(entries);
        }
    }
    Ok(reports)
}

/// Runs [`check_kernels`] and writes one line per entry to `out`: module, arch, entry,
/// registers, shared memory, stack and spills.
pub fn run_check_kernels(args: &CheckKernelsArgs, out: &mut dyn Write) -> Result<()> {
    let archs: Vec<&str> = args.archs.iter().map(String::as_str).collect();
    // Missing NVRTC or headers are "no device" to a backend, but this command needs no device.
    let reports = check_kernels(&archs, &args.include_dirs).map_err(|err| match err {
        Error::NoDevice { reason } => Error::NvrtcUnavailable { reason },
        other => other,
    })?;
    let io_error = |source| Error::Io {
        path: "<output>".to_string(),
        source,
    };
    writeln!(
        out,
        "{:<16} {:<6} {:<32} {:>5} {:>10} {:>11} {:>7}",
        "module", "arch", "entry", "regs", "smem_bytes", "stack_bytes", "spills"
    )
    .map_err(io_error)?;
    for r in &reports {
        writeln!(
            out,
            "{:<16} {:<6} {:<32} {:>5} {:>10} {:>11} {:>7}",
            r.module,
            r.arch,
            r.entry,
            r.registers,
            r.shared_bytes,
            r.stack_bytes,
            r.spill_store_bytes + r.spill_load_bytes
        )
        .map_err(io_error)?;
    }
    writeln!(
        out,
        "{} entries compiled for {}, no spills",
        reports.len(),
        args.archs.join(",")
    )
    .map_err(io_error)?;
    Ok(())
}

/// Parses ptxas's `-v` output. Each entry section starts with
/// `Compiling entry function 'NAME' for 'sm_XY'`. Inside it, a `Function properties for F`
/// line gives the stack and spills of F, the entry or a callee whose spills count for the
/// entry, and `Used N registers, ... N bytes smem` gives the entry's totals.
pub(crate) fn parse_ptxas_log(module: &'static str, arch: &str, log: &str) -> Vec<KernelReport> {
    let mut reports: Vec<KernelReport> = Vec::new();
    let mut properties_of_entry = false;
    for line in log.lines() {
        if let Some(name) = quoted_after(line, "Compiling entry function '") {
            reports.push(KernelReport {
                module,
                arch: quoted_after(line, "' for '").unwrap_or(arch).to_string(),
                entry: name.to_string(),
                ..KernelReport::default()
            });
            properties_of_entry = false;
            continue;
        }
        let Some(current) = reports.last_mut() else {
            continue;
        };
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            properties_of_entry = rest.trim() == current.entry;
        } else if line.contains("bytes stack frame") {
            if properties_of_entry {
                current.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            }
            current.spill_store_bytes += number_before(line, "bytes spill stores").unwrap_or(0);
            current.spill_load_bytes += number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("Used ") && line.contains(" registers") {
            current.registers = number_before(line, "registers").unwrap_or(0) as u32;
            current.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    reports
}

/// Returns the text between `prefix` and the next `'` in `line`.
fn quoted_after<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let start = line.find(prefix)? + prefix.len();
    let len = line[start..].find('\'')?;
    Some(&line[start..start + len])
}

/// Returns the integer written just before `unit` in `line` (`"48 registers"` gives 48).
fn number_before(line: &str, unit: &str) -> Option<u64> {
    let end = line.find(unit)?;
    line[..end].split_whitespace().last()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'token_logps_fwd_f32_i32' for 'sm_80'
ptxas info    : Function properties for token_logps_fwd_f32_i32
ptxas         .     16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1584 bytes smem, 464 bytes cmem[0]
ptxas info    : Compiling entry function 'dpo_pairs_fwd' for 'sm_80'
ptxas info    : Function properties for helper
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Function properties for dpo_pairs_fwd
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 48 registers, used 0 barriers
ptxas info    : Compile time = 1.825 ms
";

    #[test]
    fn parses_registers_smem_and_stack() {
        let reports = parse_ptxas_log("token_logps.cu", "sm_80", LOG);
        assert_eq!(reports.len(), 2);
        let first = &reports[0];
        assert_eq!(first.entry, "token_logps_fwd_f32_i32");
        assert_eq!(first.arch, "sm_80");
        assert_eq!(first.registers, 40);
        assert_eq!(first.shared_bytes, 1584);
        assert_eq!(first.stack_bytes, 16);
        assert_eq!(first.spill_store_bytes, 0);
    }

    #[test]
    fn callee_spills_count_for_the_entry() {
        let reports = parse_ptxas_log("dpo.cu", "sm_80", LOG);
        let pairs = &reports[1];
        assert_eq!(pairs.entry, "dpo_pairs_fwd");
        assert_eq!(pairs.registers, 48);
        assert_eq!(pairs.shared_bytes, 0);
        assert_eq!(pairs.stack_bytes, 0);
        assert_eq!(pairs.spill_store_bytes, 4);
        assert_eq!(pairs.spill_load_bytes, 8);
    }

    #[test]
    fn log_without_entries_gives_no_report() {
        assert!(parse_ptxas_log("dpo.cu", "sm_80", "warning: something\n").is_empty());
    }
}
