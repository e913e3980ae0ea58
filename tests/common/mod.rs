//! Test support shared by every integration test: the backend list, the dtype loop, a
//! fixed-state RNG, batch generators, tolerances and the comparison against the f64
//! reference in `reference.rs`.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

pub mod reference;

use std::sync::OnceLock;

use dpo_kernels::{
    Batch, BatchShape, Device, DpoConfig, DpoLoss, DpoOutput, Element, Error, Label, LossKind,
};
use half::{bf16, f16};

use reference::{RefBatch, RefForward, RefParams};

// ---------------------------------------------------------------------------------------------
// Backends

/// One way to build a [`DpoLoss`]. Every test body runs once per entry of [`backends`].
#[derive(Clone, Copy, Debug)]
pub struct TestBackend {
    /// Name printed in failure messages.
    pub name: &'static str,
    /// Whether a missing device is a failure under `DPO_REQUIRE_GPU=1` (set by the GPU test
    /// script, so that a GPU run cannot pass by skipping).
    pub needs_gpu: bool,
    /// Builds the loss on this backend.
    pub open_with: fn(DpoConfig) -> dpo_kernels::Result<DpoLoss>,
}

impl TestBackend {
    /// Builds the loss for `config`, panicking with the backend name on failure.
    pub fn open(&self, config: DpoConfig) -> DpoLoss {
        (self.open_with)(config)
            .unwrap_or_else(|err| panic!("backend {} rejected {config:?}: {err}", self.name))
    }

    /// Builds the loss for `config` and returns the error, for tests of invalid configs.
    pub fn try_open(&self, config: DpoConfig) -> dpo_kernels::Result<DpoLoss> {
        (self.open_with)(config)
    }
}

fn open_cpu(config: DpoConfig) -> dpo_kernels::Result<DpoLoss> {
    DpoLoss::new(config, Device::Cpu)
}

fn open_cuda(config: DpoConfig) -> dpo_kernels::Result<DpoLoss> {
    DpoLoss::new(config, Device::Cuda(0))
}

#[cfg(feature = "emulator")]
fn open_cuda_emulator(config: DpoConfig) -> dpo_kernels::Result<DpoLoss> {
    DpoLoss::with_cuda(config, dpo_kernels::Cuda::emulated()?)
}

/// Lists every backend the tests know, available or not. A new backend is one more entry here.
fn known_backends() -> Vec<TestBackend> {
    vec![
        #[cfg(feature = "emulator")]
        TestBackend {
            name: "cuda-emulator",
            needs_gpu: false,
            open_with: open_cuda_emulator,
        },
        TestBackend {
            name: "cpu",
            needs_gpu: false,
            open_with: open_cpu,
        },
        TestBackend {
            name: "cuda:0",
            needs_gpu: true,
            open_with: open_cuda,
        },
    ]
}

/// Returns the backends that open on this machine. A GPU backend that reports
/// [`Error::NoDevice`] is skipped with a printed reason, unless `DPO_REQUIRE_GPU=1`, which
/// turns the skip into a panic. Any other error opening a backend is a failure.
pub fn backends() -> &'static [TestBackend] {
    static AVAILABLE: OnceLock<Vec<TestBackend>> = OnceLock::new();
    AVAILABLE.get_or_init(|| {
        let require_gpu = std::env::var("DPO_REQUIRE_GPU").is_ok_and(|v| v == "1");
        let mut available = Vec::new();
        for backend in known_backends() {
            match backend.try_open(DpoConfig::new(0.1)) {
                Ok(_) => available.push(backend),
                Err(err @ Error::NoDevice { .. }) => {
                    if backend.needs_gpu && require_gpu {
                        panic!(
                            "DPO_REQUIRE_GPU=1 but backend {} is unavailable: {err}",
                            backend.name
                        );
                    }
                    eprintln!("skipping backend {}: {err}", backend.name);
                }
                Err(err) => panic!("backend {} failed to open: {err}", backend.name),
            }
        }
        available
    })
}

// ---------------------------------------------------------------------------------------------
// Dtypes

/// A logits dtype under test. Rounding and widening go through `half` directly, not through
/// the crate's [`Element`] conversions.
pub trait TestFloat: Element {
    /// Name in failure messages.
    const NAME: &'static str;
    /// Relative tolerance of a logit gradient stored in this type: 1e-5 for f32. The half
    /// types get two units of their last mantissa bit, rounded up: 2 * 2^-11 -> 1e-3 for f16
    /// and 2 * 2^-8 -> 8e-3 for bf16.
    const GRAD_RTOL: f64;
    /// Smallest positive subnormal, the absolute rounding unit near 0.
    const MIN_SUBNORMAL: f64;
    /// Rounds an f32 to this type, to nearest even.
    fn round(x: f32) -> Self;
    /// Widens to f64 (exact).
    fn widen(self) -> f64;
}

