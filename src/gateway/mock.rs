//! A mock gateway that behaves like a real one where it matters: latency, declines,
//! transient failures, and idempotency keys honoured across restarts (via its ledger).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use uuid::Uuid;

use super::ledger::{Ledger, LedgerEntry, LedgerOp, LedgerOutcome};
use super::{
    ChargeLookup, ChargeRequest, ChargeResponse, GatewayError, PaymentGateway, RefundRequest,
    RefundResponse, VoidRequest, VoidResponse,
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

/// What the gateway did for one idempotency key. A mock remembers every key it has seen, in
/// the service's own memory, so this is kept small (32 bytes) and without heap allocations of
/// its own: see [`Book`].
#[derive(Debug, Clone, Copy)]
struct Done {
    op: LedgerOp,
    amount: u64,
    outcome: LedgerOutcome,
    /// The charge or refund ID (`ch_<uuid>`, `re_<uuid>`), when the operation succeeded.
    id: Option<Uuid>,
}

const _: () = assert!(std::mem::size_of::<Done>() == 32);

impl Done {
    fn id(&self) -> Option<String> {
        let prefix = match self.op {
            LedgerOp::Charge => "ch",
            LedgerOp::Refund => "re",
        };
        self.id.map(|id| format!("{prefix}_{}", id.simple()))
    }
}

/// The gateway's memory of keys. A key is remembered by a 128-bit keyed digest rather than as a
/// string: ~50 bytes a key, in tables without heap allocations of their own. Two keys collide
/// with probability 2^-128; the ledger, which keeps the keys themselves, is the record.
///
/// The tables are sharded so that they grow in small steps. One table doubles to megabytes (3
/// to 6 MB at ~57,000 keys), and glibc then raises its mmap threshold for good: the service's
/// CPU per payment grew by about a fifth from there on (README "Performance"). 256 shards stay
/// under glibc's default 128 KiB threshold up to ~450,000 keys.
#[derive(Debug)]
struct Book {
    done: Vec<HashMap<KeyDigest, Done>>,
    digest: Digester,
    ledger: Option<Ledger>,
    ignore_keys: bool,
    /// Succeeded charges by payment ID, for [`PaymentGateway::find_charge`].
    charged: HashMap<String, Uuid>,
}

const SHARDS: usize = 256;

impl Default for Book {
    fn default() -> Self {
        Self {
            done: (0..SHARDS).map(|_| HashMap::new()).collect(),
            digest: Digester::default(),
            ledger: None,
            ignore_keys: false,
            charged: HashMap::new(),
        }
    }
}

type KeyDigest = u128;

/// Two SipHash functions with independent random keys, chosen at start (the table is rebuilt
/// from the ledger at every start, so digests never outlive the process).
#[derive(Debug, Default)]
struct Digester(RandomState, RandomState);

impl Digester {
    fn of(&self, key: &str) -> KeyDigest {
        (u128::from(self.0.hash_one(key)) << 64) | u128::from(self.1.hash_one(key))
    }
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
                let id = entry
                    .id
                    .as_deref()
                    .map(parse_id)
                    .transpose()
                    .with_context(|| {
                        format!("ledger {}: key {}", path.display(), entry.idempotency_key)
                    })?;
                let done = Done {
                    op: entry.op,
                    amount: entry.amount,
                    outcome: entry.outcome,
                    id,
                };
                let digest = book.digest.of(&entry.idempotency_key);
                if let (LedgerOp::Charge, Some(id)) = (entry.op, id) {
                    book.charged.insert(entry.payment_id.clone(), id);
                }
                book.remember(digest, done);
            }
            tracing::info!(path = %path.display(), keys = book.keys(), "gateway ledger loaded");
            book.ledger = Some(ledger);
        }
        Ok(Self {
            config,
            book: Arc::new(Mutex::new(book)),
        })
    }

    /// Performs `call` once per idempotency key: a new key runs `act` and records its outcome
    /// (with a new ID if it succeeded), a known key answers the recorded result. The check, the
    /// act and the ledger append happen under one lock, so two concurrent calls with one key
    /// cannot both act.
    async fn once(
        &self,
        call: Call,
        act: impl FnOnce() -> LedgerOutcome + Send + 'static,
    ) -> Result<Done, GatewayError> {
        if !self.config.delay.is_zero() {
            tokio::time::sleep(self.config.delay).await;
        }
        if self.config.error_rate > 0.0 && rand::random::<f64>() < self.config.error_rate {
            return Err(GatewayError::Unknown("simulated timeout".into()));
        }
        let payment_id = call.payment_id.clone();
        let record = {
            let book = Arc::clone(&self.book);
            move || {
                let mut book = book.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                book.record(call, act)
            }
        };
        // The ledger's fsync blocks, so it runs off the async workers; without a ledger the
        // lock is held for a hash lookup only.
        let (done, replay) = if self.config.ledger.is_some() {
            tokio::task::spawn_blocking(record)
                .await
                .map_err(|e| GatewayError::Unknown(format!("gateway task failed: {e}")))??
        } else {
            record()?
        };
        tracing::debug!(
            %payment_id,
            op = ?done.op,
            outcome = ?done.outcome,
            id = done.id().as_deref().unwrap_or("-"),
            replay,
            "gateway call"
        );
        if !self.config.response_delay.is_zero() {
            tokio::time::sleep(self.config.response_delay).await;
        }
        Ok(done)
    }
}

