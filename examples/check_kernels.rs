//! Compiles every kernel with NVRTC for the given architectures and prints each entry's
//! registers, shared memory, stack and spills. Needs libnvrtc.so.12 on LD_LIBRARY_PATH and the
//! CUDA headers (`--include DIR` or DPO_CUDA_INCLUDE); no GPU.
//!
//! ```text
//! cargo run --release --example check_kernels -- --arch sm_80,sm_90 --include DIR
//! ```
//!
//! Exits with status 1 on a compile error or a register spill.

use clap::Parser;
use dpo_kernels::cuda::{check::run_check_kernels, CheckKernelsArgs};

#[derive(Parser)]
#[command(about = "Compile-check the CUDA kernels with NVRTC and report registers and spills")]
struct Cli {
    #[command(flatten)]
    args: CheckKernelsArgs,
}

fn main() {
    let cli = Cli::parse();
    let mut stdout = std::io::stdout();
    if let Err(err) = run_check_kernels(&cli.args, &mut stdout) {
        eprintln!("check-kernels failed: {err}");
        std::process::exit(1);
    }
}