impl TestFloat for f32 {
    const NAME: &'static str = "f32";
    const GRAD_RTOL: f64 = 1e-5;
    const MIN_SUBNORMAL: f64 = 1.401298464324817e-45;

    fn round(x: f32) -> Self {
        x
    }

    fn widen(self) -> f64 {
        self as f64
    }
}

impl TestFloat for f16 {
    const NAME: &'static str = "f16";
    const GRAD_RTOL: f64 = 1e-3;
    const MIN_SUBNORMAL: f64 = 5.960464477539063e-8;

    fn round(x: f32) -> Self {
        f16::from_f32(x)
    }

    fn widen(self) -> f64 {
        self.to_f64()
    }
}

impl TestFloat for bf16 {
    const NAME: &'static str = "bf16";
    const GRAD_RTOL: f64 = 8e-3;
    const MIN_SUBNORMAL: f64 = 9.183549615799121e-41;

    fn round(x: f32) -> Self {
        bf16::from_f32(x)
    }

    fn widen(self) -> f64 {
        self.to_f64()
    }
}

/// A label dtype under test.
pub trait TestLabel: Label {
    /// Narrows an i64 label; every label the tests use fits in i32.
    fn from_i64(y: i64) -> Self;
}

impl TestLabel for i32 {
    fn from_i64(y: i64) -> Self {
        i32::try_from(y).expect("test labels fit in i32")
    }
}

impl TestLabel for i64 {
    fn from_i64(y: i64) -> Self {
        y
    }
}

/// Calls `f::<T, L>(args)` for every logits dtype (f32, f16, bf16) and both label types.
#[allow(unused_macros)] // tests/cases.rs loops over dtypes by hand
macro_rules! for_each_dtype {
    ($f:ident($($arg:expr),* $(,)?)) => {{
        $f::<f32, i64>($($arg),*);
        $f::<f32, i32>($($arg),*);
        $f::<half::f16, i64>($($arg),*);
        $f::<half::f16, i32>($($arg),*);
        $f::<half::bf16, i64>($($arg),*);
        $f::<half::bf16, i32>($($arg),*);
    }};
}
#[allow(unused_imports)]
pub(crate) use for_each_dtype;

// ---------------------------------------------------------------------------------------------
// Fixed-state RNG

/// SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit counter passed through a bijective mixer.
/// Small, seedable with any value, and good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// Starts the sequence at `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// Returns the next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Returns a uniform value in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Returns a uniform value in `[lo, hi)`.
    pub fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Returns a uniform integer in `[0, n)`, `n > 0`.
    pub fn below(&mut self, n: usize) -> usize {
        // The modulo bias is below 2^-40 for every n the tests use.
        (self.next_u64() % n as u64) as usize
    }

    /// Returns true with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Returns a standard normal sample (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // in (0, 1], so ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

// ---------------------------------------------------------------------------------------------
// Batches

/// What a random batch looks like.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub pairs: usize,
    pub seq_len: usize,
    pub vocab: usize,
    pub row_stride: usize,
    /// Standard deviation of the real logits.
    pub logit_std: f64,
    /// Probability that a position is masked.
    pub mask_prob: f64,
    /// Label of masked positions.
    pub ignore_index: i64,
    /// Whether the batch has reference log-probs (otherwise it is reference-free).
    pub with_reference: bool,
    /// Padded columns `V..W` hold uniform junk in `[-padded_junk, padded_junk]`.
    pub padded_junk: f64,
}

impl Spec {
    /// Returns a spec with `W = V`, logits of std 2, a quarter of the positions masked with
    /// -100 and reference log-probs present.
    pub fn new(pairs: usize, seq_len: usize, vocab: usize) -> Self {
        Spec {
            pairs,
            seq_len,
            vocab,
            row_stride: vocab,
            logit_std: 2.0,
            mask_prob: 0.25,
            ignore_index: -100,
            with_reference: true,
            padded_junk: 1000.0,
        }
    }

    /// Returns the spec with row stride `row_stride >= V`.
    pub fn stride(mut self, row_stride: usize) -> Self {
        self.row_stride = row_stride;
        self
    }

    /// Returns the spec with masking probability `p`.
    pub fn masked(mut self, p: f64) -> Self {
        self.mask_prob = p;
        self
    }

    pub fn shape(&self) -> BatchShape {
        BatchShape {
            pairs: self.pairs,
            seq_len: self.seq_len,
            vocab: self.vocab,
            row_stride: self.row_stride,
        }
    }
}