impl Book {
    fn shard(&mut self, digest: KeyDigest) -> &mut HashMap<KeyDigest, Done> {
        &mut self.done[(digest % SHARDS as u128) as usize]
    }

    fn remember(&mut self, digest: KeyDigest, done: Done) {
        self.shard(digest).insert(digest, done);
    }

    fn keys(&self) -> usize {
        self.done.iter().map(HashMap::len).sum()
    }

    fn record(
        &mut self,
        call: Call,
        act: impl FnOnce() -> LedgerOutcome,
    ) -> Result<(Done, bool), GatewayError> {
        let digest = self.digest.of(&call.key);
        let known = if self.ignore_keys {
            None
        } else {
            self.shard(digest).get(&digest).copied()
        };
        let (done, replay) = match known {
            Some(done) if done.op != call.op || done.amount != call.amount => {
                return Err(GatewayError::Rejected(format!(
                    "idempotency key {} was first used for a {:?} of {}, now for a {:?} of {}",
                    call.key, done.op, done.amount, call.op, call.amount
                )));
            }
            Some(done) => (done, true),
            None => {
                let outcome = act();
                let done = Done {
                    op: call.op,
                    amount: call.amount,
                    outcome,
                    id: (outcome == LedgerOutcome::Succeeded).then(new_id),
                };
                (done, false)
            }
        };
        if let Some(ledger) = &mut self.ledger {
            let entry = LedgerEntry {
                op: done.op,
                idempotency_key: call.key,
                payment_id: call.payment_id.clone(),
                amount: done.amount,
                outcome: done.outcome,
                id: done.id(),
                replay,
            };
            // Not recorded means not done: answer nothing, the caller retries with the key.
            ledger
                .append(&entry)
                .map_err(|e| GatewayError::Unknown(format!("{e:#}")))?;
        }
        if !replay {
            if let (LedgerOp::Charge, Some(id)) = (done.op, done.id) {
                self.charged.insert(call.payment_id, id);
            }
            self.remember(digest, done);
        }
        Ok((done, replay))
    }
}

/// A random (v4) UUID from the thread's generator: `Uuid::new_v4` would cost a `getrandom`
/// system call per charge.
fn new_id() -> Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// Reads back an ID written by [`Done::id`]: `ch_<uuid>` or `re_<uuid>`.
fn parse_id(id: &str) -> anyhow::Result<Uuid> {
    let (_, uuid) = id
        .split_once('_')
        .with_context(|| format!("unreadable gateway ID {id:?}"))?;
    Uuid::parse_str(uuid).with_context(|| format!("unreadable gateway ID {id:?}"))
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
                    LedgerOutcome::Declined
                } else {
                    LedgerOutcome::Succeeded
                }
            })
            .await?;
        Ok(match (done.outcome, done.id()) {
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
        let done = self.once(call, || LedgerOutcome::Succeeded).await?;
        done.id()
            .map(|refund_id| RefundResponse { refund_id })
            .ok_or_else(|| GatewayError::Rejected("refund recorded without an ID".into()))
    }

    async fn void(&self, request: VoidRequest) -> Result<VoidResponse, GatewayError> {
        let charge = request.charge;
        let (payment_id, amount) = (charge.payment_id.clone(), charge.amount);
        // A charge under the key that has not arrived yet: the key is spent on a decline.
        let call = Call {
            op: LedgerOp::Charge,
            key: charge.idempotency_key,
            payment_id: payment_id.clone(),
            amount,
        };
        let done = self.once(call, || LedgerOutcome::Declined).await?;
        let Some(charge_id) = done.id() else {
            return Ok(VoidResponse::NothingCharged);
        };
        let refund = self
            .refund(RefundRequest {
                idempotency_key: request.refund_key,
                payment_id,
                charge_id: charge_id.clone(),
                amount,
            })
            .await?;
        Ok(VoidResponse::Refunded {
            charge_id,
            refund_id: refund.refund_id,
        })
    }

    async fn find_charge(&self, payment_id: &str) -> Result<ChargeLookup, GatewayError> {
        let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        Ok(match book.charged.get(payment_id) {
            Some(id) => ChargeLookup::Charged {
                charge_id: format!("ch_{}", id.simple()),
            },
            None => ChargeLookup::NotCharged {
                reason: "no charge for this payment".into(),
            },
        })
    }

    async fn find_refund(
        &self,
        request: &RefundRequest,
    ) -> Result<Option<RefundResponse>, GatewayError> {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let digest = book.digest.of(&request.idempotency_key);
        Ok(book
            .shard(digest)
            .get(&digest)
            .filter(|done| done.op == LedgerOp::Refund)
            .and_then(Done::id)
            .map(|refund_id| RefundResponse { refund_id }))
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

        // A new gateway over the same ledger (the first one gone: one writer per ledger)
        // remembers the key.
        drop(gw);
        let restarted = MockGateway::new(cfg).unwrap();
        let after = restarted
            .charge(charge("charge:p1", "cust", 100))
            .await
            .unwrap();
        assert_eq!(first, after);

        let entries = read_ledger(&path).unwrap().entries;
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
        assert!(matches!(err, GatewayError::Unknown(_)));
        assert!(read_ledger(&path).unwrap().entries.is_empty());
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
    fn ids_are_random_v4_uuids() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.get_version_num(), 4);
        assert_ne!(a, b);
    }

    #[test]
    fn rates_out_of_range_are_refused() {
        assert!(MockGateway::new(config(1.5)).is_err());
        assert!(MockGateway::new(config(-0.1)).is_err());
    }
}
