//! The CPU thread count, decided once per process.
//!
//! candle's CPU matmul asks `candle_core::utils::get_num_threads()` on every
//! call. Unless `RAYON_NUM_THREADS` is set, that counts the physical cores
//! by reading and parsing `/proc/cpuinfo` (`num_cpus::get_physical`), each
//! time: in token-by-token decoding, with a few small matmuls per layer and
//! token, this was measured here as about a sixth of the time of
//! `quiver generate --quantize q4_1` (48 -> 58 tokens/s once the count was
//! fixed). [`fix_thread_count`] computes the count once and stores it in
//! `RAYON_NUM_THREADS`, where every later call finds it.

/// Sets `RAYON_NUM_THREADS` to candle's own default thread count when the
/// user has not set it, and returns the count in effect. Call it first
/// thing in `main`, before any thread is started (it changes the process
/// environment).
pub fn fix_thread_count() -> usize {
    let n = candle_core::utils::get_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    n
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_count_is_kept_in_the_environment() {
        let n = super::fix_thread_count();
        assert!(n >= 1);
        let kept: usize = std::env::var("RAYON_NUM_THREADS")
            .expect("set")
            .parse()
            .expect("a number");
        assert_eq!(kept, candle_core::utils::get_num_threads());
    }
}
