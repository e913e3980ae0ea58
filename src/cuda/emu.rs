//! A [`KernelRuntime`] that runs the CUDA kernels on the CPU (feature `emulator`, tests only).
//!
//! `build.rs` compiles the unchanged sources in `kernels/` as host C++ against `emu/cuda_emu.h`
//! and links them with the execution model in `emu/runtime.cpp`. There every CUDA thread of a
//! block is a fiber, `__syncthreads()` and warp operations are real barriers with deadlock
//! detection, and shared memory is poisoned before each block.
//!
//! This module adds the memory side. Buffers are host allocations with a guard region on each
//! side, filled with a pattern that is NaN in every float dtype and checked after every launch.
//! A kernel that writes out of bounds then fails with the kernel and buffer named, instead of
//! silently corrupting a neighbouring buffer.
//!
//! `emu/README.md` lists what the model honours and where it differs from a GPU.

use std::alloc::Layout;
use std::ffi::{c_char, c_int, c_void, CString};
use std::fmt::Debug;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::cuda::runtime::{DeviceElement, KernelParams, KernelRuntime, LaunchDims};
use crate::error::{Error, Result};

/// Bytes of guard before and after each buffer. A multiple of 256, so buffer data starts
/// 256-byte aligned like a `cudaMalloc` allocation.
const GUARD_BYTES: usize = 4096;

/// Alignment of every allocation (and so of every buffer's data).
const ALIGN: usize = 256;

/// Returns the 16-bit pattern (little-endian bytes) that fills the guards of allocation `id`:
/// `0xFF80 | k` with `k` in 1..=127 is NaN as bf16 and f16, a pair of them is NaN as f32, and
/// as an integer label it is negative. The pattern differs between neighbouring allocations,
/// so a kernel that copies one buffer's guard into another's (an off-by-one in a copy) still
/// changes the second guard.
fn guard_pattern(id: u64) -> [u8; 2] {
    let low = 0x80 | (1 + (id % 127) as u8);
    [low, 0xFF]
}

/// Time limit of one launch unless [`EmuRuntime::with_timeout`] sets another. Generous because
/// CI machines may run several test binaries on two cores; the emulated test launches take
/// well under a second each.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Bytes of the error message buffer handed to the C++ runtime.
const ERROR_CAPACITY: usize = 4096;

extern "C" {
    /// Defined in `emu/runtime.cpp`; see its comment for the contract.
    fn emu_launch(
        module: *const c_char,
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: u32,
        params: *const c_void,
        params_size: usize,
        timeout_s: f64,
        error: *mut c_char,
        error_capacity: usize,
    ) -> c_int;
}

/// One host allocation: `[guard | data | guard]`.
#[derive(Debug)]
struct Allocation {
    base: NonNull<u8>,
    layout: Layout,
    data_bytes: usize,
    /// Allocation number within its runtime, for messages.
    id: u64,
    /// Element type name and count, for messages.
    element: &'static str,
    len: usize,
    /// Guard fill, see [`guard_pattern`].
    pattern: [u8; 2],
}

// SAFETY: the allocation is plain memory owned by this struct. The host reaches it only
// through `EmuBuffer` (`&mut` to write, `&` to read) and kernels only during a launch, which the
// `KernelRuntime::launch` contract orders with those accesses.
unsafe impl Send for Allocation {}
// SAFETY: as above; `&Allocation` itself never writes the data.
unsafe impl Sync for Allocation {}

impl Allocation {
    fn new(data_bytes: usize, id: u64, element: &'static str, len: usize) -> Result<Self> {
        let size = data_bytes
            .checked_add(2 * GUARD_BYTES)
            .ok_or_else(|| too_large(data_bytes))?;
        let layout = Layout::from_size_align(size, ALIGN).map_err(|_| too_large(data_bytes))?;
        // SAFETY: `layout` has a non-zero size (at least the two guards).
        let base = unsafe { std::alloc::alloc(layout) };
        let base = NonNull::new(base).ok_or_else(|| too_large(data_bytes))?;
        let allocation = Allocation {
            base,
            layout,
            data_bytes,
            id,
            element,
            len,
            pattern: guard_pattern(id),
        };
        // SAFETY: the data bytes lie inside the allocation.
        unsafe { std::ptr::write_bytes(allocation.data(), 0, data_bytes) };
        allocation.fill_guards();
        Ok(allocation)
    }

