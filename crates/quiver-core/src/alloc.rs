//! Allocator tuning for binaries that use mimalloc as their global
//! allocator (the `quiver` binary and the benchmarks do).
//!
//! A training step allocates and frees many large tensors (activations,
//! logits, gradients). By default mimalloc hands freed memory back to the
//! OS after a short delay, so the next step faults every page in again and
//! the kernel zeroes it: measured here as about a third of a CPU LoRA
//! training step (`clear_page_erms` under `do_huge_pmd_anonymous_page` in
//! `perf`), and about 1.8x on the step time. Keeping freed memory makes the
//! resident size stay at its peak instead of shrinking between steps,
//! which is what a long-running training or evaluation process wants.

/// mimalloc v3's `mi_option_purge_delay` (see `mimalloc.h`: "memory purging
/// is delayed by N milli seconds; ... -1 for no purging at all").
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the OS. Harmless when
/// mimalloc is linked but not the global allocator. Returns whether the
/// setting took (mimalloc 3.x only: option numbers differ in 2.x).
pub fn keep_freed_memory() -> bool {
    // SAFETY: plain FFI calls into mimalloc's option table with a valid
    // option number for the version checked first.
    unsafe {
        if libmimalloc_sys::mi_version() < 300 {
            return false;
        }
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == -1
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn purge_delay_is_set() {
        assert!(super::keep_freed_memory());
    }
}
