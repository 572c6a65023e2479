//! Shared helpers of the lmig demos and benchmark.
