//! One gateway call, retried a few times with the same idempotency key inside one journaled step,
//! each attempt with its own timeout.
//!
//! Why not `ctx.run(..).retry_policy(..)`: Restate counts a run's attempts as the invocation's
//! retries since its last journal entry, and a crash or a restart of the service or of the
//! server is such a retry too. A bounded run policy would so turn a few crashes in the middle
//! of a charge into a payment given up on. Here only the gateway's own answers count; crashes are
//! retried by Restate without bound, and each new attempt calls the gateway with the same key.
//!
//! The budget is short on purpose (about a second and a half by default, plus the attempts' own
//! timeouts): a call still unknown after it is not retried here but settled later, outside the
//! payment's lock (see `service`), so the client gets an answer promptly.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use super::GatewayError;

/// How often, and how patiently, a gateway call is tried within one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The most one attempt may take; an attempt without an answer by then is an unknown outcome.
    pub attempt_timeout: Duration,
    /// The pause before the second attempt; it doubles, with jitter, up to `max_delay`.
    pub initial_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 3 attempts of at most 5 s each, 200 ms then 400 ms (plus jitter) between them. Stripe's
    /// own answers take well under a second; 5 s leaves room for a slow network.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            attempt_timeout: Duration::from_secs(5),
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(1),
        }
    }
}

/// What one step's calls came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempted<T> {
    /// The final answer, or the last error: an unknown outcome after `attempts`, or a rejection.
    pub result: Result<T, GatewayError>,
    pub attempts: u32,
}

/// Calls `call` until it gives a final answer (`Ok` or [`GatewayError::Rejected`]) or
/// `policy.max_attempts` attempts ended unknown. `payment_id` and `op` are for the log lines.
pub async fn with_retries<T, F, Fut>(
    policy: RetryPolicy,
    payment_id: &str,
    op: &'static str,
    mut call: F,
) -> Attempted<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, GatewayError>>,
{
    // Jitter spreads the retries of payments that failed together (a gateway outage).
    let mut pauses = ExponentialBuilder::default()
        .with_min_delay(policy.initial_delay)
        .with_max_delay(policy.max_delay)
        .with_max_times(policy.max_attempts.saturating_sub(1) as usize)
        .with_jitter()
        .build();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let result = match tokio::time::timeout(policy.attempt_timeout, call()).await {
            Ok(result) => result,
            Err(_) => Err(GatewayError::Unknown(format!(
                "no answer within {:?}",
                policy.attempt_timeout
            ))),
        };
        let reason = match &result {
            Err(GatewayError::Unknown(reason)) => reason,
            _ => return Attempted { result, attempts },
        };
        let Some(pause) = pauses.next() else {
            tracing::warn!(%payment_id, op, attempts, %reason, "gateway outcome still unknown");
            return Attempted { result, attempts };
        };
        tracing::warn!(%payment_id, op, attempt = attempts, %reason, retry_in = ?pause, "gateway outcome unknown, retrying with the same key");
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const FAST: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        attempt_timeout: Duration::from_millis(50),
        initial_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
    };

    /// A call whose outcome is unknown `failures` times, then answers `Ok(attempt)`.
    async fn flaky(calls: &AtomicU32, failures: u32) -> Result<u32, GatewayError> {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n <= failures {
            Err(GatewayError::Unknown("reset".into()))
        } else {
            Ok(n)
        }
    }

    #[tokio::test]
    async fn unknown_outcomes_are_retried_until_an_answer() {
        let calls = AtomicU32::new(0);
        let done = with_retries(FAST, "p", "charge", || flaky(&calls, 3)).await;
        assert_eq!(
            done,
            Attempted {
                result: Ok(4),
                attempts: 4
            }
        );
    }

    #[tokio::test]
    async fn stops_after_max_attempts_with_the_last_error() {
        let calls = AtomicU32::new(0);
        let done = with_retries(FAST, "p", "charge", || flaky(&calls, 100)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(done.attempts, 4);
        assert_eq!(done.result, Err(GatewayError::Unknown("reset".into())));
    }

    #[tokio::test]
    async fn an_attempt_without_an_answer_times_out_as_unknown() {
        let calls = AtomicU32::new(0);
        let done = with_retries(FAST, "p", "charge", || async {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                std::future::pending::<()>().await;
            }
            Ok(7)
        })
        .await;
        assert_eq!(
            done,
            Attempted {
                result: Ok(7),
                attempts: 2
            }
        );
    }

    #[tokio::test]
    async fn rejections_are_final() {
        let calls = AtomicU32::new(0);
        let done = with_retries(FAST, "p", "refund", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(GatewayError::Rejected("bad key".into()))
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(done.result, Err(GatewayError::Rejected(_))));
    }
}
