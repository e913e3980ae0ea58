//! The forward and backward launch sequences, written once over [`KernelRuntime`] so the GPU
//! driver and the host-C++ emulator run the same argument structs, grids and copies.
//!
//! Forward: `token_logps_fwd` (one pass over the logits) then `dpo_pairs_fwd` (sequence sums,
//! losses, metrics, `c[r]`), then one download of a 3-slot fault report and, when it is
//! clean, one download of the packed per-pair outputs. `c[r]` and the per-row state stay on
//! the device in [`SavedBuffers`] for the backward, which multiplies by `grad_loss` in the
//! kernel, so no host round trip sits between the two passes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::params::{
    self, DpoPairsParams, TokenLogpsBwdParams, TokenLogpsFwdParams, FAULT_REPORT_INFO,
    FAULT_REPORT_LEN, FAULT_REPORT_POSITION, FAULT_REPORT_STATUS,
};
use super::runtime::{DeviceElement, KernelRuntime};
use super::source::{DPO, TOKEN_LOGPS};
use crate::backend::check_gradient_scale;
use crate::batch::{BatchShape, Metrics};
use crate::config::DpoConfig;
use crate::cpu::RowFault;
use crate::dtype::{DType, Element, Label};
use crate::error::{Error, Result};
use crate::output::DpoOutput;
use crate::pairs::{round_pair_values, PairValues};

/// Per-row and per-sequence device buffers a forward leaves for its backward: O(2B * T).
pub(crate) struct SavedBuffers<R: KernelRuntime> {
    /// Id of the [`Launcher`] whose runtime owns the buffers.
    pub owner: u64,
    /// `m` per position `[2B * T]`.
    pub row_max: R::Buffer<f32>,
    /// `log(sum exp(x - m))` per position `[2B * T]`.
    pub row_log_sum: R::Buffer<f32>,
    /// `c[r]` per sequence `[2B]`, for an upstream gradient of 1.
    pub seq_coef: R::Buffer<f32>,
    /// A host copy of `seq_coef`, so the backward checks its row scales before any launch.
    pub seq_coef_host: Vec<f32>,
}

impl<R: KernelRuntime> std::fmt::Debug for SavedBuffers<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedBuffers")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// Device addresses of one batch's inputs, in workspace buffers or in the caller's memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BatchAddresses {
    /// Logits `[2B, T, W]` of `logits_dtype`.
    pub logits: u64,
    /// Labels `[2B, T]` of `label_name`.
    pub labels: u64,
    /// Reference log-probs `[2B]` f32, or 0 when reference-free.
    pub reference_logps: u64,
    /// Element type of the logits.
    pub logits_dtype: DType,
    /// `i32` or `i64`.
    pub label_name: &'static str,
}

/// Result of one forward before it is wrapped for the caller.
pub(crate) struct ForwardResult<R: KernelRuntime> {
    /// Loss, per-pair values and metrics; `state` is filled in by the caller.
    pub loss: f32,
    pub losses: Vec<f32>,
    pub chosen_logps: Vec<f32>,
    pub rejected_logps: Vec<f32>,
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
    pub dloss_dmargin: Vec<f32>,
    pub metrics: Metrics,
    /// Device state for the backward.
    pub saved: SavedBuffers<R>,
}

impl<R: KernelRuntime> ForwardResult<R> {
    /// Splits into the caller's output (with `state` built from the saved buffers by `wrap`)
    /// and nothing else.
    pub(crate) fn into_output(
        self,
        shape: BatchShape,
        config: DpoConfig,
        labels_digest: Option<u64>,
        wrap: impl FnOnce(SavedBuffers<R>) -> crate::output::Saved,
    ) -> DpoOutput {
        DpoOutput {
            loss: self.loss,
            losses: self.losses,
            chosen_logps: self.chosen_logps,
            rejected_logps: self.rejected_logps,
            chosen_rewards: self.chosen_rewards,
            rejected_rewards: self.rejected_rewards,
            dloss_dmargin: self.dloss_dmargin,
            metrics: self.metrics,
            state: crate::output::ForwardState::new(shape, config, wrap(self.saved), labels_digest),
        }
    }
}

