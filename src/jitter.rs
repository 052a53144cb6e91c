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

/// A configured fraction made safe: clamped to `[0, 1]`, NaN read as 0 (no jitter).
pub(crate) fn fraction(fraction: f64) -> f64 {
    if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    }
}

/// `base` times `factor` (in `[0, 1]`), saturating instead of panicking near `Duration::MAX`.
fn scale(base: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(base.as_secs_f64() * fraction(factor)).unwrap_or(base)
}

/// `base` shortened by up to `fraction` of itself, at random: `fraction` 0.2 gives 80-100 %.
/// Any `fraction` and `base` are accepted (see [`fraction`]); nothing overflows.
pub(crate) fn shorten(base: Duration, fraction: f64) -> Duration {
    let cut = self::fraction(fraction) * unit();
    if cut == 0.0 {
        return base;
    }
    scale(base, 1.0 - cut).min(base)
}

/// `base` plus up to `spread`, at random, saturating at `Duration::MAX`.
pub(crate) fn extend(base: Duration, spread: Duration) -> Duration {
    base.saturating_add(scale(spread, unit()).min(spread))
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

    #[test]
    fn extreme_values_neither_panic_nor_leave_the_range() {
        assert_eq!(fraction(f64::NAN), 0.0);
        assert_eq!(fraction(-1.0), 0.0);
        assert_eq!(fraction(f64::INFINITY), 1.0);
        for f in [
            f64::NAN,
            f64::NEG_INFINITY,
            -0.5,
            0.0,
            0.5,
            1.0,
            7.0,
            f64::INFINITY,
        ] {
            for base in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
                assert!(shorten(base, f) <= base, "{base:?} {f}");
            }
        }
        assert_eq!(shorten(Duration::MAX, f64::NAN), Duration::MAX);
        for _ in 0..100 {
            assert_eq!(extend(Duration::MAX, Duration::MAX), Duration::MAX);
            assert!(extend(Duration::from_secs(1), Duration::MAX) >= Duration::from_secs(1));
        }
    }
}
