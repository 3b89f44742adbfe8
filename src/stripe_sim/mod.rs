//! A small simulated Stripe: the one mock gateway logic, served two ways.
//!
//! [`Engine`] holds PaymentIntents (created with or without confirming, confirmed, cancelled,
//! retrieved, searched by `metadata[payment_id]`) and their refunds (capped at what is left of
//! the charge), honours idempotency keys as Stripe does (the first answer replayed, flagged as
//! a replay; a key reused with other parameters refused with `idempotency_error`; a key whose
//! first request still runs refused as in use; keys forgotten after a retention), declines
//! (Stripe's declining test payment methods, customers `decline-*`, a decline rate), and writes
//! the audit ledger ([`ledger`]): one line per call received.
//!
//! Its state sits behind [`Store`]: [`MemoryStore`] (in the service's process, made durable by
//! replaying the ledger at start) and [`SqliteStore`] (the `mock-gateway` process). It is
//! served in process by [`crate::gateway::MockGateway`] and over HTTP by [`http`].
//!
//! One lock around the store: a key is checked, acted on and recorded (durably, when the store
//! is) under it, so two calls with one key never both act. With a delay, the key is marked in
//! flight under the lock, the lock is released for the delay, and taken again to act: a repeat
//! arriving meanwhile is told the key is in use, as Stripe does.

pub mod http;
pub mod ledger;
mod memory;
pub mod model;
mod sqlite;
pub mod webhooks;

use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

pub use ledger::{Ledger, LedgerEntry, LedgerFault, LedgerOp, LedgerOutcome};
pub use memory::MemoryStore;
pub use model::{
    ACTION_CUSTOMER_PREFIX, ACTION_PAYMENT_METHODS, ASYNC_CUSTOMER_PREFIX,
    ASYNC_DECLINE_CUSTOMER_PREFIX, AnswerKind, ApiError, Body, Currency, DECLINE_CUSTOMER_PREFIX,
    DECLINING_PAYMENT_METHODS, INSUFFICIENT_FUNDS_MESSAGE, Intent, IntentStatus, KeyRecord,
    Metadata, Refund, RefundView, Reply,
};
pub use sqlite::SqliteStore;

/// How long Stripe keeps an idempotency key.
pub const DEFAULT_KEY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Share of confirmations declined, from 0 to 1.
    pub decline_rate: f64,
    /// How long a key's first answer is kept.
    pub key_retention: Duration,
    /// Fault injection, never for production: act on every call as if its key were new.
    pub ignore_idempotency_keys: bool,
    /// How long a processing intent (customers `async-*`) takes to settle by itself.
    pub settle_delay: Duration,
}

/// How long a processing intent takes to settle by default: long enough that the service sees
/// it pending, short enough for a walkthrough.
pub const DEFAULT_SETTLE_DELAY: Duration = Duration::from_secs(2);

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            decline_rate: 0.0,
            key_retention: DEFAULT_KEY_RETENTION,
            ignore_idempotency_keys: false,
            settle_delay: DEFAULT_SETTLE_DELAY,
        }
    }
}

impl SimConfig {
    pub fn check(&self) -> anyhow::Result<()> {
        check_rate("decline rate", self.decline_rate)?;
        anyhow::ensure!(
            self.key_retention >= Duration::from_secs(1),
            "key retention must be at least 1s"
        );
        Ok(())
    }
}

pub fn check_rate(what: &str, rate: f64) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&rate),
        "{what} must be between 0 and 1, got {rate}"
    );
    Ok(())
}

/// Faults injected into calls, each a share from 0 to 1, drawn once per call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Answered with an error (5xx or 429; in process, an unknown outcome) before acting.
    pub error_rate: f64,
    /// Acted on and recorded, then the answer is lost.
    pub drop_response_rate: f64,
    /// Never answered, before acting.
    pub hang_rate: f64,
}

impl Faults {
    pub fn check(&self) -> anyhow::Result<()> {
        check_rate("error rate", self.error_rate)?;
        check_rate("drop-response rate", self.drop_response_rate)?;
        check_rate("hang rate", self.hang_rate)?;
        anyhow::ensure!(
            self.error_rate + self.drop_response_rate + self.hang_rate <= 1.0,
            "error, drop-response and hang rates must add up to at most 1"
        );
        Ok(())
    }

    /// The fault for one call, if any: one draw, so the rates are shares of all calls.
    pub fn roll(&self) -> Option<LedgerFault> {
        if self.error_rate == 0.0 && self.drop_response_rate == 0.0 && self.hang_rate == 0.0 {
            return None;
        }
        let x = rand::random::<f64>();
        if x < self.error_rate {
            Some(LedgerFault::Error)
        } else if x < self.error_rate + self.drop_response_rate {
            Some(LedgerFault::Drop)
        } else if x < self.error_rate + self.drop_response_rate + self.hang_rate {
            Some(LedgerFault::Hang)
        } else {
            None
        }
    }
}

