//! NVRTC compilation with the program log kept, shared by the driver runtime and the kernel
//! check. cudarc's safe `compile_ptx_with_opts` drops the log of a successful compile, which
//! is where `--ptxas-options=-v` puts the register and spill report, so this module calls
//! `cudarc::nvrtc::result` directly.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};

use super::source::{nvrtc_source, KernelSource};
use crate::error::{Error, Result};

/// Environment variable naming directories (separated like `PATH`) that hold `cuda_fp16.h`
/// and `cuda_bf16.h`. It is searched before `CUDA_HOME`, `CUDA_PATH` and `/usr/local/cuda`.
pub const INCLUDE_ENV: &str = "DPO_CUDA_INCLUDE";

/// NVRTC's output for one source.
#[derive(Debug)]
pub(crate) struct Compiled {
    /// CUBIN for a real architecture (`sm_XY`), PTX text for a virtual one (`compute_XY`).
    pub image: Image,
    /// The program log: warnings, and ptxas's report when it was requested.
    pub log: String,
}

/// A loadable module image.
#[derive(Debug)]
pub(crate) enum Image {
    /// Machine code for exactly one architecture.
    Cubin(Vec<u8>),
    /// PTX, compiled further by the driver at load time.
    Ptx(String),
}

/// Returns an error unless the NVRTC library can be loaded. cudarc panics on the first call
/// into a library it cannot load, so every entry point checks this first.
pub(crate) fn ensure_nvrtc() -> Result<()> {
    // SAFETY: only tries to open the library by its candidate names; no symbol is called.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::NoDevice {
            reason: "the NVRTC library (libnvrtc.so.12) was not found; install the CUDA \
                     toolkit or `pip install nvidia-cuda-nvrtc-cu12` and add its \
                     nvidia/cuda_nvrtc/lib directory to LD_LIBRARY_PATH"
                .to_string(),
        })
    }
}

/// Returns the real architectures (`sm_XY` as `10 * X + Y`) the loaded NVRTC can target.
pub(crate) fn supported_archs() -> Result<Vec<i32>> {
    ensure_nvrtc()?;
    let mut count: std::ffi::c_int = 0;
    // SAFETY: writes one int through a valid pointer.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut count) }
        .result()
        .map_err(|err| nvrtc_failure("nvrtcGetNumSupportedArchs", err))?;
    let mut archs = vec![0 as std::ffi::c_int; count.max(0) as usize];
    // SAFETY: `archs` has room for the `count` ints NVRTC writes.
    unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(|err| nvrtc_failure("nvrtcGetSupportedArchs", err))?;
    Ok(archs)
}

fn nvrtc_failure(call: &str, err: result::NvrtcError) -> Error {
    Error::NoDevice {
        reason: format!("{call} failed ({err:?}); the NVRTC library may be incomplete"),
    }
}

/// Returns the include directories for NVRTC: `explicit` when non-empty, else the first
/// directory with `cuda_bf16.h` among each entry of `$DPO_CUDA_INCLUDE`, `$CUDA_HOME/include`,
/// `$CUDA_PATH/include`, `/usr/local/cuda/include` and the cache that `.ci/kernels` fills.
pub fn resolve_include_dirs(explicit: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if !explicit.is_empty() {
        if explicit.iter().any(|dir| dir.join("cuda_bf16.h").is_file()) {
            return Ok(explicit.to_vec());
        }
        return Err(Error::NoDevice {
            reason: format!(
                "none of the include directories {explicit:?} contains cuda_bf16.h; pass the \
                 CUDA toolkit's include directory (or nvidia/cuda_runtime/include of the \
                 nvidia-cuda-runtime-cu12 wheel)"
            ),
        });
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dirs) = std::env::var_os(INCLUDE_ENV) {
        candidates.extend(std::env::split_paths(&dirs));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            candidates.push(Path::new(&root).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    let cache = std::env::var_os("DPO_CI_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/dpo-kernels"))
        });
    if let Some(cache) = cache {
        candidates
            .push(cache.join("cuda-nvrtc-12.9.86-runtime-12.9.79/nvidia/cuda_runtime/include"));
    }
    match candidates
        .iter()
        .find(|dir| dir.join("cuda_bf16.h").is_file())
    {
        Some(dir) => Ok(vec![dir.clone()]),
        None => Err(Error::NoDevice {
            reason: format!(
                "cuda_bf16.h was not found in {candidates:?}; install the CUDA toolkit headers \
                 (or `pip install nvidia-cuda-runtime-cu12`) and set {INCLUDE_ENV} to the \
                 directory that contains cuda_bf16.h"
            ),
        }),
    }
}

/// Compiles one kernel source for `arch` (`sm_90` gives CUBIN, `compute_90` PTX). With
/// `ptxas_verbose`, the log carries ptxas's per-entry register, shared-memory and spill lines.
pub(crate) fn compile(
    module: &KernelSource,
    arch: &str,
    include_dirs: &[PathBuf],
    ptxas_verbose: bool,
) -> Result<Compiled> {
    ensure_nvrtc()?;
    let compile_error = |log: String| Error::Compile {
        module: module.name,
        log,
    };
    let source = CString::new(nvrtc_source(module))
        .map_err(|_| compile_error("the kernel source contains a NUL byte".to_string()))?;
    let name = CString::new(module.name).expect("module names are plain ASCII");
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--generate-line-info".to_string(),
    ];
    for dir in include_dirs {
        options.push(format!("--include-path={}", dir.display()));
    }
    if ptxas_verbose {
        options.push("--ptxas-options=-v".to_string());
    }

    let program = result::create_program(&source, Some(&name))
        .map_err(|err| compile_error(format!("nvrtcCreateProgram failed: {err:?}")))?;
    let program = Program(program);
    // SAFETY: the program was created above and is destroyed only by `Program::drop`.
    let status = unsafe { result::compile_program(program.0, &options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(program.0) }
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    if let Err(err) = status {
        return Err(compile_error(format!(
            "{err:?} with options {options:?}:\n{log}"
        )));
    }
    let image = if arch.starts_with("sm_") {
        Image::Cubin(
            program
                .cubin()
                .map_err(|err| compile_error(format!("nvrtcGetCUBIN failed: {err:?}")))?,
        )
    } else {
        // SAFETY: as above.
        let ptx = unsafe { result::get_ptx(program.0) }
            .map_err(|err| compile_error(format!("nvrtcGetPTX failed: {err:?}")))?;
        Image::Ptx(c_chars_to_string(&ptx))
    };
    Ok(Compiled { image, log })
}

/// Owns an NVRTC program handle and destroys it on drop.
struct Program(sys::nvrtcProgram);

impl Program {
    fn cubin(&self) -> std::result::Result<Vec<u8>, result::NvrtcError> {
        let mut size = 0usize;
        // SAFETY: the handle is live; NVRTC writes one usize.
        unsafe { sys::nvrtcGetCUBINSize(self.0, &mut size) }.result()?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` has the `size` bytes NVRTC writes.
        unsafe { sys::nvrtcGetCUBIN(self.0, cubin.as_mut_ptr().cast()) }.result()?;
        Ok(cubin)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once. A failure
        // here leaks the program, which is all that can be done in drop.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// Converts a NUL-terminated buffer from NVRTC into a String (lossy on invalid UTF-8).
fn c_chars_to_string(raw: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(text) => text.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}
