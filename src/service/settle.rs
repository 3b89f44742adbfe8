//! When the service tries again by itself: a charge or refund whose outcome stayed unknown is
//! settled by delayed calls of the object to itself (`Settle`), so that no invocation holds the
//! payment's lock while it waits.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::gateway::RetryPolicy;
use crate::payment::Timestamp;

/// How gateway calls are retried, in a step and across steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettlePolicy {
    /// The attempts of one step.
    pub retry: RetryPolicy,
    /// The pause before the first `Settle`; it doubles with every round, with jitter.
    pub first_delay: Duration,
    /// The longest pause between two rounds.
    pub max_delay: Duration,
    /// How long the gateway keeps an idempotency key (Stripe: 24 hours). A key is only sent
    /// again well within it: after it, the same key could charge a second time. Past it, the
    /// service looks the payment up instead.
    pub key_retention: Duration,
    /// How long a charge the gateway accepted without a final word waits for its webhook
    /// before the service looks it up.
    pub confirm_deadline: Duration,
}

impl Default for SettlePolicy {
    /// First round after 1 s, doubling up to 5 minutes: a gateway that recovers sees its
    /// payments settled within minutes.
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(5 * 60),
            key_retention: Duration::from_secs(24 * 60 * 60),
            confirm_deadline: Duration::from_secs(60 * 60),
        }
    }
}

/// The body of `Settle`: which round this is, for the backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct SettleRound {
    pub round: u32,
}

impl SettlePolicy {
    /// The pause before round `round`, `jitter` (0 to 1, from the journaled random source)
    /// taking up to a quarter off, so that payments cut off together are not retried together.
    pub fn delay(&self, round: u32, jitter: f64) -> Duration {
        let doubled = self
            .first_delay
            .saturating_mul(1u32.checked_shl(round.min(31)).unwrap_or(u32::MAX));
        doubled
            .min(self.max_delay)
            .mul_f64(1.0 - 0.25 * jitter.clamp(0.0, 1.0))
    }

    /// Whether sending the key first sent at `first` is still safe at `now`: the call, and the
    /// longest pause before the next round, must end well before the gateway forgets the key.
    pub fn key_alive(&self, first: Timestamp, now: Timestamp) -> bool {
        let step = self.retry.attempt_timeout * self.retry.max_attempts
            + self.retry.max_delay * self.retry.max_attempts;
        let used = Duration::from_millis(now.millis_since(first).max(0) as u64);
        used + self.max_delay + step < self.key_retention / 2 + self.key_retention / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_off_the_top() {
        let policy = SettlePolicy::default();
        assert_eq!(policy.delay(0, 0.0), Duration::from_secs(1));
        assert_eq!(policy.delay(3, 0.0), Duration::from_secs(8));
        assert_eq!(policy.delay(40, 0.0), Duration::from_secs(300));
        assert_eq!(policy.delay(40, 1.0), Duration::from_secs(225));
    }

    #[test]
    fn keys_are_resent_only_well_within_their_retention() {
        let policy = SettlePolicy::default();
        let first = Timestamp::from_unix_millis(0).unwrap();
        let at = |hours: i64| Timestamp::from_unix_millis(hours * 3_600_000).unwrap();
        assert!(policy.key_alive(first, first));
        assert!(policy.key_alive(first, at(17)));
        assert!(!policy.key_alive(first, at(18)));
        assert!(!policy.key_alive(first, at(48)));
    }
}