/// A batch in f32, before rounding to the tested dtype. Tests edit it to build edge cases.
#[derive(Clone, Debug)]
pub struct RawBatch {
    pub shape: BatchShape,
    pub logits: Vec<f32>,
    pub labels: Vec<i64>,
    pub reference: Option<Vec<f32>>,
}

impl RawBatch {
    /// Draws a batch from `spec`. Reference log-probs are near what the policy gives, so that
    /// margins are of order 1 to 10 and every loss stays away from saturation.
    pub fn random(rng: &mut Rng, spec: &Spec) -> Self {
        let shape = spec.shape();
        let (v, w) = (spec.vocab, spec.row_stride);
        let mut logits = Vec::with_capacity(shape.logits_len());
        let mut labels = Vec::with_capacity(shape.positions());
        for _ in 0..shape.positions() {
            for col in 0..w {
                let x = if col < v {
                    spec.logit_std * rng.normal()
                } else {
                    rng.uniform_in(-spec.padded_junk, spec.padded_junk)
                };
                logits.push(x as f32);
            }
            if rng.chance(spec.mask_prob) {
                labels.push(spec.ignore_index);
            } else {
                labels.push(rng.below(v) as i64);
            }
        }
        let mut batch = RawBatch {
            shape,
            logits,
            labels,
            reference: None,
        };
        if spec.with_reference {
            let per_token = (v as f64).ln() + 0.5 * spec.logit_std * spec.logit_std;
            let reference = (0..shape.sequences())
                .map(|r| {
                    let n = batch.valid_count(r, spec.ignore_index) as f64;
                    (-n * per_token * rng.uniform_in(0.8, 1.2) + rng.normal()) as f32
                })
                .collect();
            batch.reference = Some(reference);
        }
        batch
    }

    /// Returns the flat index of position `t` of sequence `row`.
    pub fn position(&self, row: usize, t: usize) -> usize {
        row * self.shape.seq_len + t
    }

    /// Returns the whole logits row (`W` elements) of position `t` of sequence `row`.
    pub fn row_mut(&mut self, row: usize, t: usize) -> &mut [f32] {
        let w = self.shape.row_stride;
        let start = self.position(row, t) * w;
        &mut self.logits[start..start + w]
    }

    /// Masks every position of sequence `row`.
    pub fn mask_sequence(&mut self, row: usize, ignore_index: i64) {
        for t in 0..self.shape.seq_len {
            let p = self.position(row, t);
            self.labels[p] = ignore_index;
        }
    }

    /// Returns the number of valid positions of sequence `row`.
    pub fn valid_count(&self, row: usize, ignore_index: i64) -> usize {
        (0..self.shape.seq_len)
            .filter(|&t| self.labels[self.position(row, t)] != ignore_index)
            .count()
    }
}

/// A batch rounded to the tested logits dtype `T`; the reference reads these rounded values.
#[derive(Clone, Debug)]
pub struct Inputs<T> {
    pub shape: BatchShape,
    pub logits: Vec<T>,
    pub labels: Vec<i64>,
    pub reference: Option<Vec<f32>>,
}

impl<T: TestFloat> Inputs<T> {
    /// Rounds the logits of `raw` to `T`.
    pub fn round(raw: &RawBatch) -> Self {
        Inputs {
            shape: raw.shape,
            logits: raw.logits.iter().map(|&x| T::round(x)).collect(),
            labels: raw.labels.clone(),
            reference: raw.reference.clone(),
        }
    }

    /// Returns the labels as `L`.
    pub fn labels_as<L: TestLabel>(&self) -> Vec<L> {
        self.labels.iter().map(|&y| L::from_i64(y)).collect()
    }

    /// Returns the rounded logits widened to f64.
    pub fn logits_f64(&self) -> Vec<f64> {
        self.logits.iter().map(|&x| x.widen()).collect()
    }

    /// Returns the reference log-probs widened to f64.
    pub fn reference_f64(&self) -> Option<Vec<f64>> {
        self.reference
            .as_ref()
            .map(|v| v.iter().map(|&x| x as f64).collect())
    }
}

/// Owns the f64 copies a [`RefBatch`] borrows.
pub struct RefData {
    pub shape: BatchShape,
    pub logits: Vec<f64>,
    pub labels: Vec<i64>,
    pub reference: Option<Vec<f64>>,
}

impl RefData {
    pub fn new<T: TestFloat>(inputs: &Inputs<T>) -> Self {
        RefData {
            shape: inputs.shape,
            logits: inputs.logits_f64(),
            labels: inputs.labels.clone(),
            reference: inputs.reference_f64(),
        }
    }