    /// Fills both guards with the allocation's pattern. Only called while no kernel runs.
    fn fill_guards(&self) {
        // SAFETY: both guards lie inside the allocation, and `guards_mut` is not aliased
        // (no kernel runs and no other `&[u8]` of the guards is alive).
        let (before, after) = unsafe { self.guards_mut() };
        for guard in [before, after] {
            for (i, byte) in guard.iter_mut().enumerate() {
                *byte = self.pattern[i % 2];
            }
        }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: GUARD_BYTES is inside the allocation (its size is at least 2 * GUARD_BYTES).
        unsafe { self.base.as_ptr().add(GUARD_BYTES) }
    }

    /// Returns the guard bytes before and after the data.
    ///
    /// # Safety
    ///
    /// No kernel may run and no other reference to the guards may be alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn guards_mut(&self) -> (&mut [u8], &mut [u8]) {
        // SAFETY: both ranges lie inside the allocation and do not overlap; the caller
        // excludes other access.
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.base.as_ptr(), GUARD_BYTES),
                std::slice::from_raw_parts_mut(self.data().add(self.data_bytes), GUARD_BYTES),
            )
        }
    }

    /// Returns a description of the first overwritten guard byte range, restoring the
    /// guards, or `None` when both are intact.
    fn check_guards(&self) -> Option<String> {
        // SAFETY: launches hold the runtime's launch lock while checking, so no kernel runs,
        // and the slices die before `fill_guards`.
        let (before, after) = unsafe { self.guards_mut() };
        let pattern = self.pattern;
        let changed = |guard: &[u8]| -> Option<(usize, usize)> {
            let intact = |(i, &b): (usize, &u8)| b == pattern[i % 2];
            let first = guard.iter().enumerate().position(|e| !intact(e))?;
            let last = guard.iter().enumerate().rposition(|e| !intact(e))?;
            Some((first, last))
        };
        let report = match (changed(before), changed(after)) {
            (None, None) => return None,
            (Some((first, last)), _) => format!(
                "bytes {}..{} before its start",
                GUARD_BYTES - first,
                GUARD_BYTES - last - 1
            ),
            (None, Some((first, last))) => {
                format!("bytes {}..{} after its end", first, last + 1)
            }
        };
        self.fill_guards();
        Some(report)
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: `base` came from `std::alloc::alloc(self.layout)` and is freed once.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}

fn too_large(bytes: usize) -> Error {
    Error::Emulator {
        kernel: String::new(),
        detail: format!("cannot allocate a buffer of {bytes} bytes"),
    }
}

/// A buffer of the emulated device: host memory between two guard regions.
#[derive(Debug)]
pub struct EmuBuffer<T> {
    allocation: Arc<Allocation>,
    len: usize,
    _element: PhantomData<T>,
}