/// `POST /v1/payment_intents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateIntent {
    pub amount: u64,
    pub currency: Currency,
    pub confirm: bool,
    pub payment_method: Option<String>,
    pub payment_method_types: Vec<String>,
    pub metadata: Metadata,
    /// `capture_method=manual`: a confirmation holds the money until a capture.
    pub capture_manual: bool,
}

/// `POST /v1/refunds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRefund {
    pub payment_intent: String,
    /// Unset: all that is left.
    pub amount: Option<u64>,
    pub metadata: Metadata,
}

/// A call that may act (a POST), with its parameters validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Post {
    CreateIntent(CreateIntent),
    /// `POST /v1/payment_intents/:id/confirm`.
    Confirm {
        intent: String,
        payment_method: Option<String>,
    },
    /// `POST /v1/payment_intents/:id/cancel`.
    Cancel {
        intent: String,
    },
    /// `POST /v1/payment_intents/:id/capture`; no amount captures the whole hold.
    Capture {
        intent: String,
        amount_to_capture: Option<u64>,
    },
    CreateRefund(CreateRefund),
}

impl Post {
    /// A digest of the endpoint and parameters, stable across processes and builds (FNV-1a):
    /// it is stored with the key and in the ledger.
    pub fn fingerprint(&self) -> u64 {
        let mut h = Fnv::default();
        match self {
            Post::CreateIntent(c) => {
                h.field(b"payment_intents");
                h.field(&c.amount.to_le_bytes());
                h.field(c.currency.as_str().as_bytes());
                h.field(&[u8::from(c.confirm)]);
                h.field(c.payment_method.as_deref().unwrap_or("\0").as_bytes());
                for t in &c.payment_method_types {
                    h.field(t.as_bytes());
                }
                h.metadata(&c.metadata);
                // Only when set, so that the digests of automatic captures stay as they were.
                if c.capture_manual {
                    h.field(b"capture_method=manual");
                }
            }
            Post::Confirm {
                intent,
                payment_method,
            } => {
                h.field(b"confirm");
                h.field(intent.as_bytes());
                h.field(payment_method.as_deref().unwrap_or("\0").as_bytes());
            }
            Post::Cancel { intent } => {
                h.field(b"cancel");
                h.field(intent.as_bytes());
            }
            Post::Capture {
                intent,
                amount_to_capture,
            } => {
                h.field(b"capture");
                h.field(intent.as_bytes());
                h.field(&amount_to_capture.map_or([0xff; 8], u64::to_le_bytes));
            }
            Post::CreateRefund(r) => {
                h.field(b"refunds");
                h.field(r.payment_intent.as_bytes());
                h.field(&r.amount.map_or([0xff; 8], u64::to_le_bytes));
                h.metadata(&r.metadata);
            }
        }
        h.0
    }

    fn ledger_op(&self) -> LedgerOp {
        match self {
            Post::CreateIntent(c) if c.confirm && c.capture_manual => LedgerOp::Authorize,
            Post::CreateIntent(c) if c.confirm => LedgerOp::Charge,
            Post::CreateIntent(_) => LedgerOp::Create,
            Post::Confirm { .. } => LedgerOp::Charge,
            Post::Cancel { .. } => LedgerOp::Cancel,
            Post::Capture { .. } => LedgerOp::Capture,
            Post::CreateRefund(_) => LedgerOp::Refund,
        }
    }

    /// The intent the call names, if any.
    fn target(&self) -> Option<&str> {
        match self {
            Post::CreateIntent(_) => None,
            Post::Confirm { intent, .. }
            | Post::Cancel { intent }
            | Post::Capture { intent, .. } => Some(intent),
            Post::CreateRefund(r) => Some(&r.payment_intent),
        }
    }

    /// The ledger line for this call (its parameters' `fingerprint`), before it is known what
    /// it did.
    fn line(&self, key: Option<&str>, at_ms: u64, fingerprint: u64) -> LedgerEntry {
        let (payment_id, amount) = match self {
            Post::CreateIntent(c) => (c.metadata.payment_id(), c.amount),
            Post::CreateRefund(r) => (r.metadata.payment_id(), r.amount.unwrap_or(0)),
            Post::Capture {
                amount_to_capture, ..
            } => ("", amount_to_capture.unwrap_or(0)),
            Post::Confirm { .. } | Post::Cancel { .. } => ("", 0),
        };
        LedgerEntry {
            at: Some(at_ms),
            params: Some(format!("{fingerprint:016x}")),
            intent: self.target().map(str::to_owned),
            ..LedgerEntry::new(
                self.ledger_op(),
                key.unwrap_or(""),
                payment_id,
                amount,
                LedgerOutcome::Rejected,
            )
        }
    }
}

#[derive(Default)]
struct Fnv(u64);

