//! Kernel argument structs mirroring `kernels/common.cuh`, the status and layout codes the
//! kernels write, and the launch sizes of each kernel as pure functions of the shape, so the
//! driver and the emulator launch exactly the same grids.

use bytemuck::{Pod, Zeroable};
use cudarc::driver::DeviceRepr;

use super::runtime::{KernelParams, LaunchDims};
use crate::dtype::DType;

/// Rows of at most this many columns get one warp each; longer rows get a whole block.
pub(crate) const WARP_ROW_MAX_VOCAB: usize = 1024;
/// Threads per block of the token kernels for rows up to `LARGE_ROW_VOCAB` columns.
pub(crate) const ROW_BLOCK_THREADS: u32 = 256;
/// Rows longer than this get `LARGE_ROW_BLOCK_THREADS` threads.
pub(crate) const LARGE_ROW_VOCAB: usize = 16384;
/// Threads per block for rows longer than `LARGE_ROW_VOCAB`.
pub(crate) const LARGE_ROW_BLOCK_THREADS: u32 = 512;
/// Threads of the single block of `dpo_pairs_fwd`.
pub(crate) const PAIR_BLOCK_THREADS: u32 = 512;
/// Largest grid.x the token kernels use; they loop over the remaining rows.
pub(crate) const MAX_GRID_BLOCKS: usize = i32::MAX as usize;

/// `TOKEN_STATUS_*` of `kernels/common.cuh`. The host only decodes faults, so the masked and
/// valid codes exist for the header consistency test.
#[cfg(test)]
pub(crate) const TOKEN_STATUS_MASKED: i64 = 0;
#[cfg(test)]
pub(crate) const TOKEN_STATUS_VALID: i64 = 1;
pub(crate) const TOKEN_STATUS_NAN: i64 = 2;
pub(crate) const TOKEN_STATUS_POS_INF: i64 = 3;
pub(crate) const TOKEN_STATUS_ALL_NEG_INF: i64 = 4;
pub(crate) const TOKEN_STATUS_BAD_LABEL: i64 = 5;

/// `PAIR_OUT_*` offsets of `kernels/common.cuh`, in units of B floats.
pub(crate) const PAIR_OUT_LOSSES: usize = 0;
pub(crate) const PAIR_OUT_DLOSS_DMARGIN: usize = 1;
pub(crate) const PAIR_OUT_CHOSEN_REWARDS: usize = 2;
pub(crate) const PAIR_OUT_REJECTED_REWARDS: usize = 3;
pub(crate) const PAIR_OUT_SEQ_LOGPS: usize = 4;
pub(crate) const PAIR_OUT_METRICS: usize = 6;

/// `METRIC_*` slots of `kernels/common.cuh`.
pub(crate) const METRIC_LOSS: usize = 0;
pub(crate) const METRIC_REWARDS_CHOSEN: usize = 1;
pub(crate) const METRIC_REWARDS_REJECTED: usize = 2;
pub(crate) const METRIC_REWARDS_ACCURACY: usize = 3;
pub(crate) const METRIC_REWARDS_MARGIN: usize = 4;
pub(crate) const METRIC_LOGPS_CHOSEN: usize = 5;
pub(crate) const METRIC_LOGPS_REJECTED: usize = 6;
pub(crate) const METRIC_LOGITS_CHOSEN: usize = 7;
pub(crate) const METRIC_LOGITS_REJECTED: usize = 8;
pub(crate) const METRIC_COUNT: usize = 9;

/// `FAULT_REPORT_*` slots of `kernels/common.cuh`.
pub(crate) const FAULT_REPORT_POSITION: usize = 0;
pub(crate) const FAULT_REPORT_STATUS: usize = 1;
pub(crate) const FAULT_REPORT_INFO: usize = 2;
pub(crate) const FAULT_REPORT_LEN: usize = 3;

/// Returns the length of `pair_out` for `pairs` pairs: six per-pair floats and the metrics.
pub(crate) fn pair_out_len(pairs: usize) -> usize {
    PAIR_OUT_METRICS * pairs + METRIC_COUNT
}