impl<T> EmuBuffer<T> {
    /// Returns the number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The emulated device: buffer allocation, copies and kernel launches on the CPU.
///
/// Launches from any thread are serialised (the C++ runtime runs one launch at a time), and
/// each one checks the guards of every live buffer of this runtime afterwards.
#[derive(Debug)]
pub struct EmuRuntime {
    buffers: Mutex<Registry>,
    /// Held across a launch and its guard check, so a violation is charged to the right
    /// kernel.
    launch_lock: Mutex<()>,
    timeout: Duration,
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    live: Vec<Weak<Allocation>>,
}

impl Default for EmuRuntime {
    fn default() -> Self {
        Self::new()
    }
}

impl EmuRuntime {
    /// Returns a runtime with the default launch time limit (120 s).
    pub fn new() -> Self {
        EmuRuntime {
            buffers: Mutex::new(Registry::default()),
            launch_lock: Mutex::new(()),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets the time after which a launch fails as timed out.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Allocates `len` zeroed elements between two guard regions.
    pub fn alloc_zeroed<T: bytemuck::Pod>(&self, len: usize) -> Result<EmuBuffer<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| too_large(usize::MAX))?;
        let mut registry = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        registry.next_id += 1;
        let allocation = Arc::new(Allocation::new(
            bytes,
            registry.next_id,
            std::any::type_name::<T>(),
            len,
        )?);
        registry.live.retain(|w| w.strong_count() > 0);
        registry.live.push(Arc::downgrade(&allocation));
        Ok(EmuBuffer {
            allocation,
            len,
            _element: PhantomData,
        })
    }

    /// Copies `src` into the start of `dst`.
    pub fn copy_to_buffer<T: bytemuck::Pod>(
        &self,
        src: &[T],
        dst: &mut EmuBuffer<T>,
    ) -> Result<()> {
        check_copy_len(src.len(), dst.len)?;
        let bytes: &[u8] = bytemuck::cast_slice(src);
        // SAFETY: `dst` has at least `src.len()` elements (checked), and `&mut` excludes any
        // other access to it.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.allocation.data(), bytes.len())
        };
        Ok(())
    }

    /// Copies the start of `src` into `dst`.
    pub fn copy_from_buffer<T: bytemuck::Pod>(
        &self,
        src: &EmuBuffer<T>,
        dst: &mut [T],
    ) -> Result<()> {
        check_copy_len(dst.len(), src.len)?;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(dst);
        // SAFETY: `src` has at least `dst.len()` elements (checked). Launches are synchronous,
        // so no kernel writes it now.
        unsafe {
            std::ptr::copy_nonoverlapping(src.allocation.data(), bytes.as_mut_ptr(), bytes.len())
        };
        Ok(())
    }

    /// Returns the address kernels see for `buf` (its host address).
    pub fn buffer_address<T>(&self, buf: &EmuBuffer<T>) -> u64 {
        buf.allocation.data() as u64
    }

    /// Runs `entry` of `module` (e.g. `token_logps.cu`) on the CPU with `params` as its only
    /// argument, then checks the guards of every live buffer.
    ///
    /// Fails with [`Error::Emulator`] when the kernel is unknown, the parameter size differs
    /// from the kernel's struct, the launch dimensions are invalid, a block deadlocks or
    /// misuses a warp operation, the time limit passes, or a buffer guard was overwritten.
    ///
    /// # Safety
    ///
    /// Every address in `params` must point into a live buffer of this runtime, large enough
    /// for every index the kernel computes from `params` and the dimensions. The only
    /// exception is the out-of-bounds writes this call exists to catch, and those must stay
    /// inside the guards (4096 bytes on each side). Host references to buffers the kernel writes must not exist
    /// during the call.
    pub unsafe fn launch_params<P: bytemuck::Pod + Debug>(
        &self,
        module: &str,
        entry: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &P,
    ) -> Result<()> {
        let kernel = format!("{entry} ({module})");
        let emulator_error = |detail: String| Error::Emulator {
            kernel: kernel.clone(),
            detail,
        };
        let c_module = CString::new(module).map_err(|e| emulator_error(e.to_string()))?;
        let c_entry = CString::new(entry).map_err(|e| emulator_error(e.to_string()))?;
        let grid = [grid.0, grid.1, grid.2];
        let block = [block.0, block.1, block.2];
        let bytes = bytemuck::bytes_of(params);
        let mut message = vec![0u8; ERROR_CAPACITY];

        let _launch = self.launch_lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: every pointer argument is valid for the length passed with it, and the
        // caller guarantees that the addresses inside `params` are live buffers of this
        // runtime.
        let status = unsafe {
            emu_launch(
                c_module.as_ptr(),
                c_entry.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                shared_bytes,
                bytes.as_ptr().cast(),
                bytes.len(),
                self.timeout.as_secs_f64(),
                message.as_mut_ptr().cast(),
                message.len(),
            )
        };
        let mut problems = Vec::new();
        if status != 0 {
            let end = message
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(message.len());
            problems.push(String::from_utf8_lossy(&message[..end]).into_owned());
        }
        problems.extend(self.check_guards(&format!("{params:?}")));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(emulator_error(problems.join("; ")))
        }
    }

    /// Checks and restores the guards of every live buffer. Returns one line per violation,
    /// with the name of the parameter field that contains the buffer's address when
    /// `params_debug` (the parameter struct's `Debug` output) has one.
    fn check_guards(&self, params_debug: &str) -> Vec<String> {
        let registry = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let mut problems = Vec::new();
        for allocation in registry.live.iter().filter_map(Weak::upgrade) {
            if let Some(range) = allocation.check_guards() {
                let field = field_holding(params_debug, allocation.data() as u64)
                    .map(|f| format!("`{f}`, "))
                    .unwrap_or_default();
                problems.push(format!(
                    "wrote outside buffer #{} ({field}{} x {}): {range}",
                    allocation.id, allocation.len, allocation.element
                ));
            }
        }
        problems
    }
}