impl Fnv {
    fn field(&mut self, bytes: &[u8]) {
        if self.0 == 0 {
            self.0 = 0xcbf2_9ce4_8422_2325;
        }
        for &b in bytes.iter().chain(&[0xfe]) {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn metadata(&mut self, m: &Metadata) {
        for (k, v) in m.pairs() {
            self.field(k.as_bytes());
            self.field(v.as_bytes());
        }
    }
}

/// Where the engine keeps its state. Every call's effects (the key's record, the intent as it
/// now is) and its ledger line are committed together, and durably if the store is durable,
/// before the call is answered.
pub trait Store: Send + 'static {
    /// Whether `commit` waits for the disk (the engine then calls it off the async workers).
    fn blocks(&self) -> bool;
    /// Whether it keeps ledger lines (the engine builds none for a store that does not).
    fn records(&self) -> bool;
    fn key(&mut self, key: &str) -> anyhow::Result<Option<KeyRecord>>;
    fn intent(&mut self, id: &Uuid) -> anyhow::Result<Option<Intent>>;
    /// The intents whose `metadata[payment_id]` is `payment_id`, oldest first.
    fn search(&mut self, payment_id: &str) -> anyhow::Result<Vec<Intent>>;
    fn commit(&mut self, commit: Commit<'_>) -> anyhow::Result<()>;
    /// Forgets the keys first used before `at` (seconds since the epoch).
    fn forget_keys_before(&mut self, at: u32) -> anyhow::Result<usize>;
    /// The processing intents, which settle by themselves (read once, at start).
    fn settling(&mut self) -> anyhow::Result<Vec<Intent>>;
}

/// One call's effects.
#[derive(Debug)]
pub struct Commit<'a> {
    pub key: Option<(&'a str, KeyRecord)>,
    pub intent: Option<&'a Intent>,
    pub line: Option<&'a LedgerEntry>,
}

/// Milliseconds since the Unix epoch; a test's clock moves when the test says so.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    })
}

/// The simulated gateway (see the module doc).
pub struct Engine<S> {
    inner: Mutex<Inner<S>>,
    config: SimConfig,
    clock: Clock,
    /// Whether any intent is processing (`Inner::due` not empty): read without the lock, so that
    /// a call finds nothing to settle for the price of one load.
    settling: AtomicBool,
    /// `Store::blocks`, read once: it is the store's nature, not its state.
    blocks: bool,
}

impl<S> std::fmt::Debug for Engine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct Inner<S> {
    store: S,
    /// Keys whose first request is running (not durable: a request cut off by a crash never
    /// acted).
    /// Keyed by the keys' digests (see `memory.rs` for the hasher).
    in_flight: foldhash::HashMap<u128, u64>,
    digest: Digester,
    last_sweep: u32,
    /// Processing intents by when they settle (milliseconds since the epoch).
    due: BTreeSet<(u64, Uuid)>,
}

/// What a processing intent settled to by itself: what a webhook reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Stripe's event type: `payment_intent.succeeded`, `payment_intent.amount_capturable_updated`
    /// or `payment_intent.payment_failed`.
    pub event_type: &'static str,
    pub intent: Intent,
}

/// Two SipHash functions with independent random keys: a 128-bit digest of a key.
#[derive(Debug, Default)]
pub(crate) struct Digester(RandomState, RandomState);

impl Digester {
    pub(crate) fn of(&self, key: &str) -> u128 {
        (u128::from(self.0.hash_one(key)) << 64) | u128::from(self.1.hash_one(key))
    }
}

enum Mode {
    /// Check the key, act and record: one lock.
    Whole,
    /// Check the key and mark it in flight with this token.
    Claim(u64),
    /// Act on a claimed key and record.
    Act,
}

/// Which intent a call stores.
enum Stored {
    Nothing,
    Own(Intent),
    /// The one in the answer.
    Answered,
}

enum Step {
    Done(Reply),
    Claimed,
}

/// Clears a claimed key if the call is dropped before acting (a caller's timeout).
struct Claim<'a, S> {
    engine: &'a Engine<S>,
    digest: u128,
    /// This call's mark: a call dropped after another one took the key clears nothing.
    token: u64,
}

impl<S> Drop for Claim<'_, S> {
    fn drop(&mut self) {
        let mut inner = self.engine.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.in_flight.get(&self.digest) == Some(&self.token) {
            inner.in_flight.remove(&self.digest);
        }
    }
}

impl<S: Store> Engine<S> {
    pub fn new(store: S, config: SimConfig) -> anyhow::Result<Self> {
        Self::with_clock(store, config, system_clock())
    }