/// Device buffers reused across calls; each grows to the largest batch seen and is never
/// shrunk. Inputs live as bytes so one buffer serves every dtype.
struct Workspace<R: KernelRuntime> {
    logits: Option<R::Buffer<u8>>,
    labels: Option<R::Buffer<u8>>,
    grad: Option<R::Buffer<u8>>,
    reference: Option<R::Buffer<f32>>,
    target_logp: Option<R::Buffer<f64>>,
    logit_sum: Option<R::Buffer<f64>>,
    fault_info: Option<R::Buffer<i64>>,
    status: Option<R::Buffer<i32>>,
    seq_valid: Option<R::Buffer<i32>>,
    pair_out: Option<R::Buffer<f64>>,
    fault_report: Option<R::Buffer<i64>>,
}

impl<R: KernelRuntime> Workspace<R> {
    fn new() -> Self {
        Workspace {
            logits: None,
            labels: None,
            grad: None,
            reference: None,
            target_logp: None,
            logit_sum: None,
            fault_info: None,
            status: None,
            seq_valid: None,
            pair_out: None,
            fault_report: None,
        }
    }
}

/// Returns `slot`'s buffer, reallocated when it has fewer than `len` elements.
fn ensure<'a, R: KernelRuntime, T: DeviceElement>(
    runtime: &R,
    slot: &'a mut Option<R::Buffer<T>>,
    len: usize,
) -> Result<&'a mut R::Buffer<T>> {
    let fits = matches!(slot, Some(buffer) if runtime.len(buffer) >= len);
    if !fits {
        *slot = Some(runtime.alloc::<T>(len)?);
    }
    Ok(slot.as_mut().expect("the slot was filled above"))
}

/// Source of unique [`Launcher`] ids, so a backward can tell whose forward state it got.
static NEXT_LAUNCHER_ID: AtomicU64 = AtomicU64::new(1);

/// A runtime plus its reusable workspace: the CUDA backend for one device, real or emulated.
pub(crate) struct Launcher<R: KernelRuntime> {
    runtime: R,
    id: u64,
    workspace: Mutex<Workspace<R>>,
}

impl<R: KernelRuntime> Launcher<R> {
    /// Wraps a runtime.
    pub(crate) fn new(runtime: R) -> Self {
        Launcher {
            runtime,
            id: NEXT_LAUNCHER_ID.fetch_add(1, Ordering::Relaxed),
            workspace: Mutex::new(Workspace::new()),
        }
    }

    /// Returns the runtime.
    pub(crate) fn runtime(&self) -> &R {
        &self.runtime
    }

