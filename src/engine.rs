//! Device selection and the one entry point a trainer calls.

use crate::backend::Backend;
use crate::batch::{Batch, BatchShape};
use crate::config::DpoConfig;
use crate::cpu::Cpu;
use crate::cuda::Cuda;
use crate::dtype::{Element, Label};
use crate::error::{Error, Result};
use crate::output::{DpoOutput, ForwardState};

/// Backend choice for [`DpoLoss::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The rayon CPU backend.
    Cpu,
    /// CUDA device with this ordinal; fails with [`crate::Error::NoDevice`] when there is none.
    Cuda(usize),
    /// CUDA device 0 when a driver, NVRTC and a GPU are present, otherwise the CPU.
    Auto,
}

enum Engine {
    Cpu(Cpu),
    Cuda(Box<Cuda>),
}

/// A DPO loss bound to a config and a backend.
///
/// ```
/// use dpo_kernels::{Batch, BatchShape, Device, DpoConfig, DpoLoss};
///
/// // One pair, two positions, a vocabulary of 4 padded to a row stride of 5.
/// let shape = BatchShape::from_dims(2, 2, 5, 4)?;
/// let logits: Vec<f32> = (0..shape.logits_len()).map(|i| (i % 7) as f32 * 0.3).collect();
/// let labels: Vec<i64> = vec![1, 3, 2, -100]; // chosen: 2 tokens; rejected: 1 token
/// let reference = [-2.5f32, -1.5];
/// let batch = Batch::new(shape, &logits, &labels, Some(&reference));
///
/// let dpo = DpoLoss::new(DpoConfig::new(0.1), Device::Cpu)?;
/// let out = dpo.forward(&batch)?;
/// let mut grad = vec![0.0f32; shape.logits_len()];
/// dpo.backward(&batch, &out.state, 1.0, &mut grad)?;
///
/// assert!(out.loss > 0.0);
/// assert_eq!(grad[3 * 5 + 4], 0.0); // padded column
/// assert!(grad[15..20].iter().all(|&g| g == 0.0)); // masked position
/// # Ok::<(), dpo_kernels::Error>(())
/// ```
pub struct DpoLoss {
    config: DpoConfig,
    engine: Engine,
    fallback_reason: Option<String>,
}

impl DpoLoss {
    /// Checks the config and opens the backend. With [`Device::Auto`], a missing CUDA driver,
    /// NVRTC or GPU selects the CPU and [`DpoLoss::fallback_reason`] returns the reason.
    pub fn new(config: DpoConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let (engine, fallback_reason) = match device {
            Device::Cpu => (Engine::Cpu(Cpu), None),
            Device::Cuda(ordinal) => (Engine::Cuda(Box::new(Cuda::new(ordinal)?)), None),
            Device::Auto => match Cuda::new(0) {
                Ok(cuda) => (Engine::Cuda(Box::new(cuda)), None),
                Err(err) => (Engine::Cpu(Cpu), Some(err.to_string())),
            },
        };
        Ok(DpoLoss {
            config,
            engine,
            fallback_reason,
        })
    }

    /// Checks the config and binds it to an already opened CUDA backend (for example one
    /// sharing a trainer's context, or the emulator in tests).
    pub fn with_cuda(config: DpoConfig, cuda: Cuda) -> Result<Self> {
        config.validate()?;
        Ok(DpoLoss {
            config,
            engine: Engine::Cuda(Box::new(cuda)),
            fallback_reason: None,
        })
    }

    /// Returns the config.
    pub fn config(&self) -> &DpoConfig {
        &self.config
    }

    /// Returns the backend's name (`cpu`, `cuda:0`).
    pub fn device_name(&self) -> String {
        match &self.engine {
            Engine::Cpu(cpu) => cpu.name(),
            Engine::Cuda(cuda) => cuda.name(),
        }
    }

    /// Returns why [`Device::Auto`] fell back to the CPU, if it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Runs the forward pass. See [`Backend::forward`].
    pub fn forward<T: Element, L: Label>(&self, batch: &Batch<'_, T, L>) -> Result<DpoOutput> {
        match &self.engine {
            Engine::Cpu(cpu) => cpu.forward(batch, &self.config),
            Engine::Cuda(cuda) => cuda.forward(batch, &self.config),
        }
    }

    /// Writes `grad_loss * d loss / d logits` into `grad`. See [`Backend::backward`].
    ///
    /// `state` must come from this loss's forward on the same batch. A state from a loss with
    /// another config, a batch of another shape, other labels (compared by a hash), or a state
    /// whose logits an in-place backward already overwrote fails with [`Error::StateMismatch`].
    /// Buffer lengths and the label range are checked again. The logit values are not compared
    /// with the forward's, so other logits give a meaningless gradient.
    pub fn backward<T: Element, L: Label, G: Element>(
        &self,
        batch: &Batch<'_, T, L>,
        state: &ForwardState,
        grad_loss: f32,
        grad: &mut [G],
    ) -> Result<()> {
        self.check_config(state)?;
        match &self.engine {
            Engine::Cpu(cpu) => cpu.backward(batch, state, grad_loss, grad),
            Engine::Cuda(cuda) => cuda.backward(batch, state, grad_loss, grad),
        }
    }

    /// Overwrites the logits with their gradient. See [`Backend::backward_in_place`].
    ///
    /// The checks are those of [`DpoLoss::backward`]. After this call the logits hold the
    /// gradient, so the state records that, and any later backward with it fails.
    pub fn backward_in_place<T: Element, L: Label>(
        &self,
        shape: BatchShape,
        logits: &mut [T],
        labels: &[L],
        state: &ForwardState,
        grad_loss: f32,
    ) -> Result<()> {
        self.check_config(state)?;
        match &self.engine {
            Engine::Cpu(cpu) => cpu.backward_in_place(shape, logits, labels, state, grad_loss),
            Engine::Cuda(cuda) => cuda.backward_in_place(shape, logits, labels, state, grad_loss),
        }
    }

    /// Checks that `state` comes from a forward with this loss's config. The backends read
    /// the config from the state, so without this check a backward on another loss would
    /// silently return the gradient of the forward's loss.
    fn check_config(&self, state: &ForwardState) -> Result<()> {
        if state.config() != self.config {
            return Err(Error::StateMismatch {
                detail: format!(
                    "the forward ran with {:?}, this loss has {:?}; call backward on the \
                     DpoLoss that ran the forward",
                    state.config(),
                    self.config
                ),
            });
        }
        Ok(())
    }

    /// Runs the forward and the backward with `grad_loss = 1`, writing the gradient into `grad`.
    /// See [`Backend::forward_backward`].
    pub fn forward_backward<T: Element, L: Label, G: Element>(
        &self,
        batch: &Batch<'_, T, L>,
        grad: &mut [G],
    ) -> Result<DpoOutput> {
        match &self.engine {
            Engine::Cpu(cpu) => cpu.forward_backward(batch, &self.config, grad),
            Engine::Cuda(cuda) => cuda.forward_backward(batch, &self.config, grad),
        }
    }
}
