//! The CUDA backend: hand-written kernels (`kernels/*.cu`) compiled by NVRTC at run time for
//! the device's architecture, launched through cudarc.
//!
//! The launch sequences live in `launch.rs`, generic over `runtime::KernelRuntime`. The GPU
//! runtime is `driver.rs`, and the CPU emulator used by tests (feature `emulator`) is `emu.rs`,
//! selected with `Cuda::emulated`.
//!
//! NOTE: the GPU paths of this module compile and their input checks are tested without a
//! GPU, but they have not yet run on one. `scripts/gpu-check.sh` runs the GPU checks.

pub mod check;
mod driver;
#[cfg(feature = "emulator")]
pub mod emu;
mod launch;
mod nvrtc;
mod params;
pub(crate) mod runtime;
mod source;

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::backend::{validate_backward, validate_forward, Backend};
use crate::batch::{check_len, Batch, BatchShape};
use crate::config::DpoConfig;
use crate::dtype::{Element, Label};
use crate::error::{Error, Result};
use crate::output::{labels_digest, DpoOutput, ForwardState, Saved};

pub use check::{check_kernels, CheckKernelsArgs, KernelReport};
pub use nvrtc::{resolve_include_dirs, INCLUDE_ENV};

use driver::DriverRuntime;
use launch::{BatchAddresses, Launcher, SavedBuffers};
use runtime::KernelRuntime;

/// Device buffers a CUDA forward keeps for its backward, tagged with the runtime that owns
/// them.
#[derive(Debug)]
pub(crate) enum DeviceSaved {
    /// Buffers of a GPU.
    Driver(SavedBuffers<DriverRuntime>),
    /// Buffers of the CPU emulator.
    #[cfg(feature = "emulator")]
    Emulator(SavedBuffers<emu::EmuRuntime>),
}

/// Moves a runtime's saved buffers into and out of [`DeviceSaved`].
pub(crate) trait SavedSlot: KernelRuntime + Sized {
    /// Tags buffers of this runtime.
    fn wrap(saved: SavedBuffers<Self>) -> DeviceSaved;

    /// Returns the buffers when `saved` belongs to this runtime.
    fn unwrap(saved: &DeviceSaved) -> Option<&SavedBuffers<Self>>;
}

impl SavedSlot for DriverRuntime {
    fn wrap(saved: SavedBuffers<Self>) -> DeviceSaved {
        DeviceSaved::Driver(saved)
    }

    fn unwrap(saved: &DeviceSaved) -> Option<&SavedBuffers<Self>> {
        #[allow(unreachable_patterns)]
        match saved {
            DeviceSaved::Driver(buffers) => Some(buffers),
            _ => None,
        }
    }
}

#[cfg(feature = "emulator")]
impl SavedSlot for emu::EmuRuntime {
    fn wrap(saved: SavedBuffers<Self>) -> DeviceSaved {
        DeviceSaved::Emulator(saved)
    }

    fn unwrap(saved: &DeviceSaved) -> Option<&SavedBuffers<Self>> {
        match saved {
            DeviceSaved::Emulator(buffers) => Some(buffers),
            _ => None,
        }
    }
}

/// The runtime behind a [`Cuda`] backend.
// A backend holds one `Inner` for its lifetime, so the variants' size difference costs
// nothing, while boxing the driver would add an indirection to every launch.
#[allow(clippy::large_enum_variant)]
enum Inner {
    /// A GPU through the CUDA driver.
    Driver(Launcher<DriverRuntime>),
    /// The kernels compiled as host C++ and run on the CPU.
    #[cfg(feature = "emulator")]
    Emulator(Launcher<emu::EmuRuntime>),
}

/// Runs `$body` with `$launcher` bound to the backend's launcher, whatever its runtime.
macro_rules! with_launcher {
    ($cuda:expr, $launcher:ident => $body:expr) => {
        match &$cuda.inner {
            Inner::Driver($launcher) => $body,
            #[cfg(feature = "emulator")]
            Inner::Emulator($launcher) => $body,
        }
    };
}

/// The CUDA backend on one device.
///
/// Host slices passed to [`Backend`] methods are copied into device buffers that grow to the
/// largest batch seen and are reused, so that path keeps a device copy of the logits (and of
/// the gradient). A separate backward uploads the logits again; [`Backend::forward_backward`]
/// uploads them once for both passes. Trainers whose logits are already
/// on the GPU call [`Cuda::forward_device`] and [`Cuda::backward_device`] instead, which copy
/// nothing large and allocate O(rows) device memory.
pub struct Cuda {
    name: String,
    inner: Inner,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Cuda {
    /// Opens device `ordinal`. Fails with [`Error::NoDevice`] when the driver or NVRTC library
    /// is missing, no such GPU is visible, or the CUDA headers for NVRTC are not found (see
    /// [`resolve_include_dirs`]). Kernels are compiled on first use, for this device's
    /// architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        let runtime = DriverRuntime::open(ordinal)?;
        Ok(Cuda {
            name: format!("cuda:{ordinal}"),
            inner: Inner::Driver(Launcher::new(runtime)),
        })
    }

