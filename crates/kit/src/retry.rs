//! The one retry policy: how long to wait after the n-th failure, and which gRPC answers
//! are worth another try. The launcher, stage-engine's outbox, the gateway's dispatcher and
//! the reaper all call this; a second copy of either rule is a bug (the copies disagreed).

use std::time::Duration;

use tonic::Code;

/// Exponential backoff: `min(base * 2^(n-1), max)` after the `n`-th failure (1-based),
/// spread by ±20 % of jitter so that units that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max }
    }

    /// `min(base * 2^(n-1), max)`, without jitter.
    pub fn nominal(&self, n: u32) -> Duration {
        let exp = n.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }

    /// The nominal delay spread by `jitter` in [0, 1) over ±20 %, never above `max`.
    pub fn spread(&self, n: u32, jitter: f64) -> Duration {
        let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
        self.nominal(n).mul_f64(factor).min(self.max)
    }

    /// The delay after the `n`-th failure, with a fresh jitter.
    pub fn delay(&self, n: u32) -> Duration {
        self.spread(n, jitter())
    }
}

/// A fresh number in [0, 1) (no RNG crate: std's randomly seeded hasher).
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::time::now_ms() as u64);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Returns whether a call that answered `code` may succeed if tried again later.
///
/// The caller's own mistakes are final: a bad argument, a missing or existing thing, a
/// precondition, a permission, a range, and data loss (retrying cannot bring data back).
/// Everything else is retried: the peer down, overloaded, restarting, not upgraded yet
/// (UNIMPLEMENTED), a deadline, an internal error, and UNAUTHENTICATED — a token that
/// differs between two services during a rollout is fixed by an operator, and what waited
/// in an outbox then goes through instead of being lost.
pub fn is_retryable(code: Code) -> bool {
    !matches!(
        code,
        Code::Ok
            | Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::OutOfRange
            | Code::DataLoss
    )
}

/// [`is_retryable`] of a status.
pub fn is_retryable_status(status: &tonic::Status) -> bool {
    is_retryable(status.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_max() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let table = [
            (0, 100),
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ];
        for (n, ms) in table {
            assert_eq!(b.nominal(n), Duration::from_millis(ms), "n = {n}");
        }
    }

    #[test]
    fn jitter_spreads_by_a_fifth_and_never_passes_the_max() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        assert_eq!(b.spread(2, 0.0), Duration::from_millis(160));
        assert_eq!(b.spread(2, 0.5), Duration::from_millis(200));
        assert_eq!(b.spread(3, 0.99), Duration::from_millis(350));
        for _ in 0..100 {
            let d = b.delay(2);
            assert!(d >= Duration::from_millis(160) && d <= Duration::from_millis(240));
            assert!(b.delay(9) <= Duration::from_millis(350));
        }
    }

    #[test]
    fn a_huge_base_saturates_instead_of_overflowing() {
        let b = Backoff::new(Duration::from_secs(u64::MAX / 4), Duration::MAX);
        assert_eq!(b.nominal(31), Duration::MAX);
    }

    #[test]
    fn retryable_codes_are_one_table() {
        let retryable = [
            Code::Cancelled,
            Code::Unknown,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::Unauthenticated,
        ];
        let permanent = [
            Code::Ok,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::FailedPrecondition,
            Code::OutOfRange,
            Code::DataLoss,
        ];
        for c in retryable {
            assert!(is_retryable(c), "{c:?} should be retried");
        }
        for c in permanent {
            assert!(!is_retryable(c), "{c:?} should be final");
        }
        assert_eq!(
            retryable.len() + permanent.len(),
            17,
            "every gRPC code decided"
        );
    }
}
