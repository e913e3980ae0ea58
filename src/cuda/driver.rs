//! The GPU runtime: one cudarc context and stream per device, kernel modules compiled by NVRTC
//! for the device's own architecture on first use and cached per context.
//!
//! NOTE: this file has been compiled and its no-device paths tested, but it has never run on
//! a GPU; the GPU checks live in `scripts/gpu-check.sh`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    result as driver_result, sys as driver_sys, CudaContext, CudaFunction, CudaModule, CudaSlice,
    CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::nvrtc::{self, Image};
use super::runtime::{DeviceElement, KernelParams, KernelRuntime, LaunchDims};
use super::source::module_by_name;
use crate::error::{Error, Result};

/// A CUDA device driven through cudarc.
pub(crate) struct DriverRuntime {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// NVRTC target: `sm_XY` of the device, or `compute_XY` when NVRTC cannot emit SASS for
    /// the device (the driver then compiles the PTX at load time).
    arch: String,
    include_dirs: Vec<PathBuf>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl std::fmt::Debug for DriverRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverRuntime")
            .field("ordinal", &self.context.ordinal())
            .field("arch", &self.arch)
            .finish_non_exhaustive()
    }
}

impl DriverRuntime {
    /// Opens device `ordinal`: checks that the driver and NVRTC libraries load, that the
    /// device exists and that the kernel headers are found. Every "nothing to run on" case is
    /// `Error::NoDevice` with what to install or set.
    pub(crate) fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to open the library by its candidate names.
        if !unsafe { driver_sys::is_culib_present() } {
            return Err(Error::NoDevice {
                reason: "the CUDA driver library (libcuda.so) was not found; install the \
                         NVIDIA driver (the CPU backend needs none)"
                    .to_string(),
            });
        }
        nvrtc::ensure_nvrtc()?;
        let count = match CudaContext::device_count() {
            Ok(count) => count.max(0) as usize,
            Err(err) => {
                return Err(Error::NoDevice {
                    reason: format!(
                        "cuInit or cuDeviceGetCount failed ({err}); check that a GPU is \
                         visible (nvidia-smi, CUDA_VISIBLE_DEVICES)"
                    ),
                })
            }
        };
        if ordinal >= count {
            return Err(Error::NoDevice {
                reason: format!(
                    "device ordinal {ordinal} requested but {count} CUDA device(s) are visible"
                ),
            });
        }
        let include_dirs = nvrtc::resolve_include_dirs(&[])?;
        let context = CudaContext::new(ordinal)?;
        let stream = context.new_stream()?;
        let (major, minor) = context.compute_capability()?;
        let arch = choose_arch(major * 10 + minor, &nvrtc::supported_archs()?)?;
        Ok(DriverRuntime {
            context,
            stream,
            arch,
            include_dirs,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// Returns the stream every launch and copy of this runtime is issued on.
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Returns the NVRTC target in use (`sm_90`).
    pub(crate) fn arch(&self) -> &str {
        &self.arch
    }

    /// Returns the kernel `entry` of `module`, compiling and loading the module on first use.
    fn function(&self, module: &'static str, entry: &str) -> Result<CudaFunction> {
        let key = format!("{module}:{entry}");
        if let Some(function) = lock(&self.functions).get(&key) {
            return Ok(function.clone());
        }
        let loaded = self.module(module)?;
        let function = loaded.load_function(entry)?;
        lock(&self.functions).insert(key, function.clone());
        Ok(function)
    }

    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        // The lock is held through compilation so two threads never compile the same module.
        let mut modules = lock(&self.modules);
        if let Some(module) = modules.get(name) {
            return Ok(module.clone());
        }
        let source = module_by_name(name).ok_or_else(|| Error::Compile {
            module: name,
            log: "no kernel source has this name".to_string(),
        })?;
        let compiled = nvrtc::compile(&source, &self.arch, &self.include_dirs, false)?;
        let image = match compiled.image {
            Image::Cubin(bytes) => Ptx::from_binary(bytes),
            Image::Ptx(text) => Ptx::from_src(text),
        };
        let module = self.context.load_module(image)?;
        modules.insert(name, module.clone());
        Ok(module)
    }
}

/// Picks the NVRTC target for compute capability `device` (`10 * major + minor`): SASS for
/// the device when NVRTC supports it, else PTX for the newest older architecture it supports.
fn choose_arch(device: i32, supported: &[i32]) -> Result<String> {
    if supported.contains(&device) {
        return Ok(format!("sm_{device}"));
    }
    match supported
        .iter()
        .copied()
        .filter(|&arch| arch < device)
        .max()
    {
        Some(arch) => Ok(format!("compute_{arch}")),
        None => Err(Error::NoDevice {
            reason: format!(
                "the loaded NVRTC cannot target compute capability {}.{} (it supports {:?}); \
                 install an NVRTC that matches the GPU",
                device / 10,
                device % 10,
                supported
            ),
        }),
    }
}

/// Locks a cache, recovering the map if another thread panicked while holding it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl KernelRuntime for DriverRuntime {
    type Buffer<T: DeviceElement> = CudaSlice<T>;

    fn alloc<T: DeviceElement>(&self, len: usize) -> Result<CudaSlice<T>> {
        // cuMemAlloc rejects 0 bytes; an empty batch still gets a 1-element buffer.
        // SAFETY: the memory is zeroed below before any read.
        let mut buffer = unsafe { self.stream.alloc::<T>(len.max(1)) }?;
        let bytes = buffer.len() * std::mem::size_of::<T>();
        {
            let (ptr, _record) = buffer.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` addresses `bytes` bytes just allocated on this stream; zero bits
            // are a valid `T` because `T: Pod`.
            unsafe { driver_result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }?;
        }
        Ok(buffer)
    }

    fn upload<T: DeviceElement>(&self, src: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice_mut(..src.len());
        self.stream.memcpy_htod(src, &mut view)?;
        Ok(())
    }

    fn download<T: DeviceElement>(&self, src: &CudaSlice<T>, dst: &mut [T]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        let view = src.slice(..dst.len());
        self.stream.memcpy_dtoh(&view, dst)?;
        self.stream.synchronize()?;
        Ok(())
    }

    fn len<T: DeviceElement>(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }

    fn address<T: DeviceElement>(&self, buf: &CudaSlice<T>) -> u64 {
        let (ptr, _record) = buf.device_ptr(&self.stream);
        ptr
    }

    unsafe fn launch<P: KernelParams>(
        &self,
        module: &'static str,
        entry: &str,
        dims: LaunchDims,
        params: &P,
    ) -> Result<()> {
        let function = self.function(module, entry)?;
        let config = LaunchConfig {
            grid_dim: dims.grid,
            block_dim: dims.block,
            shared_mem_bytes: dims.shared_bytes,
        };
        let mut launch = self.stream.launch_builder(&function);
        launch.arg(params);
        // SAFETY: the caller guarantees `params` is the kernel's parameter struct and that
        // every address in it is a live buffer of this runtime, large enough for `dims`.
        unsafe { launch.launch(config) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_prefers_sass_for_the_device() {
        assert_eq!(choose_arch(90, &[75, 80, 86, 89, 90]).unwrap(), "sm_90");
    }

    #[test]
    fn arch_falls_back_to_older_ptx() {
        assert_eq!(choose_arch(121, &[80, 90, 100]).unwrap(), "compute_100");
    }

    #[test]
    fn arch_older_than_nvrtc_is_no_device() {
        let err = choose_arch(60, &[75, 80]).unwrap_err();
        assert!(matches!(err, Error::NoDevice { .. }), "{err}");
    }
}