    /// Returns a backend that runs the unchanged kernel sources on the CPU, under the
    /// emulator's model of CUDA execution (feature `emulator`; for tests, see
    /// `emu/README.md`). It goes through the same launch code, argument structs and launch
    /// dimensions as a GPU, and fails with [`Error::Emulator`] on a deadlock, a warp
    /// operation misuse or a write outside a buffer. Device-buffer methods
    /// ([`Cuda::forward_device`] and the like) need a GPU and fail with [`Error::NoDevice`].
    #[cfg(feature = "emulator")]
    pub fn emulated() -> Result<Self> {
        Ok(Cuda {
            name: "cuda-emulator".to_string(),
            inner: Inner::Emulator(Launcher::new(emu::EmuRuntime::new())),
        })
    }

    /// Returns the stream every launch and copy of this backend is issued on (GPU only), so
    /// a trainer can order its own work against it.
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        #[allow(unreachable_patterns)]
        match &self.inner {
            Inner::Driver(launcher) => Some(launcher.runtime().stream()),
            _ => None,
        }
    }

    /// Returns the NVRTC target the kernels are compiled for (`sm_90`), GPU only.
    pub fn arch(&self) -> Option<&str> {
        #[allow(unreachable_patterns)]
        match &self.inner {
            Inner::Driver(launcher) => Some(launcher.runtime().arch()),
            _ => None,
        }
    }

    fn driver(&self) -> Result<&Launcher<DriverRuntime>> {
        #[allow(unreachable_patterns)]
        match &self.inner {
            Inner::Driver(launcher) => Ok(launcher),
            _ => Err(Error::NoDevice {
                reason: format!(
                    "{} is not a GPU backend; device buffers need one",
                    self.name
                ),
            }),
        }
    }

    /// Runs the forward on a batch that already lives on this backend's GPU.
    ///
    /// Checks the config, shape and buffer lengths on the host. Labels and reference
    /// log-probs are not read back: a label outside `[0, V)` is reported by the kernel as
    /// [`Error::InvalidLabel`], but a non-finite reference log-prob is not detected.
    pub fn forward_device<T: Element, L: Label>(
        &self,
        batch: &DeviceBatch<'_, T, L>,
        config: &DpoConfig,
    ) -> Result<DpoOutput> {
        let launcher = self.driver()?;
        let shape = batch.shape;
        config.validate()?;
        batch.check(launcher.runtime().stream())?;
        let stream = launcher.runtime().stream();
        // The guards order this stream after the buffers' last writes on other streams; they
        // are dropped after the forward has synchronised (it downloads its outputs).
        let (logits, _logits_guard) = batch.logits.device_ptr(stream);
        let (labels, _labels_guard) = batch.labels.device_ptr(stream);
        let reference = batch.reference_logps.map(|r| r.device_ptr(stream));
        let inputs = BatchAddresses {
            logits,
            labels,
            reference_logps: reference.as_ref().map_or(0, |(address, _)| *address),
            logits_dtype: T::DTYPE,
            label_name: L::NAME,
        };
        // SAFETY: `check` verified that each slice belongs to this context and has exactly
        // the length the shape needs. CudaSlice allocations are aligned to 256 bytes.
        let result = unsafe { launcher.forward_device(&shape, config, inputs) }?;
        Ok(result.into_output(shape, *config, None, |saved| {
            Saved::Cuda(DriverRuntime::wrap(saved))
        }))
    }

    /// Writes `grad_loss * d loss / d logits` of a device batch into `grad` (`[2B, T, W]` on
    /// this GPU). The launch is asynchronous on [`Cuda::stream`].
    pub fn backward_device<T: Element, L: Label, G: Element>(
        &self,
        batch: &DeviceBatch<'_, T, L>,
        state: &ForwardState,
        grad_loss: f32,
        grad: &mut CudaSlice<G>,
    ) -> Result<()> {
        let launcher = self.driver()?;
        let shape = batch.shape;
        let stream = launcher.runtime().stream();
        batch.check(stream)?;
        check_device_backward(&shape, state, grad_loss)?;
        check_context(stream, grad.stream(), "policy_logits_grad")?;
        check_len("policy_logits_grad", grad.len(), &logits_dims(&shape))?;
        let saved = launcher.check_owner(saved_of::<DriverRuntime>(state))?;
        let (logits, _logits_guard) = batch.logits.device_ptr(stream);
        let (labels, _labels_guard) = batch.labels.device_ptr(stream);
        let (grad_address, _grad_guard) = grad.device_ptr_mut(stream);
        let entry = params::token_logps_bwd_entry(T::DTYPE, L::NAME, G::DTYPE);
        // SAFETY: shapes and contexts are checked above. `grad` is a separate allocation
        // from the logits, because Rust forbids a `&mut` and a `&` to the same slice, so the
        // kernel never reads memory it has written. The guards live until the launch is
        // enqueued, so other streams wait for it before they touch these buffers.
        unsafe {
            launcher.launch_backward(
                &shape,
                &state.config,
                saved,
                logits,
                labels,
                grad_address,
                &entry,
                grad_loss,
            )
        }
    }

    /// Overwrites device `logits` with `grad_loss * d loss / d logits`. Every check runs before
    /// the launch, so an error leaves the logits untouched.
    pub fn backward_device_in_place<T: Element, L: Label>(
        &self,
        shape: BatchShape,
        logits: &mut CudaSlice<T>,
        labels: &CudaSlice<L>,
        state: &ForwardState,
        grad_loss: f32,
    ) -> Result<()> {
        let launcher = self.driver()?;
        let stream = launcher.runtime().stream();
        shape.validate()?;
        check_context(stream, logits.stream(), "policy_logits")?;
        check_context(stream, labels.stream(), "labels")?;
        check_len("policy_logits", logits.len(), &logits_dims(&shape))?;
        check_len("labels", labels.len(), &logits_dims(&shape)[..2])?;
        check_device_backward(&shape, state, grad_loss)?;
        let saved = launcher.check_owner(saved_of::<DriverRuntime>(state))?;
        let (labels_address, _labels_guard) = labels.device_ptr(stream);
        let (logits_address, _logits_guard) = logits.device_ptr_mut(stream);
        let entry = params::token_logps_bwd_entry(T::DTYPE, L::NAME, T::DTYPE);
        // SAFETY: as backward_device, with grad == logits and G == T: each element is read by
        // the thread that overwrites it, before it does so.
        unsafe {
            launcher.launch_backward(
                &shape,
                &state.config,
                saved,
                logits_address,
                labels_address,
                logits_address,
                &entry,
                grad_loss,
            )
        }?;
        state.mark_consumed_in_place();
        Ok(())
    }
}

