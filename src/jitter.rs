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

/// `spread` times a random factor in `[0, 1)`, never more than `spread`.
fn draw(spread: Duration) -> Duration {
    Duration::try_from_secs_f64(spread.as_secs_f64() * unit())
        .unwrap_or(spread)
        .min(spread)
}

/// `base` less up to `spread`, at random, never below zero: any `base` and `spread` are
/// accepted, nothing overflows.
pub(crate) fn shorten(base: Duration, spread: Duration) -> Duration {
    base.saturating_sub(draw(spread))
}

/// `base` plus up to `spread`, at random, saturating at `Duration::MAX`.
pub(crate) fn extend(base: Duration, spread: Duration) -> Duration {
    base.saturating_add(draw(spread))
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
            let d = shorten(base, Duration::from_secs(120));
            assert!(d > Duration::from_secs(480) && d <= base, "{d:?}");
            let e = extend(base, Duration::from_secs(60));
            assert!(e >= base && e < Duration::from_secs(660), "{e:?}");
        }
        assert_eq!(shorten(base, Duration::ZERO), base);
    }

    #[test]
    fn extreme_values_neither_panic_nor_leave_the_range() {
        for spread in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
            for base in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
                assert!(shorten(base, spread) <= base, "{base:?} {spread:?}");
                assert!(extend(base, spread) >= base, "{base:?} {spread:?}");
            }
        }
        for _ in 0..100 {
            assert_eq!(extend(Duration::MAX, Duration::MAX), Duration::MAX);
        }
    }
}
