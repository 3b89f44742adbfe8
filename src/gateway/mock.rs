//! A mock gateway that behaves like a real one where it matters: latency, declines,
//! transient failures, and idempotency keys honoured across restarts (via its ledger).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::ledger::{Ledger, LedgerEntry, LedgerOp, LedgerOutcome};
use super::{
    ChargeRequest, ChargeResponse, GatewayError, PaymentGateway, RefundRequest, RefundResponse,
};

/// Customers whose ID starts with this are always declined, whatever the decline rate: the
/// mock's equivalent of Stripe's test card numbers, for deterministic tests and demos.
pub const DECLINE_CUSTOMER_PREFIX: &str = "decline-";
/// The reason the mock gives for a decline, as the seed does.
pub const DECLINE_REASON: &str = "insufficient funds";

#[derive(Debug, Clone, PartialEq)]
pub struct MockConfig {
    /// Time the gateway takes before it acts (network and processing).
    pub delay: Duration,
    /// Share of charges declined, from 0 (none) to 1 (all).
    pub decline_rate: f64,
    /// Share of calls that fail transiently, before acting, from 0 to 1.
    pub error_rate: f64,
    /// Time between acting and answering: where a real network loses answers.
    pub response_delay: Duration,
    /// Where to keep the audit ledger; without one, keys are remembered in memory only.
    pub ledger: Option<PathBuf>,
    /// Fault injection, never for production: act on every call as if its key were new.
    /// The crash test switches this on once to show that it then finds double charges.
    pub ignore_idempotency_keys: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(100),
            decline_rate: 0.1,
            error_rate: 0.0,
            response_delay: Duration::ZERO,
            ledger: None,
            ignore_idempotency_keys: false,
        }
    }
}

/// What the gateway did for one idempotency key.
#[derive(Debug, Clone)]
struct Done {
    op: LedgerOp,
    payment_id: String,
    amount: u64,
    outcome: LedgerOutcome,
    id: Option<String>,
}

#[derive(Debug, Default)]
struct Book {
    done: HashMap<String, Done>,
    ledger: Option<Ledger>,
    ignore_keys: bool,
}

/// The simulated gateway. Cheap to clone; clones share their memory of keys.
#[derive(Debug, Clone)]
pub struct MockGateway {
    config: MockConfig,
    book: Arc<Mutex<Book>>,
}

/// One call as the book sees it.
struct Call {
    op: LedgerOp,
    key: String,
    payment_id: String,
    amount: u64,
}

impl MockGateway {
    /// Builds the gateway, reloading the ledger if one is configured.
    pub fn new(config: MockConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&config.decline_rate),
            "decline rate must be between 0 and 1, got {}",
            config.decline_rate
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&config.error_rate),
            "error rate must be between 0 and 1, got {}",
            config.error_rate
        );
        let mut book = Book {
            ignore_keys: config.ignore_idempotency_keys,
            ..Book::default()
        };
        if book.ignore_keys {
            tracing::warn!("gateway ignores idempotency keys: retried calls will charge again");
        }
        if let Some(path) = &config.ledger {
            let (ledger, entries) = Ledger::open(path)?;
            for entry in entries.into_iter().filter(|e| !e.replay) {
                book.done.insert(
                    entry.idempotency_key,
                    Done {
                        op: entry.op,
                        payment_id: entry.payment_id,
                        amount: entry.amount,
                        outcome: entry.outcome,
                        id: entry.id,
                    },
                );
            }
            tracing::info!(path = %path.display(), keys = book.done.len(), "gateway ledger loaded");
            book.ledger = Some(ledger);
        }
        Ok(Self {
            config,
            book: Arc::new(Mutex::new(book)),
        })
    }

    /// Performs `call` once per idempotency key: a new key runs `act` and records the result,
    /// a known key answers the recorded result. The check, the act and the ledger append
    /// happen under one lock, so two concurrent calls with one key cannot both act.
    async fn once(
        &self,
        call: Call,
        act: impl FnOnce() -> (LedgerOutcome, Option<String>) + Send + 'static,
    ) -> Result<Done, GatewayError> {
        tokio::time::sleep(self.config.delay).await;
        if self.config.error_rate > 0.0 && rand::random::<f64>() < self.config.error_rate {
            return Err(GatewayError::Unavailable("simulated timeout".into()));
        }
        let book = Arc::clone(&self.book);
        let (done, replay) = tokio::task::spawn_blocking(move || {
            let mut book = book.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            book.record(call, act)
        })
        .await
        .map_err(|e| GatewayError::Unavailable(format!("gateway task failed: {e}")))??;
        tracing::info!(
            op = ?done.op,
            outcome = ?done.outcome,
            id = done.id.as_deref().unwrap_or("-"),
            replay,
            "gateway call"
        );
        tokio::time::sleep(self.config.response_delay).await;
        Ok(done)
    }
}

