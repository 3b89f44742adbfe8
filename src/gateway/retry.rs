//! Bounded retries of transient gateway errors, inside one journaled step.
//!
//! Why not `ctx.run(..).retry_policy(..)`: Restate counts a run's attempts as the invocation's
//! retries since its last journal entry, and a crash or a restart of the service or of the
//! server is such a retry too. A bounded run policy would so turn a few crashes in the middle
//! of a charge into a "failed" payment whose money the gateway may have taken. Here only the
//! gateway's own transient errors count; crashes are retried by Restate without bound, and
//! each new attempt calls the gateway with the same idempotency key.

use std::future::Future;
use std::time::Duration;

use super::GatewayError;

/// How often, and how patiently, a transient gateway error is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 100 ms doubling up to 1.6 s between them: about 3 s in all.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// Runs `call` until it succeeds, fails permanently, or has failed transiently
/// `policy.max_attempts` times; the last error then says how many attempts were made.
/// `payment_id` is for the log lines of the retries.
pub async fn with_retries<T, F, Fut>(
    policy: RetryPolicy,
    payment_id: &str,
    mut call: F,
) -> Result<T, GatewayError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, GatewayError>>,
{
    let mut delay = policy.initial_delay;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(GatewayError::Unknown(reason)) if attempt < policy.max_attempts => {
                tracing::warn!(
                    %payment_id,
                    attempt,
                    %reason,
                    retry_in = ?delay,
                    "gateway unavailable, retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(policy.max_delay);
                attempt += 1;
            }
            Err(GatewayError::Unknown(reason)) => {
                return Err(GatewayError::Unknown(format!(
                    "{reason} (gave up after {attempt} attempts)"
                )));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const FAST: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        initial_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
    };

    /// A call that fails transiently `failures` times, then answers `Ok(attempt)`.
    async fn flaky(calls: &AtomicU32, failures: u32) -> Result<u32, GatewayError> {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n <= failures {
            Err(GatewayError::Unknown("timeout".into()))
        } else {
            Ok(n)
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        assert_eq!(with_retries(FAST, "p", || flaky(&calls, 3)).await, Ok(4));
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts_saying_so() {
        let calls = AtomicU32::new(0);
        let err = with_retries(FAST, "p", || flaky(&calls, 100))
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(
            err,
            GatewayError::Unknown("timeout (gave up after 4 attempts)".into())
        );
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let err = with_retries(FAST, "p", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(GatewayError::Rejected("bad key".into()))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(err, GatewayError::Rejected(_)));
    }
}