    fn lock_workspace(&self) -> std::sync::MutexGuard<'_, Workspace<R>> {
        // The buffers hold no invariant a panic could break: every call rewrites them.
        self.workspace
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the saved buffers of `saved` if this launcher made them.
    pub(crate) fn check_owner<'a>(
        &self,
        saved: Option<&'a SavedBuffers<R>>,
    ) -> Result<&'a SavedBuffers<R>> {
        match saved {
            Some(saved) if saved.owner == self.id => Ok(saved),
            _ => Err(Error::StateMismatch {
                detail: "the forward state comes from another backend or another CUDA \
                         device; run the backward on the backend that ran the forward"
                    .to_string(),
            }),
        }
    }

    /// Uploads a host batch into the workspace and runs the forward. Inputs must already be
    /// validated.
    pub(crate) fn forward_host<T: Element, L: Label>(
        &self,
        shape: &BatchShape,
        config: &DpoConfig,
        logits: &[T],
        labels: &[L],
        reference_logps: Option<&[f32]>,
    ) -> Result<ForwardResult<R>> {
        let mut ws = self.lock_workspace();
        let inputs = self.upload_inputs(&mut ws, logits, labels, reference_logps)?;
        // SAFETY: the three input buffers were sized from the validated slices just above.
        unsafe { self.forward_with(&mut ws, shape, config, inputs) }
    }

    /// Uploads a host batch once, runs the forward and then the backward with
    /// `grad_loss = 1` on the same device logits, and downloads the gradient into `grad`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_backward_host<T: Element, L: Label, G: Element>(
        &self,
        shape: &BatchShape,
        config: &DpoConfig,
        logits: &[T],
        labels: &[L],
        reference_logps: Option<&[f32]>,
        grad: &mut [G],
    ) -> Result<ForwardResult<R>> {
        let rt = &self.runtime;
        let mut ws = self.lock_workspace();
        let inputs = self.upload_inputs(&mut ws, logits, labels, reference_logps)?;
        // SAFETY: the three input buffers were sized from the validated slices just above.
        let result = unsafe { self.forward_with(&mut ws, shape, config, inputs) }?;
        let grad_addr = rt.address(ensure(rt, &mut ws.grad, std::mem::size_of_val(grad))?);
        let entry = params::token_logps_bwd_entry(T::DTYPE, L::NAME, G::DTYPE);
        // SAFETY: logits and labels are the buffers the forward just read, and grad has room
        // for 2B * T * W elements of G (its length was checked against the shape by the caller).
        unsafe {
            self.launch_backward(
                shape,
                config,
                &result.saved,
                inputs.logits,
                inputs.labels,
                grad_addr,
                &entry,
                1.0,
            )
        }?;
        let grad_buf = ws.grad.as_ref().expect("allocated above");
        rt.download(grad_buf, bytemuck::cast_slice_mut(grad))?;
        Ok(result)
    }

    /// Copies a host batch into the workspace and returns the device addresses.
    fn upload_inputs<T: Element, L: Label>(
        &self,
        ws: &mut Workspace<R>,
        logits: &[T],
        labels: &[L],
        reference_logps: Option<&[f32]>,
    ) -> Result<BatchAddresses> {
        let rt = &self.runtime;
        let logits_addr = upload_bytes(rt, &mut ws.logits, bytemuck::cast_slice(logits))?;
        let labels_addr = upload_bytes(rt, &mut ws.labels, bytemuck::cast_slice(labels))?;
        let reference_addr = match reference_logps {
            Some(reference) => {
                let buf = ensure(rt, &mut ws.reference, reference.len())?;
                rt.upload(reference, buf)?;
                rt.address(buf)
            }
            None => 0,
        };
        Ok(BatchAddresses {
            logits: logits_addr,
            labels: labels_addr,
            reference_logps: reference_addr,
            logits_dtype: T::DTYPE,
            label_name: L::NAME,
        })
    }

    /// Runs the forward on inputs already in device memory.
    ///
    /// # Safety
    ///
    /// `inputs` must address live buffers of this runtime holding at least `2B * T * W`
    /// logits, `2B * T` labels and (when non-zero) `2B` reference log-probs of the stated
    /// types, each aligned to its element size, unchanged until this call returns.
    pub(crate) unsafe fn forward_device(
        &self,
        shape: &BatchShape,
        config: &DpoConfig,
        inputs: BatchAddresses,
    ) -> Result<ForwardResult<R>> {
        let mut ws = self.lock_workspace();
        // SAFETY: forwarded from the caller.
        unsafe { self.forward_with(&mut ws, shape, config, inputs) }
    }

    /// # Safety
    ///
    /// As [`Launcher::forward_device`].
    unsafe fn forward_with(
        &self,
        ws: &mut Workspace<R>,
        shape: &BatchShape,
        config: &DpoConfig,
        inputs: BatchAddresses,
    ) -> Result<ForwardResult<R>> {
        let rt = &self.runtime;
        let positions = shape.positions();
        let sequences = shape.sequences();
        let b = shape.pairs;

        // 1. Per-call state for the backward; per-call scratch from the workspace.
        let saved = SavedBuffers {
            owner: self.id,
            row_max: rt.alloc::<f32>(positions)?,
            row_log_sum: rt.alloc::<f32>(positions)?,
            seq_coef: rt.alloc::<f32>(sequences)?,
            seq_coef_host: vec![0.0; sequences],
        };
        let target_logp = rt.address(ensure(rt, &mut ws.target_logp, positions)?);
        let logit_sum = rt.address(ensure(rt, &mut ws.logit_sum, positions)?);
        let fault_info = rt.address(ensure(rt, &mut ws.fault_info, positions)?);
        let status = rt.address(ensure(rt, &mut ws.status, positions)?);
        let seq_valid = rt.address(ensure(rt, &mut ws.seq_valid, sequences)?);
        let pair_out = rt.address(ensure(rt, &mut ws.pair_out, params::pair_out_len(b))?);
        let fault_report = rt.address(ensure(rt, &mut ws.fault_report, FAULT_REPORT_LEN)?);

        // 2. One pass over the logits.
        let split = params::token_logps_split(positions, shape.vocab);
        let fwd = TokenLogpsFwdParams {
            logits: inputs.logits,
            labels: inputs.labels,
            row_max: rt.address(&saved.row_max),
            row_log_sum: rt.address(&saved.row_log_sum),
            target_logp,
            logit_sum,
            fault_info,
            status,
            ignore_index: config.ignore_index,
            positions: positions as i64,
            vocab: shape.vocab as i64,
            row_stride: shape.row_stride as i64,
            warp_per_row: i32::from(split.warp_per_row),
            reserved: 0,
        };
        let entry = params::token_logps_fwd_entry(inputs.logits_dtype, inputs.label_name);
        // SAFETY: `fwd` is TokenLogpsFwdParams of common.cuh. The caller guarantees that the
        // logits and labels cover P = 2B*T rows of W elements, and every output buffer above
        // has at least P elements. The kernel visits rows p < P and columns c < W only, and
        // gathers x[p, y] only for 0 <= y < V. It writes the six [P] outputs.
        unsafe { rt.launch(TOKEN_LOGPS.name, &entry, split.dims, &fwd) }?;

        // 3. Sequence sums, pair losses, metrics and c[r].
        let pairs = DpoPairsParams {
            target_logp,
            logit_sum,
            status,
            fault_info,
            reference_logps: inputs.reference_logps,
            seq_coef: rt.address(&saved.seq_coef),
            seq_valid,
            pair_out,
            fault_report,
            pairs: b as i64,
            seq_len: shape.seq_len as i64,
            vocab: shape.vocab as i64,
            beta: config.beta,
            label_smoothing: config.loss.label_smoothing(),
            loss_kind: config.loss.kernel_code(),
            length_normalize: i32::from(config.length_normalize),
        };
        // SAFETY: `pairs` is DpoPairsParams of common.cuh. It reads the four [P] buffers that
        // the previous launch wrote (same stream, so in order) and the [2B] reference when
        // non-null. It writes seq_coef and seq_valid [2B], pair_out [6B + 9] and the 3-slot
        // fault report, all allocated above with at least those lengths.
        unsafe { rt.launch(DPO.name, "dpo_pairs_fwd", params::dpo_pairs_dims(), &pairs) }?;

        // 4. A faulty position fails the call before any output is built.
        let mut report = [0i64; FAULT_REPORT_LEN];
        rt.download(
            ws.fault_report.as_ref().expect("allocated in step 1"),
            &mut report,
        )?;
        if report[FAULT_REPORT_POSITION] >= 0 {
            return Err(fault_error(shape, config, &report));
        }
        let mut out = vec![0.0f64; params::pair_out_len(b)];
        rt.download(ws.pair_out.as_ref().expect("allocated in step 1"), &mut out)?;
        let mut saved = saved;
        rt.download(&saved.seq_coef, &mut saved.seq_coef_host)?;
        let outputs = round_pair_values(&unpack_pair_out(&out, b), config)?;
        Ok(ForwardResult {
            loss: outputs.loss,
            losses: outputs.losses,
            chosen_logps: outputs.chosen_logps,
            rejected_logps: outputs.rejected_logps,
            chosen_rewards: outputs.chosen_rewards,
            rejected_rewards: outputs.rejected_rewards,
            dloss_dmargin: outputs.dloss_dmargin,
            metrics: outputs.metrics,
            saved,
        })
    }

    /// Uploads a host batch and writes `grad_loss * d loss / d logits` into `grad`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_host<T: Element, L: Label, G: Element>(
        &self,
        shape: &BatchShape,
        config: &DpoConfig,
        saved: &SavedBuffers<R>,
        logits: &[T],
        labels: &[L],
        grad_loss: f32,
        grad: &mut [G],
    ) -> Result<()> {
        let rt = &self.runtime;
        let mut ws = self.lock_workspace();
        let logits_addr = upload_bytes(rt, &mut ws.logits, bytemuck::cast_slice(logits))?;
        let labels_addr = upload_bytes(rt, &mut ws.labels, bytemuck::cast_slice(labels))?;
        let grad_bytes = std::mem::size_of_val(grad);
        let grad_addr = rt.address(ensure(rt, &mut ws.grad, grad_bytes)?);
        let entry = params::token_logps_bwd_entry(T::DTYPE, L::NAME, G::DTYPE);
        // SAFETY: logits, labels and grad were sized from the validated host slices above.
        unsafe {
            self.launch_backward(
                shape,
                config,
                saved,
                logits_addr,
                labels_addr,
                grad_addr,
                &entry,
                grad_loss,
            )
        }?;
        let grad_buf = ws.grad.as_ref().expect("allocated above");
        rt.download(grad_buf, bytemuck::cast_slice_mut(grad))
    }

    /// Uploads the logits, overwrites them on the device with their gradient and downloads
    /// the result over `logits`. Nothing is written to `logits` unless every launch succeeded.
    pub(crate) fn backward_host_in_place<T: Element, L: Label>(
        &self,
        shape: &BatchShape,
        config: &DpoConfig,
        saved: &SavedBuffers<R>,
        logits: &mut [T],
        labels: &[L],
        grad_loss: f32,
    ) -> Result<()> {
        let rt = &self.runtime;
        let mut ws = self.lock_workspace();
        let logits_addr = upload_bytes(rt, &mut ws.logits, bytemuck::cast_slice(logits))?;
        let labels_addr = upload_bytes(rt, &mut ws.labels, bytemuck::cast_slice(labels))?;
        let entry = params::token_logps_bwd_entry(T::DTYPE, L::NAME, T::DTYPE);
        // SAFETY: the logits buffer is read and written by the kernel (grad == logits, same
        // dtype), sized from the validated host slice above.
        unsafe {
            self.launch_backward(
                shape,
                config,
                saved,
                logits_addr,
                labels_addr,
                logits_addr,
                &entry,
                grad_loss,
            )
        }?;
        let logits_buf = ws.logits.as_ref().expect("allocated above");
        rt.download(logits_buf, bytemuck::cast_slice_mut(logits))
    }

    /// Launches the backward kernel on device addresses.
    ///
    /// # Safety
    ///
    /// `logits` and `grad` must address `2B * T * W` elements of the dtypes named by `entry`,
    /// and may be the same buffer only when those dtypes are equal. `labels` must address
    /// `2B * T` labels. All must be aligned to their element size, and `saved` must come from
    /// a forward of this shape.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch_backward(
        &self,
        shape: &BatchShape,
        config: &DpoConfig,
        saved: &SavedBuffers<R>,
        logits: u64,
        labels: u64,
        grad: u64,
        entry: &str,
        grad_loss: f32,
    ) -> Result<()> {
        check_gradient_scale(grad_loss, &saved.seq_coef_host)?;
        let rt = &self.runtime;
        let positions = shape.positions();
        let split = params::token_logps_split(positions, shape.vocab);
        let bwd = TokenLogpsBwdParams {
            logits,
            labels,
            row_max: rt.address(&saved.row_max),
            row_log_sum: rt.address(&saved.row_log_sum),
            seq_coef: rt.address(&saved.seq_coef),
            grad,
            ignore_index: config.ignore_index,
            positions: positions as i64,
            seq_len: shape.seq_len as i64,
            vocab: shape.vocab as i64,
            row_stride: shape.row_stride as i64,
            grad_loss,
            warp_per_row: i32::from(split.warp_per_row),
        };
        // SAFETY: `bwd` is TokenLogpsBwdParams of common.cuh. The saved buffers hold P and 2B
        // elements (checked by the caller against the forward's shape); the kernel reads
        // logits and writes grad only at rows p < P, columns c < W, and reads seq_coef at
        // p / T < 2B. It writes every element of grad.
        unsafe { rt.launch(TOKEN_LOGPS.name, entry, split.dims, &bwd) }
    }
}