/// A batch whose buffers live on the GPU of a [`Cuda`] backend (same context), laid out like
/// [`Batch`]: logits `[2B, T, W]`, labels `[2B, T]`, reference log-probs `[2B]`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceBatch<'a, T: Element, L: Label> {
    /// Dimensions.
    pub shape: BatchShape,
    /// Policy logits `[2B, T, W]`.
    pub logits: &'a CudaSlice<T>,
    /// Target labels `[2B, T]`; `ignore_index` masks a position out.
    pub labels: &'a CudaSlice<L>,
    /// Reference sequence log-probs `[2B]`; `None` means reference-free.
    pub reference_logps: Option<&'a CudaSlice<f32>>,
}

impl<T: Element, L: Label> DeviceBatch<'_, T, L> {
    /// Checks dims, buffer lengths and that every buffer belongs to `stream`'s context.
    fn check(&self, stream: &Arc<CudaStream>) -> Result<()> {
        let shape = &self.shape;
        shape.validate()?;
        check_context(stream, self.logits.stream(), "policy_logits")?;
        check_context(stream, self.labels.stream(), "labels")?;
        check_len("policy_logits", self.logits.len(), &logits_dims(shape))?;
        check_len("labels", self.labels.len(), &logits_dims(shape)[..2])?;
        if let Some(reference) = self.reference_logps {
            check_context(stream, reference.stream(), "reference_logps")?;
            check_len("reference_logps", reference.len(), &[shape.sequences()])?;
        }
        Ok(())
    }
}

fn logits_dims(shape: &BatchShape) -> [usize; 3] {
    [shape.sequences(), shape.seq_len, shape.row_stride]
}

/// Checks that a buffer was allocated in the same CUDA context as the backend.
fn check_context(ours: &Arc<CudaStream>, theirs: &Arc<CudaStream>, tensor: &str) -> Result<()> {
    if ours.context() == theirs.context() {
        Ok(())
    } else {
        Err(Error::StateMismatch {
            detail: format!(
                "{tensor} lives in another CUDA context (device {}); allocate it through \
                 this backend's stream or context",
                theirs.context().ordinal()
            ),
        })
    }
}

