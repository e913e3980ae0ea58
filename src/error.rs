//! The crate's one error type.

/// Every failure the crate reports. Input errors carry the tensor, the value and what was
/// expected, so a message alone is enough to fix the call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The batch has no pairs.
    #[error(
        "empty batch: {tensor} has shape {shape:?}; a DPO batch needs at least one \
         chosen/rejected pair (2 rows)"
    )]
    EmptyBatch {
        /// Tensor whose leading dimension is 0.
        tensor: &'static str,
        /// Its shape.
        shape: Vec<usize>,
    },

    /// The row count is odd, so rows cannot split into chosen and rejected halves.
    #[error(
        "{tensor} has {rows} rows, an odd number; rows 0..B must be the chosen and rows B..2B \
         the rejected responses of the same B pairs"
    )]
    OddRowCount {
        /// Tensor with the odd leading dimension.
        tensor: &'static str,
        /// Its row count.
        rows: usize,
    },

    /// A tensor's shape or length does not match the batch.
    #[error("invalid shape: {tensor} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        tensor: &'static str,
        /// Shape (or `[len]` for flat buffers) that was passed.
        got: Vec<usize>,
        /// Shape that the batch requires.
        expected: Vec<usize>,
    },

    /// The element count 2B * T * W of the logits does not fit in `usize`.
    #[error(
        "invalid shape: policy_logits [2B, T, W] with B = {pairs}, T = {seq_len}, W = \
         {row_stride} has more than usize::MAX elements, so no buffer can hold it; check the dims"
    )]
    ShapeOverflow {
        /// Number of pairs B.
        pairs: usize,
        /// Positions per sequence T.
        seq_len: usize,
        /// Row stride W.
        row_stride: usize,
    },

    /// The vocabulary size is 0 or larger than the row stride.
    #[error(
        "invalid vocabulary size {vocab}: it must be in [1, {row_stride}] (the row stride of \
         policy_logits); pass the model's true vocabulary size"
    )]
    InvalidVocab {
        /// Requested vocabulary size V.
        vocab: usize,
        /// Row stride W of the logits.
        row_stride: usize,
    },

    /// A label at a valid position is outside `[0, V)`.
    #[error(
        "invalid label: row {row}, position {position} has label {label}, which is not in \
         [0, {vocab}) and is not ignore_index {ignore_index}"
    )]
    InvalidLabel {
        /// Row (sequence) index in `0..2B`.
        row: usize,
        /// Position in `0..T`.
        position: usize,
        /// The label.
        label: i64,
        /// Vocabulary size V.
        vocab: usize,
        /// The ignore_index in force.
        ignore_index: i64,
    },

    /// A valid position's logits hold NaN or +inf, or are all -inf.
    #[error(
        "non-finite logit: row {row}, position {position} of policy_logits {detail}; \
         log-softmax is undefined there (mask the position with ignore_index or fix the model \
         output)"
    )]
    NonFiniteLogit {
        /// Row (sequence) index in `0..2B`.
        row: usize,
        /// Position in `0..T`.
        position: usize,
        /// Description of the fault.
        detail: String,
    },

    /// A reference log-prob is NaN or infinite.
    #[error("non-finite reference_logps[{index}] = {value}; reference log-probs must be finite")]
    NonFiniteReference {
        /// Index in `0..2B`.
        index: usize,
        /// The value.
        value: f32,
    },

    /// A forward output or a backward row scale is NaN or beyond the f32 range although every
    /// input passed its checks. The causes are log-probs of -inf (target logits of -inf), an
    /// extreme beta, grad_loss or reference_logps.
    #[error("non-finite output: {output} = {value:e}: {detail}")]
    NonFiniteOutput {
        /// Output name, with the pair index for per-pair outputs (`losses[3]`).
        output: String,
        /// The value in f64, before rounding to f32.
        value: f64,
        /// The cause and the fix.
        detail: String,
    },

    /// A scalar parameter is out of its range.
    #[error("invalid {name} = {value}: expected {expected}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// The value passed.
        value: f64,
        /// The accepted range, in words.
        expected: &'static str,
    },

    /// A tensor has a dtype the crate does not accept there.
    #[error("invalid dtype: {tensor} is {got}, expected {expected}")]
    DTypeMismatch {
        /// Tensor name.
        tensor: String,
        /// Dtype found.
        got: String,
        /// Accepted dtypes.
        expected: &'static str,
    },

    /// A backward call does not match the forward whose state it was given.
    #[error("backward does not match its forward: {detail}")]
    StateMismatch {
        /// What differs.
        detail: String,
    },

    /// A batch file is missing a tensor, or its metadata is invalid.
    #[error("invalid batch file {path}: {detail}")]
    BatchFile {
        /// File path.
        path: String,
        /// The problem and its fix.
        detail: String,
    },

    /// An output path cannot be written: its directory is missing, it is a directory, or it
    /// is the input file.
    #[error("invalid output path {path}: {detail}")]
    InvalidOutputPath {
        /// The path.
        path: String,
        /// The problem and the fix.
        detail: String,
    },

    /// Reading or writing a file failed.
    #[error("cannot access {path}: {source}")]
    Io {
        /// File path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// safetensors could not parse or write a file.
    #[error("safetensors error in {path}: {source}")]
    SafeTensors {
        /// File path.
        path: String,
        /// The parser's error.
        #[source]
        source: safetensors::SafeTensorError,
    },

    /// No usable CUDA device: no driver library, no NVRTC library, or no GPU.
    #[error("no CUDA device: {reason}")]
    NoDevice {
        /// Why, with what to install or set.
        reason: String,
    },

    /// NVRTC or the CUDA headers are missing, for a command that compiles kernels without a
    /// device.
    #[error("cannot compile the kernels: {reason}")]
    NvrtcUnavailable {
        /// The missing library or header, with what to install or set.
        reason: String,
    },

    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),

    /// The CPU emulator of the CUDA kernels (feature `emulator`) rejected a launch or caught a
    /// fault in a kernel: a deadlock, a warp-operation misuse, a write outside a buffer.
    #[cfg(feature = "emulator")]
    #[error("emulated kernel {kernel} failed: {detail}")]
    Emulator {
        /// Kernel entry and source file, `name (file.cu)`; empty for allocation failures.
        kernel: String,
        /// The failure, with the block and threads involved.
        detail: String,
    },

    /// NVRTC failed to compile a kernel source.
    #[error("NVRTC failed to compile {module}: {log}")]
    Compile {
        /// Kernel source file name.
        module: &'static str,
        /// The compiler's program log.
        log: String,
    },
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
