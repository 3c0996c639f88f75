//! Allocation.
