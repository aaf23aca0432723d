//! Greedy generation (in progress).
