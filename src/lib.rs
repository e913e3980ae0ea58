//! Fused DPO (Direct Preference Optimization) loss and its gradient with respect to the policy
//! logits, on the CPU (rayon) or on an NVIDIA GPU (hand-written CUDA kernels compiled by NVRTC
//! at run time).
//!
//! # The math
//!
//! A batch contains `2B` sequences of `T` positions: rows `0..B` are chosen responses, rows
//! `B..2B` the rejected responses of the same pairs. Logits `x[r, t, :]` have row stride `W`
//! and true vocabulary `V <= W`; labels `y[r, t]` are aligned with them, and the value
//! `ignore_index` (default -100) masks a position out (`mask[r, t] = 0`).
//!
//! ```text
//! lse[r,t]  = m + log sum_{v<V} exp(x[r,t,v] - m),   m = max_{v<V} x[r,t,v]
//! logp[r]   = sum_t mask[r,t] * (x[r,t,y[r,t]] - lse[r,t])
//! z_i       = (logp[i] - ref[i]) - (logp[B+i] - ref[B+i])
//! loss      = mean_i l(z_i)          l(z) = -log sigmoid(beta * z) for sigmoid DPO
//! d loss / d x[r,t,v] = c[r] * mask[r,t] * (onehot(y[r,t])[v] - softmax(x[r,t,0..V])[v])
//! c[i] = l'(z_i) / B,   c[B+i] = -l'(z_i) / B
//! ```
//!
//! Padded columns `V..W` take no part in any softmax and get gradient 0. Other members of the
//! family ([`LossKind`]) change only `l` and so only `c[r]`.
//!
//! # Passes and traffic
//!
//! The forward reads each valid logits row once (running max, sum of exponentials, target
//! gather and logit sum together) and keeps O(rows) state; masked rows are never read. The
//! backward reads each valid row once more and writes every gradient row once, into a new
//! buffer or over the logits. No buffer of size rows x vocabulary is allocated besides the
//! caller's, except by the CUDA backend when it is given host slices: it then keeps a device
//! copy of the logits and of the gradient (see [`Cuda`]).
//!
//! # Numerics
//!
//! All arithmetic is f32 or wider. Log-probs, losses, rewards and metrics are f32 whatever the
//! logits dtype, and the gradient has the element type of the caller's buffer. Both backends
//! run the pair step in f64 with fixed reduction orders and no atomics, so their outputs are
//! bit-identical run to run (on the CPU also across thread counts; on a GPU this follows from
//! the kernels' design and has not been measured yet). Both share one set of rules that turns
//! NaN or f32 overflow into an error.
//!
//! # A trainer's step
//!
//! ```
//! use dpo_kernels::{Batch, BatchShape, Device, DpoConfig, DpoLoss};
//! use half::bf16;
//!
//! // Two pairs of 3 positions over a vocabulary of 10 (the trainer's own buffers).
//! let shape = BatchShape { pairs: 2, seq_len: 3, vocab: 10, row_stride: 10 };
//! let logits: Vec<bf16> =
//!     (0..shape.logits_len()).map(|i| bf16::from_f32(((i * 37) % 11) as f32 * 0.25)).collect();
//! let labels: Vec<i64> = vec![-100, 4, 7, -100, 1, 2, -100, 4, 9, -100, 3, 3];
//! let reference_logps = vec![-4.0f32, -5.5, -4.2, -5.0];
//!
//! let dpo = DpoLoss::new(DpoConfig::new(0.1), Device::Auto)?;
//! let batch = Batch::new(shape, &logits, &labels, Some(&reference_logps));
//! let out = dpo.forward(&batch)?;
//! println!("loss {} accuracy {}", out.loss, out.metrics.rewards_accuracy);
//!
//! // Backward with the upstream gradient of the loss (1.0 unless the trainer scales it).
//! let mut grad = vec![bf16::ZERO; shape.logits_len()];
//! dpo.backward(&batch, &out.state, 1.0, &mut grad)?;
//! assert!(grad[..10].iter().all(|g| g.to_f32() == 0.0)); // position 0 is masked
//! # Ok::<(), dpo_kernels::Error>(())
//! ```

#![warn(missing_docs)]

mod backend;
mod batch;
mod config;
mod cpu;
pub mod cuda;
mod dtype;
mod engine;
mod error;
pub mod io;
mod output;
mod pairs;

pub use backend::Backend;
pub use batch::{Batch, BatchShape, Metrics};
pub use config::{DpoConfig, LossKind};
pub use cpu::Cpu;
pub use cuda::Cuda;
pub use dtype::{DType, Element, Label};
pub use engine::{Device, DpoLoss};
pub use error::{Error, Result};
pub use output::{DpoOutput, ForwardState};