/// Runs the backward checks that need no host copy of the labels.
fn check_device_backward(shape: &BatchShape, state: &ForwardState, grad_loss: f32) -> Result<()> {
    state.check_shape(shape)?;
    // Device labels are not hashed, so only the in-place check applies.
    state.check_not_consumed()?;
    if !grad_loss.is_finite() {
        return Err(Error::InvalidParameter {
            name: "grad_loss",
            value: grad_loss as f64,
            expected: "a finite upstream gradient of the loss (1.0 for a plain loss.backward())",
        });
    }
    Ok(())
}

/// Returns the saved buffers of runtime `R` in `state`, if there are any.
fn saved_of<R: SavedSlot>(state: &ForwardState) -> Option<&SavedBuffers<R>> {
    match &state.saved {
        Saved::Cuda(saved) => R::unwrap(saved),
        Saved::Host(_) => None,
    }
}

/// Returns the saved buffers of `R` in `state`, or an error naming the backend that ran the
/// forward.
fn require_saved<'a, R: SavedSlot>(
    launcher: &Launcher<R>,
    state: &'a ForwardState,
) -> Result<&'a SavedBuffers<R>> {
    if matches!(state.saved, Saved::Host(_)) {
        return Err(Error::StateMismatch {
            detail: "the forward ran on the CPU and the backward on CUDA; use one backend for \
                     both"
                .to_string(),
        });
    }
    launcher.check_owner(saved_of::<R>(state))
}

/// Runs the host-slice forward, shared by every runtime.
fn forward_on<R: SavedSlot, T: Element, L: Label>(
    launcher: &Launcher<R>,
    batch: &Batch<'_, T, L>,
    config: &DpoConfig,
) -> Result<DpoOutput> {
    let shape = batch.shape;
    validate_forward(batch, config)?;
    let result = launcher.forward_host(
        &shape,
        config,
        batch.logits,
        batch.labels,
        batch.reference_logps,
    )?;
    let digest = Some(labels_digest(batch.labels));
    Ok(result.into_output(shape, *config, digest, |saved| Saved::Cuda(R::wrap(saved))))
}

/// Runs the host-slice forward and backward with one upload, shared by every runtime.
fn forward_backward_on<R: SavedSlot, T: Element, L: Label, G: Element>(
    launcher: &Launcher<R>,
    batch: &Batch<'_, T, L>,
    config: &DpoConfig,
    grad: &mut [G],
) -> Result<DpoOutput> {
    let shape = batch.shape;
    validate_forward(batch, config)?;
    check_len("policy_logits_grad", grad.len(), &logits_dims(&shape))?;
    let result = launcher.forward_backward_host(
        &shape,
        config,
        batch.logits,
        batch.labels,
        batch.reference_logps,
        grad,
    )?;
    let digest = Some(labels_digest(batch.labels));
    Ok(result.into_output(shape, *config, digest, |saved| Saved::Cuda(R::wrap(saved))))
}

impl Backend for Cuda {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn forward_backward<T: Element, L: Label, G: Element>(
        &self,
        batch: &Batch<'_, T, L>,
        config: &DpoConfig,
        grad: &mut [G],
    ) -> Result<DpoOutput> {
        with_launcher!(self, launcher => forward_backward_on(launcher, batch, config, grad))
    }

    fn forward<T: Element, L: Label>(
        &self,
        batch: &Batch<'_, T, L>,
        config: &DpoConfig,
    ) -> Result<DpoOutput> {
        with_launcher!(self, launcher => forward_on(launcher, batch, config))
    }

    fn backward<T: Element, L: Label, G: Element>(
        &self,
        batch: &Batch<'_, T, L>,
        state: &ForwardState,
        grad_loss: f32,
        grad: &mut [G],
    ) -> Result<()> {
        let shape = batch.shape;
        validate_backward(
            &shape,
            batch.logits.len(),
            batch.labels,
            state,
            grad_loss,
            Some(grad.len()),
        )?;
        with_launcher!(self, launcher => {
            let saved = require_saved(launcher, state)?;
            launcher.backward_host(
                &shape,
                &state.config,
                saved,
                batch.logits,
                batch.labels,
                grad_loss,
                grad,
            )
        })
    }

    fn backward_in_place<T: Element, L: Label>(
        &self,
        shape: BatchShape,
        logits: &mut [T],
        labels: &[L],
        state: &ForwardState,
        grad_loss: f32,
    ) -> Result<()> {
        validate_backward(&shape, logits.len(), labels, state, grad_loss, None)?;
        with_launcher!(self, launcher => {
            let saved = require_saved(launcher, state)?;
            launcher.backward_host_in_place(&shape, &state.config, saved, logits, labels, grad_loss)
        })?;
        state.mark_consumed_in_place();
        Ok(())
    }
}