impl Book {
    fn record(
        &mut self,
        call: Call,
        act: impl FnOnce() -> (LedgerOutcome, Option<String>),
    ) -> Result<(Done, bool), GatewayError> {
        let known = if self.ignore_keys {
            None
        } else {
            self.done.get(&call.key)
        };
        let (done, replay) = match known {
            Some(done) if done.op != call.op || done.amount != call.amount => {
                return Err(GatewayError::Rejected(format!(
                    "idempotency key {} was first used for a {:?} of {}, now for a {:?} of {}",
                    call.key, done.op, done.amount, call.op, call.amount
                )));
            }
            Some(done) => (done.clone(), true),
            None => {
                let (outcome, id) = act();
                let done = Done {
                    op: call.op,
                    payment_id: call.payment_id,
                    amount: call.amount,
                    outcome,
                    id,
                };
                (done, false)
            }
        };
        if let Some(ledger) = &mut self.ledger {
            let entry = LedgerEntry {
                op: done.op,
                idempotency_key: call.key.clone(),
                payment_id: done.payment_id.clone(),
                amount: done.amount,
                outcome: done.outcome,
                id: done.id.clone(),
                replay,
            };
            // Not recorded means not done: answer nothing, the caller retries with the key.
            ledger
                .append(&entry)
                .map_err(|e| GatewayError::Unavailable(format!("{e:#}")))?;
        }
        if !replay {
            self.done.insert(call.key, done.clone());
        }
        Ok((done, replay))
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

#[async_trait]
impl PaymentGateway for MockGateway {
    async fn charge(&self, request: ChargeRequest) -> Result<ChargeResponse, GatewayError> {
        let decline = request.customer_id.starts_with(DECLINE_CUSTOMER_PREFIX)
            || (self.config.decline_rate > 0.0 && rand::random::<f64>() < self.config.decline_rate);
        let call = Call {
            op: LedgerOp::Charge,
            key: request.idempotency_key,
            payment_id: request.payment_id,
            amount: request.amount,
        };
        let done = self
            .once(call, move || {
                if decline {
                    (LedgerOutcome::Declined, None)
                } else {
                    (LedgerOutcome::Succeeded, Some(new_id("ch")))
                }
            })
            .await?;
        Ok(match (done.outcome, done.id) {
            (LedgerOutcome::Succeeded, Some(charge_id)) => ChargeResponse::Succeeded { charge_id },
            _ => ChargeResponse::Declined {
                reason: DECLINE_REASON.to_owned(),
            },
        })
    }

    async fn refund(&self, request: RefundRequest) -> Result<RefundResponse, GatewayError> {
        let call = Call {
            op: LedgerOp::Refund,
            key: request.idempotency_key,
            payment_id: request.payment_id,
            amount: request.amount,
        };
        let done = self
            .once(call, || (LedgerOutcome::Succeeded, Some(new_id("re"))))
            .await?;
        done.id
            .map(|refund_id| RefundResponse { refund_id })
            .ok_or_else(|| GatewayError::Rejected("refund recorded without an ID".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::read_ledger;

    fn config(decline_rate: f64) -> MockConfig {
        MockConfig {
            delay: Duration::ZERO,
            decline_rate,
            ..MockConfig::default()
        }
    }

    fn charge(key: &str, customer: &str, amount: u64) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.into(),
            payment_id: key.trim_start_matches("charge:").into(),
            amount,
            currency: "USD".into(),
            customer_id: customer.into(),
        }
    }

    #[tokio::test]
    async fn decline_rate_zero_and_one() {
        let never = MockGateway::new(config(0.0)).unwrap();
        let always = MockGateway::new(config(1.0)).unwrap();
        for i in 0..50 {
            let key = format!("charge:p{i}");
            assert!(matches!(
                never.charge(charge(&key, "cust", 1)).await.unwrap(),
                ChargeResponse::Succeeded { .. }
            ));
            assert_eq!(
                always.charge(charge(&key, "cust", 1)).await.unwrap(),
                ChargeResponse::Declined {
                    reason: "insufficient funds".into()
                }
            );
        }
    }

    #[tokio::test]
    async fn decline_customers_are_always_declined() {
        let gw = MockGateway::new(config(0.0)).unwrap();
        let r = gw
            .charge(charge("charge:x", "decline-bob", 5))
            .await
            .unwrap();
        assert!(matches!(r, ChargeResponse::Declined { .. }));
    }

    #[tokio::test]
    async fn a_key_is_charged_once_and_replayed_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let cfg = MockConfig {
            ledger: Some(path.clone()),
            ..config(0.0)
        };
        let gw = MockGateway::new(cfg.clone()).unwrap();
        let first = gw.charge(charge("charge:p1", "cust", 100)).await.unwrap();
        let again = gw.charge(charge("charge:p1", "cust", 100)).await.unwrap();
        assert_eq!(first, again);
        let other = gw.charge(charge("charge:p2", "cust", 100)).await.unwrap();
        assert_ne!(first, other, "charge IDs must be unique");

        // A new gateway over the same ledger remembers the key.
        let restarted = MockGateway::new(cfg).unwrap();
        let after = restarted
            .charge(charge("charge:p1", "cust", 100))
            .await
            .unwrap();
        assert_eq!(first, after);

        let entries = read_ledger(&path).unwrap();
        let replays: Vec<bool> = entries.iter().map(|e| e.replay).collect();
        assert_eq!(replays, vec![false, true, false, true]);
        assert!(entries.iter().all(|e| e.op == LedgerOp::Charge));
    }

    #[tokio::test]
    async fn concurrent_calls_with_one_key_act_once() {
        let gw = MockGateway::new(config(0.0)).unwrap();
        let calls = (0..16).map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { gw.charge(charge("charge:same", "cust", 7)).await })
        });
        let mut ids = std::collections::HashSet::new();
        for call in calls {
            if let ChargeResponse::Succeeded { charge_id } = call.await.unwrap().unwrap() {
                ids.insert(charge_id);
            }
        }
        assert_eq!(ids.len(), 1);
    }

    #[tokio::test]
    async fn a_key_reused_for_another_amount_is_rejected() {
        let gw = MockGateway::new(config(0.0)).unwrap();
        gw.charge(charge("charge:p", "cust", 100)).await.unwrap();
        let err = gw
            .charge(charge("charge:p", "cust", 200))
            .await
            .unwrap_err();
        assert!(matches!(err, GatewayError::Rejected(_)), "{err}");
    }

    #[tokio::test]
    async fn error_rate_one_always_fails_transiently_without_acting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let gw = MockGateway::new(MockConfig {
            error_rate: 1.0,
            ledger: Some(path.clone()),
            ..config(0.0)
        })
        .unwrap();
        let err = gw.charge(charge("charge:p", "cust", 1)).await.unwrap_err();
        assert!(matches!(err, GatewayError::Unavailable(_)));
        assert!(read_ledger(&path).unwrap().is_empty());
    }

    #[tokio::test]
    async fn ignoring_keys_charges_every_call() {
        let gw = MockGateway::new(MockConfig {
            ignore_idempotency_keys: true,
            ..config(0.0)
        })
        .unwrap();
        let first = gw.charge(charge("charge:p", "cust", 1)).await.unwrap();
        let again = gw.charge(charge("charge:p", "cust", 1)).await.unwrap();
        assert_ne!(first, again);
    }

    #[test]
    fn rates_out_of_range_are_refused() {
        assert!(MockGateway::new(config(1.5)).is_err());
        assert!(MockGateway::new(config(-0.1)).is_err());
    }
}