/// Uploads `bytes` into a workspace slot and returns its device address.
fn upload_bytes<R: KernelRuntime>(
    runtime: &R,
    slot: &mut Option<R::Buffer<u8>>,
    bytes: &[u8],
) -> Result<u64> {
    let buffer = ensure(runtime, slot, bytes.len())?;
    runtime.upload(bytes, buffer)?;
    Ok(runtime.address(buffer))
}

/// Builds the error for the fault report of `dpo_pairs_fwd`, with the CPU backend's wording.
fn fault_error(shape: &BatchShape, config: &DpoConfig, report: &[i64; FAULT_REPORT_LEN]) -> Error {
    let position = report[FAULT_REPORT_POSITION] as usize;
    let (row, position) = (position / shape.seq_len, position % shape.seq_len);
    let info = report[FAULT_REPORT_INFO];
    let fault = match report[FAULT_REPORT_STATUS] {
        params::TOKEN_STATUS_NAN => RowFault::NaN(info as usize),
        params::TOKEN_STATUS_POS_INF => RowFault::PosInf(info as usize),
        params::TOKEN_STATUS_ALL_NEG_INF => RowFault::AllNegInf,
        params::TOKEN_STATUS_BAD_LABEL => {
            return Error::InvalidLabel {
                row,
                position,
                label: info,
                vocab: shape.vocab,
                ignore_index: config.ignore_index,
            }
        }
        other => {
            return Error::NonFiniteLogit {
                row,
                position,
                detail: format!("has kernel status {other}, which this build does not know"),
            }
        }
    };
    Error::NonFiniteLogit {
        row,
        position,
        detail: fault.describe(),
    }
}