/// Returns the name of the field whose value is `address` in a `Debug` rendering of a struct
/// (`Params { logits: 1234, out: 0x4d2 }`), if any.
fn field_holding(debug: &str, address: u64) -> Option<String> {
    let body = debug.split_once('{')?.1.rsplit_once('}')?.0;
    body.split(',').find_map(|pair| {
        let (name, value) = pair.split_once(':')?;
        let value = value.trim();
        let parsed = match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => value.parse::<u64>().ok(),
        };
        (parsed == Some(address)).then(|| name.trim().to_string())
    })
}

fn check_copy_len(copied: usize, buffer: usize) -> Result<()> {
    if copied > buffer {
        return Err(Error::ShapeMismatch {
            tensor: "emulated device buffer",
            got: vec![copied],
            expected: vec![buffer],
        });
    }
    Ok(())
}

impl KernelRuntime for EmuRuntime {
    type Buffer<T: DeviceElement> = EmuBuffer<T>;

    fn alloc<T: DeviceElement>(&self, len: usize) -> Result<EmuBuffer<T>> {
        self.alloc_zeroed(len)
    }

    fn upload<T: DeviceElement>(&self, src: &[T], dst: &mut EmuBuffer<T>) -> Result<()> {
        self.copy_to_buffer(src, dst)
    }

    fn download<T: DeviceElement>(&self, src: &EmuBuffer<T>, dst: &mut [T]) -> Result<()> {
        self.copy_from_buffer(src, dst)
    }

    fn len<T: DeviceElement>(&self, buf: &EmuBuffer<T>) -> usize {
        buf.len
    }

    fn address<T: DeviceElement>(&self, buf: &EmuBuffer<T>) -> u64 {
        self.buffer_address(buf)
    }

    unsafe fn launch<P: KernelParams>(
        &self,
        module: &'static str,
        entry: &str,
        dims: LaunchDims,
        params: &P,
    ) -> Result<()> {
        // SAFETY: the trait's contract is the contract of `launch_params`.
        unsafe {
            self.launch_params(
                module,
                entry,
                dims.grid,
                dims.block,
                dims.shared_bytes,
                params,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::field_holding;

    #[test]
    fn field_holding_reads_decimal_and_hex() {
        let debug = "Params { logits: 1234, out: 0x4d2, n: 7 }";
        assert_eq!(field_holding(debug, 1234).as_deref(), Some("logits"));
        assert_eq!(
            field_holding("P { a: 1, out: 0x4d3 }", 0x4d3).as_deref(),
            Some("out")
        );
        assert_eq!(field_holding(debug, 99), None);
    }
}