    pub fn with_clock(mut store: S, config: SimConfig, clock: Clock) -> anyhow::Result<Self> {
        config.check()?;
        if config.ignore_idempotency_keys {
            tracing::warn!("gateway ignores idempotency keys: retried calls will act again");
        }
        let now = (clock() / 1000) as u32;
        // A processing intent settles whether or not the gateway was restarted meanwhile.
        let due: BTreeSet<(u64, Uuid)> = store
            .settling()?
            .into_iter()
            .filter_map(|i| Some((i.settles_at?, i.id)))
            .collect();
        let settling = AtomicBool::new(!due.is_empty());
        let blocks = store.blocks();
        Ok(Self {
            inner: Mutex::new(Inner {
                store,
                in_flight: foldhash::HashMap::default(),
                digest: Digester::default(),
                last_sweep: now,
                due,
            }),
            config,
            clock,
            settling,
            blocks,
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the engine, off the async workers when the store waits for the disk.
    async fn blocking<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        if self.blocks {
            let engine = Arc::clone(self);
            tokio::task::spawn_blocking(move || f(&engine))
                .await
                .map_err(|e| anyhow::anyhow!("gateway task failed: {e}"))
        } else {
            Ok(f(self))
        }
    }

    /// Performs one POST under its idempotency key. `delay` is the time the call takes while
    /// its key is in flight; `dropped` marks the ledger line of a call whose answer will be
    /// lost. An error is the store's: nothing was answered, nor (if the store is durable)
    /// recorded.
    pub async fn post(
        self: &Arc<Self>,
        key: Option<String>,
        post: Post,
        delay: Duration,
        dropped: bool,
    ) -> anyhow::Result<Reply> {
        let call = Arc::new((key, post));
        if delay.is_zero() {
            let c = Arc::clone(&call);
            return self
                .blocking(move |e| e.step(&c.0, &c.1, Mode::Whole, dropped))
                .await?
                .map(|step| match step {
                    Step::Done(reply) => reply,
                    Step::Claimed => unreachable!("a whole step answers"),
                });
        }
        // The guard exists before the claim: a call dropped while claiming clears its mark.
        let token = rand::random::<u64>();
        let _claim = call.0.as_deref().map(|key| Claim {
            engine: self,
            digest: self.lock().digest.of(key),
            token,
        });
        let c = Arc::clone(&call);
        match self
            .blocking(move |e| e.step(&c.0, &c.1, Mode::Claim(token), dropped))
            .await??
        {
            Step::Done(reply) => return Ok(reply),
            Step::Claimed => {}
        }
        tokio::time::sleep(delay).await;
        let c = Arc::clone(&call);
        match self
            .blocking(move |e| e.step(&c.0, &c.1, Mode::Act, dropped))
            .await??
        {
            Step::Done(reply) => Ok(reply),
            Step::Claimed => unreachable!("acting answers"),
        }
    }

    /// Records a call answered by an injected fault before acting.
    pub async fn record_fault(
        self: &Arc<Self>,
        key: Option<String>,
        post: Post,
        fault: LedgerFault,
    ) -> anyhow::Result<()> {
        self.blocking(move |e| {
            let mut line = post.line(key.as_deref(), (e.clock)(), post.fingerprint());
            line.outcome = LedgerOutcome::Failed;
            line.fault = Some(fault);
            e.lock().store.commit(Commit {
                key: None,
                intent: None,
                line: Some(&line),
            })
        })
        .await?
    }

    fn step(
        &self,
        key: &Option<String>,
        post: &Post,
        mode: Mode,
        dropped: bool,
    ) -> anyhow::Result<Step> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let now_ms = (self.clock)();
        let now = (now_ms / 1000) as u32;
        let fingerprint = post.fingerprint();
        // Built only for a store that keeps it (the benchmark's in-process store keeps none).
        let mut line = inner
            .store
            .records()
            .then(|| post.line(key.as_deref(), now_ms, fingerprint));
        if let Some(line) = line.as_mut().filter(|_| dropped) {
            line.fault = Some(LedgerFault::Drop);
        }
        let key = key
            .as_deref()
            .filter(|_| !self.config.ignore_idempotency_keys);
        let digest = key.map(|k| inner.digest.of(k));
        if !matches!(mode, Mode::Act)
            && let (Some(key), Some(digest)) = (key, digest)
        {
            let known = inner.store.key(key)?.filter(|rec| !self.expired(rec, now));
            let refusal = if inner.in_flight.contains_key(&digest) {
                Some(ApiError {
                    status: 409,
                    ..ApiError::invalid(
                        Some("idempotency_key_in_use"),
                        None,
                        "There is currently another in-progress request using this \
                         Stripe-Account, Idempotency-Key, and endpoint. Please try again later."
                            .into(),
                    )
                })
            } else if let Some(rec) = known.filter(|rec| rec.fingerprint != fingerprint) {
                let _ = rec;
                Some(ApiError {
                    kind: "idempotency_error",
                    ..ApiError::invalid(
                        None,
                        None,
                        format!(
                            "Keys for idempotent requests can only be used with the same \
                             parameters they were first used with. Try using a key other than \
                             '{key}' if you meant to execute a different request."
                        ),
                    )
                })
            } else {
                None
            };
            if let Some(error) = refusal {
                if let Some(line) = line.as_mut() {
                    line.error = Some(error.code.unwrap_or(error.kind).to_owned());
                }
                inner.store.commit(Commit {
                    key: None,
                    intent: None,
                    line: line.as_ref(),
                })?;
                return Ok(Step::Done(Reply {
                    body: Body::Error(error),
                    replay: false,
                }));
            }
            if let Some(rec) = known {
                let reply = self.render(&mut inner.store, &rec, post)?;
                if let Some(line) = line.as_mut() {
                    line.replay = true;
                    describe(line, &reply);
                }
                inner.store.commit(Commit {
                    key: None,
                    intent: None,
                    line: line.as_ref(),
                })?;
                return Ok(Step::Done(Reply {
                    replay: true,
                    ..reply
                }));
            }
            if let Mode::Claim(token) = mode {
                inner.in_flight.insert(digest, token);
                return Ok(Step::Claimed);
            }
        }
        if let Some(digest) = digest {
            inner.in_flight.remove(&digest);
        }
        let (reply, rec, intent) = self.act(&mut inner.store, post, fingerprint, now_ms)?;
        if let Some(line) = line.as_mut() {
            describe(line, &reply);
        }
        let stored = match &intent {
            Stored::Nothing => None,
            Stored::Own(intent) => Some(intent),
            Stored::Answered => reply.intent(),
        };
        inner.store.commit(Commit {
            key: key.zip(rec),
            intent: stored,
            line: line.as_ref(),
        })?;
        if let Some(i) = stored
            && let Some(at) = i.settles_at
        {
            inner.due.insert((at, i.id));
            self.settling.store(true, Ordering::Release);
        }
        self.sweep(inner, now)?;
        Ok(Step::Done(reply))
    }

    fn expired(&self, rec: &KeyRecord, now: u32) -> bool {
        u64::from(now.saturating_sub(rec.at)) >= self.config.key_retention.as_secs()
    }

    /// Forgets expired keys now and then (every eighth of the retention, at most once a second).
    fn sweep(&self, inner: &mut Inner<S>, now: u32) -> anyhow::Result<()> {
        let retention = self.config.key_retention.as_secs().min(u64::from(u32::MAX)) as u32;
        if now.saturating_sub(inner.last_sweep) >= (retention / 8).max(1) {
            inner.last_sweep = now;
            let forgotten = inner
                .store
                .forget_keys_before(now.saturating_sub(retention))?;
            if forgotten > 0 {
                tracing::debug!(forgotten, "idempotency keys past their retention forgotten");
            }
        }
        Ok(())
    }

    fn decide_decline(&self, payment_method: Option<&str>, metadata: &Metadata) -> bool {
        payment_method.is_some_and(|pm| DECLINING_PAYMENT_METHODS.contains(&pm))
            || metadata
                .get("customer_id")
                .is_some_and(|c| c.starts_with(DECLINE_CUSTOMER_PREFIX))
            || (self.config.decline_rate > 0.0 && rand::random::<f64>() < self.config.decline_rate)
    }

    /// Confirms `intent`: succeeded (or held), declined (402 with the intent), or, for the
    /// customers that pay later, processing or waiting on an action. The intent moves into the
    /// answer (no copy: the store reads it from there, [`Reply::intent`]).
    fn confirm(
        &self,
        mut intent: Intent,
        payment_method: Option<&str>,
        now_ms: u64,
    ) -> (Reply, AnswerKind) {
        if let Some(pm) = payment_method {
            intent.payment_method = Some(pm.into());
        }
        let customer = intent.metadata.get("customer_id").unwrap_or_default();
        let later = if customer.starts_with(ASYNC_CUSTOMER_PREFIX) {
            Some(IntentStatus::Processing)
        } else if customer.starts_with(ACTION_CUSTOMER_PREFIX)
            || intent
                .payment_method
                .as_deref()
                .is_some_and(|pm| ACTION_PAYMENT_METHODS.contains(&pm))
        {
            Some(IntentStatus::RequiresAction)
        } else {
            None
        };
        if let Some(status) = later {
            intent.status = status;
            intent.declined = false;
            intent.settles_at = (status == IntentStatus::Processing)
                .then(|| now_ms.saturating_add(self.config.settle_delay.as_millis() as u64));
            let reply = Reply {
                body: Body::Intent(Box::new(intent)),
                replay: false,
            };
            return (reply, AnswerKind::Intent);
        }
        if self.decide_decline(intent.payment_method.as_deref(), &intent.metadata) {
            intent.status = IntentStatus::RequiresPaymentMethod;
            intent.declined = true;
            let error = ApiError {
                status: 402,
                kind: "card_error",
                code: Some("card_declined"),
                decline_code: Some("insufficient_funds"),
                param: None,
                message: INSUFFICIENT_FUNDS_MESSAGE.into(),
                payment_intent: Some(Box::new(intent)),
            };
            (
                Reply {
                    body: Body::Error(error),
                    replay: false,
                },
                AnswerKind::Declined,
            )
        } else {
            intent.status = if intent.capture_manual {
                IntentStatus::RequiresCapture
            } else {
                IntentStatus::Succeeded
            };
            intent.declined = false;
            (
                Reply {
                    body: Body::Intent(Box::new(intent)),
                    replay: false,
                },
                AnswerKind::Intent,
            )
        }
    }

    fn act(
        &self,
        store: &mut S,
        post: &Post,
        fingerprint: u64,
        now_ms: u64,
    ) -> anyhow::Result<(Reply, Option<KeyRecord>, Stored)> {
        let now = (now_ms / 1000) as u32;
        let record = |kind, intent: &Intent, n: u16| KeyRecord {
            fingerprint,
            at: now,
            kind,
            status: intent.status,
            n,
            intent: intent.id,
        };
        let error = |e: ApiError| Reply {
            body: Body::Error(e),
            replay: false,
        };
        let refunds = |i: &Intent| u16::try_from(i.refunds.len()).unwrap_or(u16::MAX);
        if let Post::CreateIntent(c) = post {
            let intent = Intent {
                id: new_id(),
                amount: c.amount,
                currency: c.currency,
                status: IntentStatus::RequiresConfirmation,
                payment_method: c.payment_method.as_deref().map(Into::into),
                metadata: c.metadata.clone(),
                created: u64::from(now),
                canceled_at: None,
                declined: false,
                refunds: Vec::new(),
                capture_manual: c.capture_manual,
                amount_captured: None,
                settles_at: None,
            };
            let (reply, kind) = if c.confirm {
                self.confirm(intent, None, now_ms)
            } else {
                (
                    Reply {
                        body: Body::Intent(Box::new(intent)),
                        replay: false,
                    },
                    AnswerKind::Intent,
                )
            };
            let rec = record(kind, reply.intent().expect("an intent answered"), 0);
            return Ok((reply, Some(rec), Stored::Answered));
        }
        let target = post.target().unwrap_or_default();
        let param = matches!(post, Post::CreateRefund(_)).then_some("payment_intent");
        let Some(mut intent) = model::parse_intent_id(target)
            .map(|id| store.intent(&id))
            .transpose()?
            .flatten()
        else {
            // Not stored under the key: Stripe keeps no result for a request that fails
            // validation.
            return Ok((
                error(ApiError::missing("payment_intent", target, param)),
                None,
                Stored::Nothing,
            ));
        };
        let unexpected = ApiError::unexpected_state;
        Ok(match post {
            Post::CreateIntent(_) => unreachable!("handled above"),
            Post::Confirm { payment_method, .. } => {
                if !intent.status.open() {
                    let rec = record(AnswerKind::UnexpectedState, &intent, refunds(&intent));
                    (
                        error(unexpected(&intent, "confirm")),
                        Some(rec),
                        Stored::Nothing,
                    )
                } else {
                    let (reply, kind) = self.confirm(intent, payment_method.as_deref(), now_ms);
                    let intent = reply.intent().expect("an intent answered");
                    let rec = record(kind, intent, refunds(intent));
                    (reply, Some(rec), Stored::Answered)
                }
            }
            Post::Cancel { .. } => {
                if !intent.status.cancelable() {
                    let rec = record(AnswerKind::UnexpectedState, &intent, refunds(&intent));
                    (
                        error(unexpected(&intent, "cancel")),
                        Some(rec),
                        Stored::Nothing,
                    )
                } else {
                    intent.status = IntentStatus::Canceled;
                    intent.canceled_at = Some(u64::from(now));
                    let rec = record(AnswerKind::Intent, &intent, refunds(&intent));
                    let reply = Reply {
                        body: Body::Intent(Box::new(intent.clone())),
                        replay: false,
                    };
                    (reply, Some(rec), Stored::Own(intent))
                }
            }
            Post::Capture {
                amount_to_capture, ..
            } => {
                if intent.status != IntentStatus::RequiresCapture {
                    let rec = record(AnswerKind::UnexpectedState, &intent, refunds(&intent));
                    return Ok((
                        error(unexpected(&intent, "capture")),
                        Some(rec),
                        Stored::Nothing,
                    ));
                }
                let amount = amount_to_capture.unwrap_or(intent.amount);
                if amount == 0 || amount > intent.amount {
                    // A validation failure: no result kept under the key.
                    let e = ApiError::invalid(
                        Some("amount_too_large"),
                        Some("amount_to_capture"),
                        format!(
                            "The amount to capture ({amount}) must be between 1 and the amount capturable ({}).",
                            intent.amount
                        ),
                    );
                    return Ok((error(e), None, Stored::Nothing));
                }
                intent.status = IntentStatus::Succeeded;
                intent.amount_captured = (amount < intent.amount).then_some(amount);
                let rec = record(AnswerKind::Intent, &intent, refunds(&intent));
                let reply = Reply {
                    body: Body::Intent(Box::new(intent.clone())),
                    replay: false,
                };
                (reply, Some(rec), Stored::Own(intent))
            }
            Post::CreateRefund(r) => {
                if intent.status != IntentStatus::Succeeded {
                    let rec = record(AnswerKind::UnexpectedState, &intent, refunds(&intent));
                    let e = ApiError {
                        message: format!(
                            "This PaymentIntent ({}) does not have a successful charge to refund.",
                            intent.id()
                        ),
                        ..unexpected(&intent, "refund")
                    };
                    return Ok((error(e), Some(rec), Stored::Nothing));
                }
                let received = intent.amount_received();
                let left = received - intent.amount_refunded().min(received);
                let asked = r.amount.unwrap_or(left);
                if asked == 0 || asked > left || intent.refunds.len() >= usize::from(u16::MAX) {
                    let rec = record(AnswerKind::RefundTooLarge, &intent, refunds(&intent));
                    return Ok((
                        error(too_large(&intent, asked, left)),
                        Some(rec),
                        Stored::Nothing,
                    ));
                }
                intent.refunds.push(Refund {
                    amount: asked,
                    created: u64::from(now),
                    metadata: r.metadata.clone(),
                });
                let n = refunds(&intent) - 1;
                let view = RefundView::of(&intent, n).expect("just pushed");
                let rec = record(AnswerKind::Refund, &intent, n);
                let reply = Reply {
                    body: Body::Refund(view),
                    replay: false,
                };
                (reply, Some(rec), Stored::Own(intent))
            }
        })
    }

    /// A key's first answer, again.
    fn render(&self, store: &mut S, rec: &KeyRecord, post: &Post) -> anyhow::Result<Reply> {
        let intent = store.intent(&rec.intent)?.ok_or_else(|| {
            anyhow::anyhow!("key record names intent {} that is gone", rec.intent)
        })?;
        let body = match rec.kind {
            AnswerKind::Intent => Body::Intent(Box::new(
                intent.answered_with(rec.status, usize::from(rec.n)),
            )),
            AnswerKind::Declined => {
                let intent = intent.answered_with(rec.status, usize::from(rec.n));
                Body::Error(ApiError {
                    status: 402,
                    kind: "card_error",
                    code: Some("card_declined"),
                    decline_code: Some("insufficient_funds"),
                    param: None,
                    message: INSUFFICIENT_FUNDS_MESSAGE.into(),
                    payment_intent: Some(Box::new(intent)),
                })
            }
            AnswerKind::Refund => Body::Refund(
                RefundView::of(&intent, rec.n)
                    .ok_or_else(|| anyhow::anyhow!("key record names a refund that is gone"))?,
            ),
            AnswerKind::RefundTooLarge => {
                let refunded: u64 = intent.refunds[..usize::from(rec.n).min(intent.refunds.len())]
                    .iter()
                    .map(|r| r.amount)
                    .sum();
                let left = intent.amount_received().saturating_sub(refunded);
                let asked = match post {
                    Post::CreateRefund(r) => r.amount.unwrap_or(left),
                    _ => 0,
                };
                Body::Error(too_large(&intent, asked, left))
            }
            AnswerKind::UnexpectedState => {
                let intent = intent.answered_with(rec.status, usize::from(rec.n));
                let action = match post {
                    Post::Confirm { .. } => "confirm",
                    Post::Cancel { .. } => "cancel",
                    Post::Capture { .. } => "capture",
                    _ => "refund",
                };
                Body::Error(ApiError::unexpected_state(&intent, action))
            }
        };
        Ok(Reply { body, replay: true })
    }

    /// Settles the processing intents that are due: succeeded (or held, with manual capture),
    /// or declined for customers `async-decline-*`. Each is recorded as the gateway acting by
    /// itself: a ledger line with no idempotency key.
    pub async fn settle_due(self: &Arc<Self>) -> anyhow::Result<Vec<Settled>> {
        if !self.settling.load(Ordering::Acquire) {
            return Ok(Vec::new());
        }
        self.blocking(|e| e.settle_now()).await?
    }

    fn settle_now(&self) -> anyhow::Result<Vec<Settled>> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let now_ms = (self.clock)();
        let mut settled = Vec::new();
        while let Some(&(at, id)) = inner.due.first() {
            if at > now_ms {
                break;
            }
            // Off the queue once settled (committed), or found not to be processing: a store
            // error leaves it due, for the next round.
            let intent = inner
                .store
                .intent(&id)?
                .filter(|i| i.status == IntentStatus::Processing && i.settles_at == Some(at));
            let Some(mut intent) = intent else {
                inner.due.pop_first();
                continue;
            };
            intent.settles_at = None;
            let declined = intent
                .metadata
                .get("customer_id")
                .is_some_and(|c| c.starts_with(ASYNC_DECLINE_CUSTOMER_PREFIX));
            let (op, outcome, event_type) = if declined {
                intent.status = IntentStatus::RequiresPaymentMethod;
                intent.declined = true;
                let op = if intent.capture_manual {
                    LedgerOp::Authorize
                } else {
                    LedgerOp::Charge
                };
                (op, LedgerOutcome::Declined, "payment_intent.payment_failed")
            } else if intent.capture_manual {
                intent.status = IntentStatus::RequiresCapture;
                (
                    LedgerOp::Authorize,
                    LedgerOutcome::Succeeded,
                    "payment_intent.amount_capturable_updated",
                )
            } else {
                intent.status = IntentStatus::Succeeded;
                (
                    LedgerOp::Charge,
                    LedgerOutcome::Succeeded,
                    "payment_intent.succeeded",
                )
            };
            let line = inner.store.records().then(|| LedgerEntry {
                at: Some(now_ms),
                params: Some(format!("{:016x}", 0)),
                intent: Some(intent.id()),
                id: (outcome == LedgerOutcome::Succeeded).then(|| intent.id()),
                ..LedgerEntry::new(op, "", intent.metadata.payment_id(), intent.amount, outcome)
            });
            inner.store.commit(Commit {
                key: None,
                intent: Some(&intent),
                line: line.as_ref(),
            })?;
            inner.due.pop_first();
            tracing::info!(intent = %intent.id(), payment_id = %intent.metadata.payment_id().escape_debug(), status = intent.status.as_str(), "processing intent settled");
            settled.push(Settled { event_type, intent });
        }
        self.settling
            .store(!inner.due.is_empty(), Ordering::Release);
        Ok(settled)
    }