/// `TokenLogpsFwdParams` of `kernels/common.cuh`; pointers are device addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct TokenLogpsFwdParams {
    pub logits: u64,
    pub labels: u64,
    pub row_max: u64,
    pub row_log_sum: u64,
    pub target_logp: u64,
    pub logit_sum: u64,
    pub fault_info: u64,
    pub status: u64,
    pub ignore_index: i64,
    pub positions: i64,
    pub vocab: i64,
    pub row_stride: i64,
    pub warp_per_row: i32,
    pub reserved: i32,
}

/// `DpoPairsParams` of `kernels/common.cuh`; pointers are device addresses (0 for null).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct DpoPairsParams {
    pub target_logp: u64,
    pub logit_sum: u64,
    pub status: u64,
    pub fault_info: u64,
    pub reference_logps: u64,
    pub seq_coef: u64,
    pub seq_valid: u64,
    pub pair_out: u64,
    pub fault_report: u64,
    pub pairs: i64,
    pub seq_len: i64,
    pub vocab: i64,
    pub beta: f32,
    pub label_smoothing: f32,
    pub loss_kind: i32,
    pub length_normalize: i32,
}

/// `TokenLogpsBwdParams` of `kernels/common.cuh`; pointers are device addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct TokenLogpsBwdParams {
    pub logits: u64,
    pub labels: u64,
    pub row_max: u64,
    pub row_log_sum: u64,
    pub seq_coef: u64,
    pub grad: u64,
    pub ignore_index: i64,
    pub positions: i64,
    pub seq_len: i64,
    pub vocab: i64,
    pub row_stride: i64,
    pub grad_loss: f32,
    pub warp_per_row: i32,
}

// The C structs put 8-byte fields first and end on an 8-byte boundary. These sizes are the
// sums of the field sizes, so neither compiler inserts padding.
const _: () = assert!(std::mem::size_of::<TokenLogpsFwdParams>() == 12 * 8 + 2 * 4);
const _: () = assert!(std::mem::size_of::<DpoPairsParams>() == 12 * 8 + 4 * 4);
const _: () = assert!(std::mem::size_of::<TokenLogpsBwdParams>() == 11 * 8 + 2 * 4);

// SAFETY: plain-old-data with the field order, types and size of the C structs above.
unsafe impl DeviceRepr for TokenLogpsFwdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for DpoPairsParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for TokenLogpsBwdParams {}
// SAFETY: `#[repr(C)]` copies of the structs of the same name in common.cuh, every pointer a
// u64 device address.
unsafe impl KernelParams for TokenLogpsFwdParams {}
// SAFETY: as above.
unsafe impl KernelParams for DpoPairsParams {}
// SAFETY: as above.
unsafe impl KernelParams for TokenLogpsBwdParams {}

/// Split of the token kernels' rows over the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowSplit {
    /// Grid and block sizes.
    pub dims: LaunchDims,
    /// One warp per row (true) or one block per row (false).
    pub warp_per_row: bool,
}