    pub fn batch(&self) -> RefBatch<'_> {
        RefBatch {
            pairs: self.shape.pairs,
            seq_len: self.shape.seq_len,
            vocab: self.shape.vocab,
            row_stride: self.shape.row_stride,
            logits: &self.logits,
            labels: &self.labels,
            reference: self.reference.as_deref(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tolerances

/// Token log-prob (f32 output, every logits dtype): atol 1e-5, rtol 1e-5. The dtype does not
/// matter because the reference reads the rounded inputs and all arithmetic is f32 or wider.
pub const TOKEN_ATOL: f64 = 1e-5;
pub const TOKEN_RTOL: f64 = 1e-5;

/// Loss and d loss / dz computed from given sequence log-probs: atol 1e-6, rtol 1e-5. The
/// error of the sequence log-probs is added on top, propagated through `l'` and `l''`.
pub const LOSS_ATOL: f64 = 1e-6;
pub const LOSS_RTOL: f64 = 1e-5;

/// Absolute tolerance of a logit gradient, relative to its upstream gradient
/// `|grad_loss * g[r]|`: it absorbs the cancellation in `1 - p` on peaked rows.
pub const GRAD_UPSTREAM_ATOL: f64 = 1e-5;

/// Per-output absolute tolerances derived from one reference forward.
///
/// A sequence log-prob is a sum of token log-probs, so its tolerance is the sum of the token
/// tolerances: `1e-5 * (n_valid + sum_t |lp_t|)`. That is the per-sequence rule (rtol 1e-5 of
/// `sum abs(lp)`) plus the token atol once per token. The floor matters on a peaked sequence,
/// whose log-prob is ~1e-13 while the f32 rounding of `ln s` alone is ~1e-7. Everything
/// downstream of the sequence log-probs gets its own rounding tolerance plus the propagated
/// sequence error.
#[derive(Clone, Debug)]
pub struct Tolerances {
    /// Sequence log-probs `[2B]`.
    pub seq_logp: Vec<f64>,
    /// Pair margins z `[B]`.
    pub margin: Vec<f64>,
    /// Pair losses `[B]`.
    pub losses: Vec<f64>,
    /// Mean loss.
    pub loss: f64,
    /// d loss / dz `[B]`.
    pub dloss_dz: Vec<f64>,
    /// Chosen and rejected rewards `[2B]` (chosen first).
    pub rewards: Vec<f64>,
    /// The eight metrics, in TRL's order.
    pub metrics: [f64; 8],
    /// Absolute error allowed in `g[r] = d loss / d lp[r, t]` `[2B]`.
    pub seq_coef: Vec<f64>,
}

impl Tolerances {
    pub fn new(fwd: &RefForward, params: &RefParams) -> Self {
        let b = fwd.losses.len();
        let curvature = reference::curvature_bound(params);
        let beta = params.beta;
        let seq_logp: Vec<f64> = (0..2 * b)
            .map(|r| {
                let n = fwd.valid[r] as f64;
                let norm = if params.length_normalize && n > 0.0 {
                    n
                } else {
                    1.0
                };
                TOKEN_ATOL * n / norm + TOKEN_RTOL * fwd.seq_abs_logp[r]
            })
            .collect();
        let margin: Vec<f64> = (0..b).map(|i| seq_logp[i] + seq_logp[b + i]).collect();

        // l(z + dz) - l(z) <= (|l'(z)| + curvature * dz) * dz, and l' moves by at most
        // curvature * dz, unless z sits on the hinge's kink where l' may take either side.
        let mut losses = Vec::with_capacity(b);
        let mut dloss_dz = Vec::with_capacity(b);
        let mut loss_propagated = 0.0;
        for (i, &dz) in margin.iter().enumerate() {
            let slope = fwd.dloss_dz[i].abs() + curvature * dz;
            losses.push(LOSS_ATOL + LOSS_RTOL * fwd.losses[i].abs() + slope * dz);
            loss_propagated += slope * dz / b as f64;
            let jump = if reference::near_kink(params, fwd.margins[i], dz) {
                beta
            } else {
                0.0
            };
            dloss_dz.push(LOSS_ATOL + LOSS_RTOL * fwd.dloss_dz[i].abs() + curvature * dz + jump);
        }
        let loss = LOSS_ATOL + LOSS_RTOL * fwd.loss.abs() + loss_propagated;

        let rewards: Vec<f64> = (0..2 * b)
            .map(|r| {
                let value = if r < b {
                    fwd.chosen_rewards[r]
                } else {
                    fwd.rejected_rewards[r - b]
                };
                LOSS_ATOL + LOSS_RTOL * value.abs() + beta * seq_logp[r]
            })
            .collect();

        // Accuracy counts strict wins; a pair whose reward margin is within tolerance of 0 may
        // land on either side.
        let ambiguous = (0..b)
            .filter(|&i| {
                let gap = fwd.chosen_rewards[i] - fwd.rejected_rewards[i];
                gap.abs() <= beta * margin[i] + 2.0 * LOSS_ATOL
            })
            .count();
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
        let margin_rewards: Vec<f64> = margin.iter().map(|m| beta * m).collect();
        let rounding = |k: usize| LOSS_ATOL + LOSS_RTOL * fwd.metrics[k].abs();
        let metrics = [
            rounding(0) + mean(&rewards[..b]),
            rounding(1) + mean(&rewards[b..]),
            LOSS_ATOL + ambiguous as f64 / b as f64,
            rounding(3) + mean(&margin_rewards),
            rounding(4) + mean(&seq_logp[..b]),
            rounding(5) + mean(&seq_logp[b..]),
            rounding(6) + TOKEN_RTOL * fwd.logits_abs_mean[0],
            rounding(7) + TOKEN_RTOL * fwd.logits_abs_mean[1],
        ];

        // g[r] = +-l'(z_i) / (B * k[r]), so its error is that of l' over the same divisor.
        let seq_coef: Vec<f64> = (0..2 * b)
            .map(|r| {
                let n = fwd.valid[r] as f64;
                let norm = if params.length_normalize && n > 0.0 {
                    n
                } else {
                    1.0
                };
                dloss_dz[r % b] / (b as f64 * norm)
            })
            .collect();

        Tolerances {
            seq_logp,
            margin,
            losses,
            loss,
            dloss_dz,
            rewards,
            metrics,
            seq_coef,
        }
    }

    /// Returns the absolute tolerance of every logit gradient element of sequence `row`,
    /// stored in a type with smallest subnormal `min_subnormal`.
    pub fn grad_atol(
        &self,
        fwd: &RefForward,
        row: usize,
        grad_loss: f64,
        min_subnormal: f64,
    ) -> f64 {
        let upstream = (grad_loss * fwd.seq_coef[row]).abs();
        // Two units of the smallest subnormal: the rtol rule of two last-bit units, carried
        // into the range where the type's spacing stops shrinking.
        GRAD_UPSTREAM_ATOL * upstream + grad_loss.abs() * self.seq_coef[row] + 2.0 * min_subnormal
    }
}

// ---------------------------------------------------------------------------------------------
// Comparison

/// A tolerance or scale given once for all elements or per element.
pub trait PerElement {
    fn at(&self, i: usize) -> f64;
}

impl PerElement for f64 {
    fn at(&self, _: usize) -> f64 {
        *self
    }
}

impl PerElement for &[f64] {
    fn at(&self, i: usize) -> f64 {
        self[i]
    }
}

impl PerElement for &Vec<f64> {
    fn at(&self, i: usize) -> f64 {
        self[i]
    }
}

/// The largest errors of one comparison.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorStats {
    /// Largest `|got - ref|`.
    pub max_abs_err: f64,
    /// Largest `|got - ref| / tol`; the check passes while it is at most 1.
    pub max_ratio: f64,
}

impl ErrorStats {
    /// Keeps the larger of each field.
    pub fn merge(&mut self, other: ErrorStats) {
        self.max_abs_err = self.max_abs_err.max(other.max_abs_err);
        self.max_ratio = self.max_ratio.max(other.max_ratio);
    }
}

/// Checks `|got - ref| <= atol + rtol * scale` for every element (a NaN in `got` fails).
/// On failure panics with the count of failures, the worst index, got, ref and err/tol.
pub fn assert_close(
    name: &str,
    got: &[f64],
    reference: &[f64],
    atol: impl PerElement,
    rtol: f64,
    scale: impl PerElement,
) -> ErrorStats {
    assert_close_at(name, got, reference, atol, rtol, scale, |i| {
        format!("[{i}]")
    })
}

/// [`assert_close`] with `index_name` formatting an element index for the failure message.
pub fn assert_close_at(
    name: &str,
    got: &[f64],
    reference: &[f64],
    atol: impl PerElement,
    rtol: f64,
    scale: impl PerElement,
    index_name: impl Fn(usize) -> String,
) -> ErrorStats {
    assert_eq!(
        got.len(),
        reference.len(),
        "{name}: got {} elements, reference has {}",
        got.len(),
        reference.len()
    );
    let mut stats = ErrorStats::default();
    let mut failures = 0usize;
    let mut worst: Option<(usize, f64)> = None; // (index, err/tol) of the worst failure
    for (i, (&g, &r)) in got.iter().zip(reference).enumerate() {
        // Equal infinities match (a mean over -inf logits is -inf in both).
        let err = if g == r { 0.0 } else { (g - r).abs() };
        let tol = atol.at(i) + rtol * scale.at(i);
        let ratio = if err == 0.0 {
            0.0
        } else if err.is_nan() {
            f64::INFINITY
        } else {
            err / tol
        };
        // A NaN error compares false, so it fails.
        let passes = err <= tol;
        if !passes {
            failures += 1;
            let is_worse = match worst {
                None => true,
                Some((_, worst_ratio)) => ratio > worst_ratio,
            };
            if is_worse {
                worst = Some((i, ratio));
            }
        }
        if !err.is_nan() {
            stats.max_abs_err = stats.max_abs_err.max(err);
        }
        stats.max_ratio = stats.max_ratio.max(ratio);
    }
    if failures > 0 {
        let (i, ratio) = worst.expect("a failure sets the worst index");
        let err = (got[i] - reference[i]).abs();
        let tol = atol.at(i) + rtol * scale.at(i);
        panic!(
            "{name}: {failures} of {} elements out of tolerance; worst at {}: got {:e}, ref {:e}, \
             |err| {err:.3e}, tol {tol:.3e}, err/tol {ratio:.3}",
            got.len(),
            index_name(i),
            got[i],
            reference[i],
        );
    }
    stats
}

/// Checks that the gradient is exactly 0 (either sign) on masked positions and padded columns.
pub fn assert_zero_outside_valid(
    name: &str,
    grad: &[f64],
    shape: &BatchShape,
    labels: &[i64],
    ignore_index: i64,
) {
    let (t, v, w) = (shape.seq_len, shape.vocab, shape.row_stride);
    let mut failures = 0usize;
    let mut first = None;
    for (p, &y) in labels.iter().enumerate() {
        let start = if y == ignore_index { 0 } else { v };
        for col in start..w {
            let g = grad[p * w + col];
            if g != 0.0 {
                failures += 1;
                first.get_or_insert((p, col, g));
            }
        }
    }
    if let Some((p, col, g)) = first {
        panic!(
            "{name}: {failures} elements on masked positions or padded columns are not 0; \
             first at row {}, position {}, column {col} (V = {v}): {g:e}",
            p / t,
            p % t
        );
    }
}

/// Formats a flat gradient index as row, position and column.
pub fn grad_index(shape: &BatchShape) -> impl Fn(usize) -> String {
    let (t, w) = (shape.seq_len, shape.row_stride);
    move |i| {
        format!(
            "[row {}, position {}, column {}]",
            i / (t * w),
            (i / w) % t,
            i % w
        )
    }
}

/// Widens a slice of f32 outputs.
pub fn widen_f32(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&x| x as f64).collect()
}

// ---------------------------------------------------------------------------------------------
// Full check of one batch

/// The largest errors of each output of one or more [`check_batch`] runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchStats {
    pub loss: ErrorStats,
    pub losses: ErrorStats,
    pub chosen_logps: ErrorStats,
    pub rejected_logps: ErrorStats,
    pub rewards: ErrorStats,
    pub dloss_dmargin: ErrorStats,
    pub metrics: ErrorStats,
    pub grad_f32: ErrorStats,
    pub grad_same_dtype: ErrorStats,
    pub grad_in_place: ErrorStats,
}