    /// Settles processing intents as they come due, for as long as the engine lives, handing
    /// each to `sink` (the webhook deliveries, or nothing).
    pub fn spawn_settler(
        self: &Arc<Self>,
        sink: impl Fn(Settled) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            // Due times are rounded to this: a processing intent settles at most this late.
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                match engine.settle_due().await {
                    Ok(settled) => settled.into_iter().for_each(&sink),
                    Err(e) => tracing::error!("settling processing intents: {e:#}"),
                }
            }
        })
    }

    /// `GET /v1/payment_intents/:id`.
    pub async fn retrieve(self: &Arc<Self>, id: String) -> anyhow::Result<Option<Intent>> {
        self.blocking(move |e| {
            model::parse_intent_id(&id)
                .map(|id| e.lock().store.intent(&id))
                .transpose()
                .map(Option::flatten)
        })
        .await?
    }

    /// `GET /v1/payment_intents/search?query=metadata['payment_id']:'<id>'`.
    pub async fn search(self: &Arc<Self>, payment_id: String) -> anyhow::Result<Vec<Intent>> {
        self.blocking(move |e| e.lock().store.search(&payment_id))
            .await?
    }

    /// `GET /v1/refunds?payment_intent=<id>`: newest first, as Stripe lists.
    pub async fn refunds(
        self: &Arc<Self>,
        intent: String,
    ) -> anyhow::Result<Option<Vec<RefundView>>> {
        let Some(intent) = self.retrieve(intent).await? else {
            return Ok(None);
        };
        Ok(Some(
            (0..intent.refunds.len())
                .rev()
                .filter_map(|n| RefundView::of(&intent, n as u16))
                .collect(),
        ))
    }
}

