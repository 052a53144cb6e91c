//! Cheap randomness for spreading reconnects; not for anything secret.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// A number in `[0, 1)`, different on every call.
///
/// Each `RandomState` gets fresh keys (random per thread, then incremented), so hashing nothing
/// with it yields a new pseudo-random value without a dependency on a random-number crate.
pub(crate) fn unit() -> f64 {
    let bits = RandomState::new().build_hasher().finish() >> 11;
    bits as f64 / (1u64 << 53) as f64
}

/// `base` shortened by up to `fraction` of itself, at random: `fraction` 0.2 gives 80-100 %.
pub(crate) fn shorten(base: Duration, fraction: f64) -> Duration {
    base.mul_f64(1.0 - fraction.clamp(0.0, 1.0) * unit())
}

/// `base` plus up to `spread`, at random.
pub(crate) fn extend(base: Duration, spread: Duration) -> Duration {
    base + spread.mul_f64(unit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_spread_over_the_range() {
        let draws: Vec<f64> = (0..1000).map(|_| unit()).collect();
        assert!(draws.iter().all(|x| (0.0..1.0).contains(x)));
        let low = draws.iter().filter(|x| **x < 0.5).count();
        assert!((350..650).contains(&low), "{low} of 1000 below 0.5");
        let distinct: std::collections::HashSet<u64> = draws.iter().map(|x| x.to_bits()).collect();
        assert!(distinct.len() > 990);
    }

    #[test]
    fn shorten_and_extend_stay_in_range() {
        let base = Duration::from_secs(600);
        for _ in 0..100 {
            let d = shorten(base, 0.2);
            assert!(d > Duration::from_secs(480) && d <= base, "{d:?}");
            let e = extend(base, Duration::from_secs(60));
            assert!(e >= base && e < Duration::from_secs(660), "{e:?}");
        }
        assert_eq!(shorten(base, 0.0), base);
    }
}