impl BatchStats {
    /// Returns `(output name, stats)` pairs in a fixed order.
    pub fn named(&self) -> [(&'static str, ErrorStats); 10] {
        [
            ("loss", self.loss),
            ("losses", self.losses),
            ("chosen_logps", self.chosen_logps),
            ("rejected_logps", self.rejected_logps),
            ("rewards", self.rewards),
            ("dloss_dmargin", self.dloss_dmargin),
            ("metrics", self.metrics),
            ("grad into f32", self.grad_f32),
            ("grad into logits dtype", self.grad_same_dtype),
            ("grad in place", self.grad_in_place),
        ]
    }

    /// Keeps the larger errors of each output.
    pub fn merge(&mut self, other: &BatchStats) {
        self.loss.merge(other.loss);
        self.losses.merge(other.losses);
        self.chosen_logps.merge(other.chosen_logps);
        self.rejected_logps.merge(other.rejected_logps);
        self.rewards.merge(other.rewards);
        self.dloss_dmargin.merge(other.dloss_dmargin);
        self.metrics.merge(other.metrics);
        self.grad_f32.merge(other.grad_f32);
        self.grad_same_dtype.merge(other.grad_same_dtype);
        self.grad_in_place.merge(other.grad_in_place);
    }

    /// Prints one line per output.
    pub fn print(&self, title: &str) {
        println!("{title}");
        for (name, stats) in self.named() {
            println!(
                "  {name:<24} max |err| {:>10.3e}   max err/tol {:>7.4}",
                stats.max_abs_err, stats.max_ratio
            );
        }
    }
}

/// Runs forward and the three backward modes of `backend` on `inputs` with logits dtype `T` and
/// labels `L`, compares every output with the f64 reference, and returns the largest errors.
///
/// Gradient buffers start filled with NaN, so an element the backward does not write fails.
pub fn check_batch<T: TestFloat, L: TestLabel>(
    backend: &TestBackend,
    config: DpoConfig,
    inputs: &Inputs<T>,
    grad_loss: f32,
) -> BatchStats {
    let context = format!("{}/{}/{}", backend.name, T::NAME, L::NAME);
    let shape = inputs.shape;
    let b = shape.pairs;
    let labels = inputs.labels_as::<L>();
    let batch = Batch::new(shape, &inputs.logits, &labels, inputs.reference.as_deref());
    let dpo = backend.open(config);
    let out = dpo
        .forward(&batch)
        .unwrap_or_else(|err| panic!("{context}: forward failed: {err}"));

    let params = RefParams::from_config(&config);
    let data = RefData::new(inputs);
    let ref_batch = data.batch();
    let fwd = reference::forward(&ref_batch, &params);
    let tol = Tolerances::new(&fwd, &params);
    let mut stats = compare_forward(&context, &out, &fwd, &tol);
    assert_eq!(out.state.shape(), shape, "{context}: state shape");

    // Backward in three output modes, all against one reference gradient.
    let grad_ref = reference::gradient(&ref_batch, &params, &fwd, grad_loss as f64);
    let index = grad_index(&shape);
    let grad_tol = |min_subnormal: f64| -> Vec<f64> {
        let per_row: Vec<f64> = (0..2 * b)
            .map(|r| tol.grad_atol(&fwd, r, grad_loss as f64, min_subnormal))
            .collect();
        let per_seq = shape.seq_len * shape.row_stride;
        (0..grad_ref.len()).map(|i| per_row[i / per_seq]).collect()
    };
    let abs_ref: Vec<f64> = grad_ref.iter().map(|g| g.abs()).collect();

    let mut grad32 = vec![f32::NAN; shape.logits_len()];
    dpo.backward(&batch, &out.state, grad_loss, &mut grad32)
        .unwrap_or_else(|err| panic!("{context}: backward into f32 failed: {err}"));
    let got = widen_f32(&grad32);
    let name = format!("{context} grad into f32");
    stats.grad_f32 = assert_close_at(
        &name,
        &got,
        &grad_ref,
        &grad_tol(f32::MIN_SUBNORMAL),
        f32::GRAD_RTOL,
        &abs_ref,
        &index,
    );
    assert_zero_outside_valid(&name, &got, &shape, &inputs.labels, config.ignore_index);

    let mut grad_t = vec![T::round(f32::NAN); shape.logits_len()];
    dpo.backward(&batch, &out.state, grad_loss, &mut grad_t)
        .unwrap_or_else(|err| panic!("{context}: backward into {} failed: {err}", T::NAME));
    let got: Vec<f64> = grad_t.iter().map(|&g| g.widen()).collect();
    let name = format!("{context} grad into {}", T::NAME);
    let dtype_tol = grad_tol(T::MIN_SUBNORMAL);
    stats.grad_same_dtype = assert_close_at(
        &name,
        &got,
        &grad_ref,
        &dtype_tol,
        T::GRAD_RTOL,
        &abs_ref,
        &index,
    );
    assert_zero_outside_valid(&name, &got, &shape, &inputs.labels, config.ignore_index);

    let mut in_place = inputs.logits.clone();
    dpo.backward_in_place(shape, &mut in_place, &labels, &out.state, grad_loss)
        .unwrap_or_else(|err| panic!("{context}: backward_in_place failed: {err}"));
    let got: Vec<f64> = in_place.iter().map(|&g| g.widen()).collect();
    let name = format!("{context} grad in place");
    stats.grad_in_place = assert_close_at(
        &name,
        &got,
        &grad_ref,
        &dtype_tol,
        T::GRAD_RTOL,
        &abs_ref,
        &index,
    );
    assert_zero_outside_valid(&name, &got, &shape, &inputs.labels, config.ignore_index);
    stats
}

/// Compares the forward outputs with the reference.
pub fn compare_forward(
    context: &str,
    out: &DpoOutput,
    fwd: &RefForward,
    tol: &Tolerances,
) -> BatchStats {
    let b = fwd.losses.len();
    let named = |output: &str| format!("{context} {output}");
    assert_eq!(out.losses.len(), b, "{context}: losses length");
    assert_eq!(out.chosen_logps.len(), b, "{context}: chosen_logps length");
    assert_eq!(
        out.rejected_logps.len(),
        b,
        "{context}: rejected_logps length"
    );
    assert_eq!(
        out.chosen_rewards.len(),
        b,
        "{context}: chosen_rewards length"
    );
    assert_eq!(
        out.rejected_rewards.len(),
        b,
        "{context}: rejected_rewards length"
    );
    assert_eq!(
        out.dloss_dmargin.len(),
        b,
        "{context}: dloss_dmargin length"
    );

    // A sequence with no valid position sums nothing: its log-prob is exactly 0.
    for (r, &n) in fwd.valid.iter().enumerate() {
        if n == 0 {
            let got = if r < b {
                out.chosen_logps[r]
            } else {
                out.rejected_logps[r - b]
            };
            assert_eq!(got, 0.0, "{context}: sequence {r} has no valid position");
        }
    }

    let loss = assert_close(
        &named("loss"),
        &[out.loss as f64],
        &[fwd.loss],
        tol.loss,
        0.0,
        0.0,
    );
    let losses = assert_close(
        &named("losses"),
        &widen_f32(&out.losses),
        &fwd.losses,
        &tol.losses,
        0.0,
        0.0,
    );
    let chosen_logps = assert_close(
        &named("chosen_logps"),
        &widen_f32(&out.chosen_logps),
        &fwd.seq_logp[..b],
        &tol.seq_logp[..b],
        0.0,
        0.0,
    );
    let rejected_logps = assert_close(
        &named("rejected_logps"),
        &widen_f32(&out.rejected_logps),
        &fwd.seq_logp[b..],
        &tol.seq_logp[b..],
        0.0,
        0.0,
    );
    let got_rewards: Vec<f64> = out
        .chosen_rewards
        .iter()
        .chain(&out.rejected_rewards)
        .map(|&x| x as f64)
        .collect();
    let ref_rewards: Vec<f64> = fwd
        .chosen_rewards
        .iter()
        .chain(&fwd.rejected_rewards)
        .copied()
        .collect();
    let rewards = assert_close(
        &named("rewards (chosen, then rejected)"),
        &got_rewards,
        &ref_rewards,
        &tol.rewards,
        0.0,
        0.0,
    );
    let dloss_dmargin = assert_close(
        &named("dloss_dmargin"),
        &widen_f32(&out.dloss_dmargin),
        &fwd.dloss_dz,
        &tol.dloss_dz,
        0.0,
        0.0,
    );
    let metric_names = out.metrics.named();
    let got_metrics: Vec<f64> = metric_names
        .iter()
        .map(|&(_, value)| value as f64)
        .collect();
    let metrics = assert_close_at(
        &named("metrics"),
        &got_metrics,
        &fwd.metrics,
        &tol.metrics[..],
        0.0,
        0.0,
        |i| metric_names[i].0.to_string(),
    );
    BatchStats {
        loss,
        losses,
        chosen_logps,
        rejected_logps,
        rewards,
        dloss_dmargin,
        metrics,
        ..BatchStats::default()
    }
}

/// Rounds `raw` to `T` and runs [`check_batch`] on every backend, with `grad_loss = 1`.
pub fn check_all_backends<T: TestFloat, L: TestLabel>(
    raw: &RawBatch,
    config: DpoConfig,
) -> BatchStats {
    check_all_backends_scaled::<T, L>(raw, config, 1.0)
}

/// Rounds `raw` to `T` and runs [`check_batch`] on every backend with upstream gradient
/// `grad_loss`.
pub fn check_all_backends_scaled<T: TestFloat, L: TestLabel>(
    raw: &RawBatch,
    config: DpoConfig,
    grad_loss: f32,
) -> BatchStats {
    let inputs = Inputs::<T>::round(raw);
    let mut stats = BatchStats::default();
    for backend in backends() {
        stats.merge(&check_batch::<T, L>(backend, config, &inputs, grad_loss));
    }
    stats
}

/// Returns a config with the given loss and length normalisation, beta 0.1, ignore_index -100.
pub fn config_with(loss: LossKind, length_normalize: bool) -> DpoConfig {
    let mut config = DpoConfig::new(0.1);
    config.loss = loss;
    config.length_normalize = length_normalize;
    config
}

/// Returns every loss family member, with label smoothing at 0, inside and at the edge of its
/// range.
pub fn loss_kinds() -> [LossKind; 7] {
    [
        LossKind::Sigmoid {
            label_smoothing: 0.0,
        },
        LossKind::Sigmoid {
            label_smoothing: 0.1,
        },
        LossKind::Sigmoid {
            label_smoothing: 0.5,
        },
        LossKind::Robust {
            label_smoothing: 0.0,
        },
        LossKind::Robust {
            label_smoothing: 0.2,
        },
        LossKind::Ipo,
        LossKind::Hinge,
    ]
}
