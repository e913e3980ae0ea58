//! Build script: rebuilds when a kernel source changes (the sources are embedded with
//! `include_str!`), and compile-checks them with `nvcc` when one is on PATH. A machine
//! without the CUDA toolkit builds the crate all the same.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    let kernels = Path::new("kernels");
    let Ok(entries) = std::fs::read_dir(kernels) else {
        return;
    };
    let mut sources = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        println!("cargo:rerun-if-changed={}", path.display());
        if path.extension().is_some_and(|ext| ext == "cu") {
            sources.push(path);
        }
    }
    sources.sort();
    check_with_nvcc(&sources);
}

/// Compiles each `.cu` for sm_80 with `nvcc` if it is on PATH and turns its errors into
/// cargo warnings. NVRTC compiles the kernels again at run time, which is where errors stop
/// the program.
// NOTE: never run on a machine with nvcc; NVRTC is the checked path (`.ci/kernels`).
fn check_with_nvcc(sources: &[std::path::PathBuf]) {
    let Ok(out_dir) = std::env::var("OUT_DIR") else {
        return;
    };
    let nvcc_found = Command::new("nvcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !nvcc_found {
        return;
    }
    for source in sources {
        let stem = source
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("kernel");
        let output = Command::new("nvcc")
            .args(["-std=c++17", "-arch=sm_80", "-cubin", "-I", "kernels", "-o"])
            .arg(Path::new(&out_dir).join(format!("{stem}.cubin")))
            .arg(source)
            .output();
        match output {
            Ok(result) if result.status.success() => {}
            Ok(result) => {
                for line in String::from_utf8_lossy(&result.stderr).lines() {
                    println!("cargo:warning=nvcc {}: {line}", source.display());
                }
            }
            Err(err) => println!(
                "cargo:warning=nvcc could not run on {}: {err}",
                source.display()
            ),
        }
    }
}
