"""The kernel's modes: plain ints shared by the host (``fastrev.tables``, ``fastrev.ops``) and the device code.

Kept free of torch and Triton imports so that ``fastrev.tables`` can use them without importing Triton. Inside the
kernel they are read as ``modes.CLIP_RANGE`` etc. (a module attribute is a compile-time constant to Triton).
"""

# x̂₀ post-processing (constexpr CLIP_MODE)
CLIP_NONE = 0          # x̂₀ as computed
CLIP_RANGE = 1         # clamp to ±CLIP (the table's column)
CLIP_THRESHOLD = 2     # dynamic thresholding: clamp to ±s_b, divide by s_b (s from a per-sample pre-pass)

# σ of the step (constexpr VAR_MODE), see fastrev.tables
VAR_FIXED = 0          # σ = SIGMA
VAR_LOG = 1            # σ = SIGMA·exp(½·v): the model's extra channels are log σ²
VAR_RANGE = 2          # σ = SIGMA·exp(½·(f·LOG_HI + (1−f)·LOG_LO)), f = (v+1)/2
VAR_LINEAR = 3         # σ = SIGMA·√v: the extra channels are σ²

# where z comes from (constexpr NOISE_MODE)
NOISE_NONE = 0         # deterministic step (no σ·z term at all)
NOISE_TENSOR = 1       # the caller's noise tensor
NOISE_PHILOX = 2       # fastrev.noise's counter stream, generated in the kernel
