//! The seam between the CUDA launch code and what executes it.
//!
//! The backend's launch code (argument structs, grid and block sizes, shared-memory sizes,
//! buffer allocation, copies) is written once, generic over [`KernelRuntime`]. The driver
//! runtime runs it on a GPU through cudarc; the emulator runtime (feature `emulator`, tests
//! only) runs the same kernel sources compiled as host C++.

use crate::error::Result;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LaunchDims {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
}

/// A kernel's argument struct, passed by value as the kernel's only parameter.
///
/// # Safety
///
/// The type must be `#[repr(C)]` with the same field order, types and size as the struct of
/// the same name in `kernels/common.cuh`, with every pointer field a device address (`u64`).
pub(crate) unsafe trait KernelParams:
    bytemuck::Pod + cudarc::driver::DeviceRepr + std::fmt::Debug
{
}

/// Element types that live in runtime buffers.
pub(crate) trait DeviceElement:
    bytemuck::Pod + cudarc::driver::DeviceRepr + Default + Send + Sync + std::fmt::Debug
{
}

impl<T> DeviceElement for T where
    T: bytemuck::Pod + cudarc::driver::DeviceRepr + Default + Send + Sync + std::fmt::Debug
{
}

/// Memory and kernel launches of one device, real or emulated. Calls on one runtime run in
/// issue order (one stream).
pub(crate) trait KernelRuntime {
    /// A device buffer of `T`.
    type Buffer<T: DeviceElement>;

    /// Allocates `len` zeroed elements (`len` may be 0), aligned to at least 16 bytes
    /// whatever `T` is, because byte buffers carry f32 logits and i64 labels.
    fn alloc<T: DeviceElement>(&self, len: usize) -> Result<Self::Buffer<T>>;

    /// Copies `src` into the start of `dst` (`src.len() <= dst` length).
    fn upload<T: DeviceElement>(&self, src: &[T], dst: &mut Self::Buffer<T>) -> Result<()>;

    /// Copies the start of `src` into `dst`, waiting for earlier launches to finish.
    fn download<T: DeviceElement>(&self, src: &Self::Buffer<T>, dst: &mut [T]) -> Result<()>;

    /// Returns the length of a buffer in elements.
    fn len<T: DeviceElement>(&self, buf: &Self::Buffer<T>) -> usize;

    /// Returns the device address of a buffer, to be stored in a [`KernelParams`] struct.
    fn address<T: DeviceElement>(&self, buf: &Self::Buffer<T>) -> u64;

    /// Launches `entry` (an `extern "C"` kernel of the source file `module`, e.g.
    /// `token_logps.cu`) with `params` as its only argument.
    ///
    /// # Safety
    ///
    /// `params` must match the kernel's parameter struct, every address in it must point to a
    /// live buffer of this runtime large enough for every index the kernel derives from
    /// `params` and `dims`, and buffers the kernel writes must not be read by the host until
    /// a later `download`.
    unsafe fn launch<P: KernelParams>(
        &self,
        module: &'static str,
        entry: &str,
        dims: LaunchDims,
        params: &P,
    ) -> Result<()>;
}