/// Returns the launch of `token_logps_fwd` and `token_logps_bwd` over `positions` rows of
/// `vocab` real columns. An empty batch still gets one block, which finds no row to visit.
pub(crate) fn token_logps_split(positions: usize, vocab: usize) -> RowSplit {
    let (warp_per_row, threads) = if vocab <= WARP_ROW_MAX_VOCAB {
        (true, ROW_BLOCK_THREADS)
    } else if vocab <= LARGE_ROW_VOCAB {
        (false, ROW_BLOCK_THREADS)
    } else {
        (false, LARGE_ROW_BLOCK_THREADS)
    };
    let rows_per_block = if warp_per_row {
        (threads / 32) as usize
    } else {
        1
    };
    let blocks = positions.div_ceil(rows_per_block).clamp(1, MAX_GRID_BLOCKS);
    RowSplit {
        dims: LaunchDims {
            grid: (blocks as u32, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        },
        warp_per_row,
    }
}

/// Returns the launch of `dpo_pairs_fwd`: one block, whatever the batch.
pub(crate) fn dpo_pairs_dims() -> LaunchDims {
    LaunchDims {
        grid: (1, 1, 1),
        block: (PAIR_BLOCK_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// Returns the forward entry name, e.g. `token_logps_fwd_bf16_i64`.
pub(crate) fn token_logps_fwd_entry(logits: DType, label: &str) -> String {
    format!("token_logps_fwd_{}_{label}", logits.kernel_suffix())
}

/// Returns the backward entry name, e.g. `token_logps_bwd_bf16_i64_f32`.
pub(crate) fn token_logps_bwd_entry(logits: DType, label: &str, grad: DType) -> String {
    format!(
        "token_logps_bwd_{}_{label}_{}",
        logits.kernel_suffix(),
        grad.kernel_suffix()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_structs_have_c_sizes() {
        assert_eq!(std::mem::size_of::<TokenLogpsFwdParams>(), 104);
        assert_eq!(std::mem::size_of::<DpoPairsParams>(), 112);
        assert_eq!(std::mem::size_of::<TokenLogpsBwdParams>(), 96);
        assert_eq!(std::mem::align_of::<TokenLogpsFwdParams>(), 8);
    }

    #[test]
    fn small_vocab_gets_warp_per_row() {
        let split = token_logps_split(1000, 123);
        assert!(split.warp_per_row);
        assert_eq!(split.dims.block, (256, 1, 1));
        // 8 rows per block: ceil(1000 / 8).
        assert_eq!(split.dims.grid, (125, 1, 1));
        assert_eq!(split.dims.shared_bytes, 0);
    }

    #[test]
    fn vocab_boundaries_pick_block_size() {
        assert!(token_logps_split(4, WARP_ROW_MAX_VOCAB).warp_per_row);
        let mid = token_logps_split(4, WARP_ROW_MAX_VOCAB + 1);
        assert!(!mid.warp_per_row);
        assert_eq!(mid.dims.block.0, ROW_BLOCK_THREADS);
        assert_eq!(mid.dims.grid.0, 4);
        assert_eq!(token_logps_split(4, LARGE_ROW_VOCAB).dims.block.0, 256);
        let large = token_logps_split(8192, 128_256);
        assert_eq!(large.dims.block.0, LARGE_ROW_BLOCK_THREADS);
        assert_eq!(large.dims.grid.0, 8192);
    }

    #[test]
    fn empty_and_huge_batches_keep_a_valid_grid() {
        assert_eq!(token_logps_split(0, 50).dims.grid.0, 1);
        assert_eq!(token_logps_split(0, 50_000).dims.grid.0, 1);
        let huge = token_logps_split(usize::MAX / 2, 50_000);
        assert_eq!(huge.dims.grid.0 as usize, MAX_GRID_BLOCKS);
    }

    #[test]
    fn block_sizes_fit_the_reductions() {
        // block_reduce needs whole warps and at most 32 of them.
        for threads in [
            ROW_BLOCK_THREADS,
            LARGE_ROW_BLOCK_THREADS,
            dpo_pairs_dims().block.0,
        ] {
            assert_eq!(threads % 32, 0);
            assert!(threads <= 1024);
        }
        assert_eq!(dpo_pairs_dims().grid, (1, 1, 1));
    }

    /// Returns the value of `#define NAME VALUE` in common.cuh.
    fn header_define(name: &str) -> i64 {
        let header = crate::cuda::source::COMMON;
        let line = header
            .lines()
            .find(|line| line.split_whitespace().take(2).eq(["#define", name]))
            .unwrap_or_else(|| panic!("common.cuh has no #define {name}"));
        let value = line.split_whitespace().nth(2).unwrap();
        value
            .parse()
            .unwrap_or_else(|_| panic!("#define {name} {value} is not an integer"))
    }

    #[test]
    fn codes_match_the_header() {
        let codes: [(&str, i64); 26] = [
            ("TOKEN_STATUS_MASKED", TOKEN_STATUS_MASKED),
            ("TOKEN_STATUS_VALID", TOKEN_STATUS_VALID),
            ("TOKEN_STATUS_NAN", TOKEN_STATUS_NAN),
            ("TOKEN_STATUS_POS_INF", TOKEN_STATUS_POS_INF),
            ("TOKEN_STATUS_ALL_NEG_INF", TOKEN_STATUS_ALL_NEG_INF),
            ("TOKEN_STATUS_BAD_LABEL", TOKEN_STATUS_BAD_LABEL),
            ("PAIR_OUT_LOSSES", PAIR_OUT_LOSSES as i64),
            ("PAIR_OUT_DLOSS_DMARGIN", PAIR_OUT_DLOSS_DMARGIN as i64),
            ("PAIR_OUT_CHOSEN_REWARDS", PAIR_OUT_CHOSEN_REWARDS as i64),
            (
                "PAIR_OUT_REJECTED_REWARDS",
                PAIR_OUT_REJECTED_REWARDS as i64,
            ),
            ("PAIR_OUT_SEQ_LOGPS", PAIR_OUT_SEQ_LOGPS as i64),
            ("PAIR_OUT_METRICS", PAIR_OUT_METRICS as i64),
            ("METRIC_LOSS", METRIC_LOSS as i64),
            ("METRIC_REWARDS_CHOSEN", METRIC_REWARDS_CHOSEN as i64),
            ("METRIC_REWARDS_REJECTED", METRIC_REWARDS_REJECTED as i64),
            ("METRIC_REWARDS_ACCURACY", METRIC_REWARDS_ACCURACY as i64),
            ("METRIC_REWARDS_MARGIN", METRIC_REWARDS_MARGIN as i64),
            ("METRIC_LOGPS_CHOSEN", METRIC_LOGPS_CHOSEN as i64),
            ("METRIC_LOGPS_REJECTED", METRIC_LOGPS_REJECTED as i64),
            ("METRIC_LOGITS_CHOSEN", METRIC_LOGITS_CHOSEN as i64),
            ("METRIC_LOGITS_REJECTED", METRIC_LOGITS_REJECTED as i64),
            ("METRIC_COUNT", METRIC_COUNT as i64),
            ("FAULT_REPORT_POSITION", FAULT_REPORT_POSITION as i64),
            ("FAULT_REPORT_STATUS", FAULT_REPORT_STATUS as i64),
            ("FAULT_REPORT_INFO", FAULT_REPORT_INFO as i64),
            ("FAULT_REPORT_LEN", FAULT_REPORT_LEN as i64),
        ];
        for (name, value) in codes {
            assert_eq!(header_define(name), value, "{name}");
        }
    }

    #[test]
    fn loss_codes_match_the_header() {
        use crate::config::LossKind;
        let kinds = [
            (
                "DPO_LOSS_SIGMOID",
                LossKind::Sigmoid {
                    label_smoothing: 0.0,
                },
            ),
            (
                "DPO_LOSS_ROBUST",
                LossKind::Robust {
                    label_smoothing: 0.1,
                },
            ),
            ("DPO_LOSS_IPO", LossKind::Ipo),
            ("DPO_LOSS_HINGE", LossKind::Hinge),
        ];
        for (name, kind) in kinds {
            assert_eq!(header_define(name), i64::from(kind.kernel_code()), "{name}");
        }
    }

    #[test]
    fn entry_names_follow_the_kernel_list() {
        assert_eq!(
            token_logps_fwd_entry(DType::BF16, "i64"),
            "token_logps_fwd_bf16_i64"
        );
        assert_eq!(
            token_logps_bwd_entry(DType::F16, "i32", DType::F32),
            "token_logps_bwd_f16_i32_f32"
        );
        assert_eq!(pair_out_len(3), 27);
    }
}