fn too_large(intent: &Intent, asked: u64, left: u64) -> ApiError {
    if left == 0 {
        ApiError::invalid(
            Some("charge_already_refunded"),
            None,
            format!(
                "Charge {} has already been refunded.",
                model::charge_id(&intent.id)
            ),
        )
    } else {
        ApiError::invalid(
            Some("amount_too_large"),
            Some("amount"),
            format!("Refund amount ({asked}) is greater than unrefunded amount on charge ({left})"),
        )
    }
}

/// Fills in what a call did: outcome, ID, the payment it was for.
fn describe(line: &mut LedgerEntry, reply: &Reply) {
    let intent = match &reply.body {
        Body::Intent(i) => {
            line.outcome = LedgerOutcome::Succeeded;
            line.id = Some(i.id());
            Some(&**i)
        }
        Body::Refund(r) => {
            line.outcome = LedgerOutcome::Succeeded;
            line.id = Some(r.id());
            line.amount = r.amount;
            None
        }
        // A decline took no money: no ID (as the audit reads it), the intent named apart.
        Body::Error(e) if e.kind == "card_error" => {
            line.outcome = LedgerOutcome::Declined;
            if line.intent.is_none() {
                line.intent = e.payment_intent.as_ref().map(|i| i.id());
            }
            e.payment_intent.as_deref()
        }
        Body::Error(e) => {
            line.outcome = LedgerOutcome::Rejected;
            line.error = Some(e.code.unwrap_or(e.kind).to_owned());
            e.payment_intent.as_deref()
        }
    };
    if let Some(i) = intent {
        // A confirmation with manual capture holds the money: it takes none.
        if line.op == LedgerOp::Charge && i.status == IntentStatus::RequiresCapture {
            line.op = LedgerOp::Authorize;
        }
        // Nor does one that settles later: its settlement is a line of its own.
        if matches!(line.op, LedgerOp::Charge | LedgerOp::Authorize)
            && matches!(
                i.status,
                IntentStatus::Processing | IntentStatus::RequiresAction
            )
            && line.outcome == LedgerOutcome::Succeeded
        {
            line.op = LedgerOp::Process;
            line.settles_at = i.settles_at;
            line.manual_capture = i.capture_manual;
        }
        if line.payment_id.is_empty() {
            line.payment_id = i.metadata.payment_id().to_owned();
        }
        if line.amount == 0 {
            line.amount = i.amount;
        }
    }
}

/// A random (v4) UUID from the thread's generator: `Uuid::new_v4` would cost a `getrandom`
/// system call per intent.
pub(crate) fn new_id() -> Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

#[cfg(test)]
mod tests;
