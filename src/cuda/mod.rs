//! The CUDA backend (work in progress: returns `Error::NoDevice` until the kernels land).

#[cfg(feature = "emulator")]
pub mod emu;
#[cfg(feature = "emulator")]
mod runtime;

use crate::backend::Backend;
use crate::batch::{Batch, BatchShape};
use crate::config::DpoConfig;
use crate::dtype::{Element, Label};
use crate::error::{Error, Result};
use crate::output::{DpoOutput, ForwardState};

/// Device buffers a CUDA forward keeps for its backward.
#[derive(Debug)]
pub(crate) struct DeviceSaved;

/// The CUDA backend on one device.
#[derive(Debug)]
pub struct Cuda {
    ordinal: usize,
}

impl Cuda {
    /// Opens device `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self> {
        let _ = ordinal;
        Err(Error::NoDevice {
            reason: "the CUDA backend is not built yet".to_string(),
        })
    }
}

impl Backend for Cuda {
    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn forward<T: Element, L: Label>(
        &self,
        _batch: &Batch<'_, T, L>,
        _config: &DpoConfig,
    ) -> Result<DpoOutput> {
        unimplemented!()
    }

    fn backward<T: Element, L: Label, G: Element>(
        &self,
        _batch: &Batch<'_, T, L>,
        _state: &ForwardState,
        _grad_loss: f32,
        _grad: &mut [G],
    ) -> Result<()> {
        unimplemented!()
    }

    fn backward_in_place<T: Element, L: Label>(
        &self,
        _shape: BatchShape,
        _logits: &mut [T],
        _labels: &[L],
        _state: &ForwardState,
        _grad_loss: f32,
    ) -> Result<()> {
        unimplemented!()
    }
}