/// Splits the packed `pair_out` buffer (layout `PAIR_OUT_*` of common.cuh) into the pair
/// step's f64 values.
fn unpack_pair_out(out: &[f64], b: usize) -> PairValues {
    let section = |index: usize, len: usize| out[index * b..index * b + len].to_vec();
    let m = &out[params::PAIR_OUT_METRICS * b..];
    PairValues {
        loss: m[params::METRIC_LOSS],
        losses: section(params::PAIR_OUT_LOSSES, b),
        dloss_dmargin: section(params::PAIR_OUT_DLOSS_DMARGIN, b),
        chosen_rewards: section(params::PAIR_OUT_CHOSEN_REWARDS, b),
        rejected_rewards: section(params::PAIR_OUT_REJECTED_REWARDS, b),
        seq_logps: section(params::PAIR_OUT_SEQ_LOGPS, 2 * b),
        metrics: [
            m[params::METRIC_REWARDS_CHOSEN],
            m[params::METRIC_REWARDS_REJECTED],
            m[params::METRIC_REWARDS_ACCURACY],
            m[params::METRIC_REWARDS_MARGIN],
            m[params::METRIC_LOGPS_CHOSEN],
            m[params::METRIC_LOGPS_REJECTED],
            m[params::METRIC_LOGITS_CHOSEN],
            m[params::METRIC_LOGITS_REJECTED],
        ],
    }
}
